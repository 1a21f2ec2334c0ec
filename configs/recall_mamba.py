"""Recall benchmark, tiny mamba: Mamba: 2 Mamba-1 layers (state 16, expand 2), no MLP, width 64.

    python -m benchmarks.recall --presets recall_mamba

The shared recipe and the reasons for the sizes are in configs/_recall.py.
"""

from configs._recall import recall_tiny


def get_config():
  return recall_tiny("mamba")
