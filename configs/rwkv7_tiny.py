"""RWKV-7 (Goose) tiny: 2 layers of time and channel mixing, width 128, 4 heads of 32, on a 2-core CPU.

    python -m train --config configs/rwkv7_tiny.py
"""

from configs._rwkv import rwkv_tiny


def get_config():
  return rwkv_tiny(7)
