"""Kimi-Linear 1B: the hybrid's mixers at 1B scale, for comparison with mla_1b and gqa_1b.

    python -m train --config configs/kimi_linear_1b.py

20 layers "KKKM" (15 KDA layers of 16 heads of 128, 5 NoPE MLA layers of 16 heads with a 512
latent), width 2048, dense SwiGLU; the recipe shared with the baselines is configs/_base_1b.py.
"""

from configs._base_1b import config_1b


def get_config():
  return config_1b("kimi_linear_1b", layer_pattern="KKKM", d_ff=5632)  # 1.132B parameters.
