"""Recall benchmark, tiny hybrid: the Kimi-Linear-style hybrid, a KDA layer then an MLA layer
(NoPE), SwiGLU after each, width 64.

    python -m benchmarks.recall --presets recall_hybrid

The shared recipe and the reasons for the sizes are in configs/_recall.py.
"""

from configs._recall import recall_tiny


def get_config():
  return recall_tiny("hybrid")
