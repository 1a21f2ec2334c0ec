"""RWKV-7 (Goose) 1B: the RWKV recurrence at the size of kimi_linear_1b, for the long-context
comparison (``python -m benchmarks.compare``). A GPU preset.

    python -m train --config configs/rwkv7_1b.py

18 layers of RWKV-7 time mixing (32 heads of 64) and channel mixing (width 7936, slightly under
the official 4 C so that the total matches), LayerNorm blocks with ln0, untied head, width 2048,
vocab 50,280, bf16 compute; 1.134B parameters in all (1.031B without the input embedding),
within 0.2% of the other 1B presets. The recipe shared with them is configs/_base_1b.py.
"""

from configs._base_1b import config_1b


def get_config():
  return config_1b("rwkv7_1b", layer_pattern="R", num_layers=18, mlp="rwkv7_channel_mix",
                   rwkv_ffn_dim=7936, rwkv_head_size=64, norm="layer", embedding_norm=True,
                   tie_embeddings=False)  # 1.134B parameters.
