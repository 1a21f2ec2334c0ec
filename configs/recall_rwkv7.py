"""Recall benchmark, tiny rwkv7: RWKV-7: 2 layers of time mixing (2 heads of 32) and channel
mixing, LayerNorm, width 64.

    python -m benchmarks.recall --presets recall_rwkv7

The shared recipe and the reasons for the sizes are in configs/_recall.py.
"""

from configs._recall import recall_tiny


def get_config():
  return recall_tiny("rwkv7")
