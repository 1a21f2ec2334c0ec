"""Recall benchmark, tiny attention: 2 layers of multi-head softmax attention (8 heads of 8, RoPE)
+ SwiGLU, width 64.

    python -m benchmarks.recall --presets recall_attention

The shared recipe and the reasons for the sizes are in configs/_recall.py.
"""

from configs._recall import recall_tiny


def get_config():
  return recall_tiny("attention")
