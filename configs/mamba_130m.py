"""Mamba 130M (Gu & Dao, 2023): 24 layers, width 768, state 16, expand 2. A GPU preset.

    python -m train --config configs/mamba_130m.py

Trains the byte-level model on the built-in corpus by default; name another prepared TFDS text
dataset with --data.dataset=NAME --data.text_key=FIELD. bf16 compute, float32 master weights.
"""

from train.config import Config, DataConfig, ModelConfig, SampleConfig, TrainConfig


def get_config() -> Config:
  return Config(
      model=ModelConfig(vocab_size=50_280, d_model=768, num_layers=24, layer_pattern="S", d_state=16,
                        d_conv=4, expand=2, dtype="bfloat16"),
      data=DataConfig(dataset="stdlib_bytes", seq_len=2048),
      train=TrainConfig(workdir="runs/mamba_130m", steps=20_000, batch_size=64,
                        learning_rate=1.5e-3, warmup_steps=1_000, weight_decay=0.1,
                        mesh_shape=(1, -1, 1, 1), eval_every=1_000, eval_batches=8,
                        checkpoint_every=1_000, log_every=50),
      sample=SampleConfig(prompt="import ", max_new_tokens=400, temperature=0.7, top_p=0.9),
  )
