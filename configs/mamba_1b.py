"""Mamba 1B: the pure selective-scan model at the size of kimi_linear_1b, for the long-context
comparison (``python -m benchmarks.compare``). A GPU preset.

    python -m train --config configs/mamba_1b.py

39 Mamba-1 layers (state 16, expand 2, conv 4) with no MLP, as in the Mamba paper, width 2048,
vocab 50,280 (tied), bf16 compute; 1.134B parameters, within 0.2% of the other 1B presets.
The recipe shared with them is configs/_base_1b.py.
"""

from configs._base_1b import config_1b


def get_config():
  return config_1b("mamba_1b", layer_pattern="S", num_layers=39, mlp="none", d_state=16,
                   expand=2)  # 1.134B parameters.
