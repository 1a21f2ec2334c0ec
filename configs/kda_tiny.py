"""KDA tiny: a Kimi Delta Attention language model that trains on a 2-core CPU in a few minutes.

    python -m train --config configs/kda_tiny.py

2 layers of KDA (4 heads of 32) and a SwiGLU MLP, width 128, byte-level, on the Python standard
library's sources (built offline).
"""

from train.config import Config, DataConfig, ModelConfig, SampleConfig, TrainConfig


def get_config() -> Config:
  return Config(
      model=ModelConfig(vocab_size=256, d_model=128, num_layers=2, layer_pattern="K",
                        kda_num_heads=4, kda_head_dim=32, d_conv=4, mlp="swiglu", d_ff=256,
                        kda_chunk_size=16),  # Chunk 16 measured fastest on CPU (docs/kda.md).
      data=DataConfig(dataset="stdlib_bytes", seq_len=128),
      train=TrainConfig(workdir="runs/kda_tiny", steps=400, batch_size=16, learning_rate=3e-3,
                        warmup_steps=40, eval_every=100, checkpoint_every=100, log_every=50),
      sample=SampleConfig(prompt="def ", max_new_tokens=200, temperature=0.7, top_k=40),
  )
