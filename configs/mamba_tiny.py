"""Mamba tiny: the default main job, trains on a 2-core CPU in a few minutes.

    python -m train --config configs/mamba_tiny.py

Byte-level language model on the Python standard library's sources (built offline).
"""

from train.config import Config, DataConfig, ModelConfig, SampleConfig, TrainConfig


def get_config() -> Config:
  return Config(
      model=ModelConfig(vocab_size=256, d_model=128, num_layers=2, layer_pattern="S", d_state=16,
                        d_conv=4, expand=2),
      data=DataConfig(dataset="stdlib_bytes", seq_len=128),
      train=TrainConfig(workdir="runs/mamba_tiny", steps=400, batch_size=16, learning_rate=3e-3,
                        warmup_steps=40, eval_every=100, checkpoint_every=100, log_every=50),
      sample=SampleConfig(prompt="def ", max_new_tokens=200, temperature=0.7, top_k=40),
  )
