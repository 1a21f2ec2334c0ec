"""MLA 1B: the all-attention baseline with Kimi-Linear's attention (NoPE multi-head latent
attention), the same size as kimi_linear_1b.

    python -m train --config configs/mla_1b.py

20 MLA layers (16 heads, latent 512, no query compression), width 2048, dense SwiGLU (width 6144,
so that the total matches kimi_linear_1b); the recipe shared with the other 1B presets is
configs/_base_1b.py.
"""

from configs._base_1b import config_1b


def get_config():
  return config_1b("mla_1b", layer_pattern="M", d_ff=6144)  # 1.133B parameters.
