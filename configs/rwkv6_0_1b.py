"""RWKV-6 (Finch) 0.1B: the official small size (12 layers, width 768, head size 64, vocab 65,536),
LayerNorm blocks, untied head, bf16 compute. A GPU preset.

    python -m train --config configs/rwkv6_0_1b.py
"""

from configs._rwkv import rwkv_0_1b


def get_config():
  return rwkv_0_1b(6)
