"""Recall benchmark, tiny kda: KDA: 2 layers of Kimi Delta Attention (2 heads of 32) + SwiGLU,
width 64.

    python -m benchmarks.recall --presets recall_kda

The shared recipe and the reasons for the sizes are in configs/_recall.py.
"""

from configs._recall import recall_tiny


def get_config():
  return recall_tiny("kda")
