"""GQA 1B: the softmax-attention Transformer baseline (grouped-query attention with RoPE), the
same size as kimi_linear_1b.

    python -m train --config configs/gqa_1b.py

20 attention layers (16 query heads and 4 key/value heads of 128, RoPE theta 10,000), width 2048,
dense SwiGLU (width 6656, so that the total matches kimi_linear_1b); the recipe shared with the
other 1B presets is configs/_base_1b.py.
"""

from configs._base_1b import config_1b


def get_config():
  return config_1b("gqa_1b", layer_pattern="A", d_ff=6656)  # 1.131B parameters.
