"""KDA 1B: 18 Kimi Delta Attention layers with SwiGLU MLPs, about 1.05B parameters. A GPU preset.

    python -m train --config configs/kda_1b.py

Width 2048, 16 heads of 128 (the Kimi-Linear head size), SwiGLU width 5632, vocab 50,280 (tied
embeddings), sequences of 4096. Trains the byte-level model on the built-in corpus by default;
name another prepared TFDS text dataset with --data.dataset=NAME --data.text_key=FIELD. bf16
compute, float32 master weights.
"""

from train.config import Config, DataConfig, ModelConfig, SampleConfig, TrainConfig


def get_config() -> Config:
  return Config(
      model=ModelConfig(vocab_size=50_280, d_model=2048, num_layers=18, layer_pattern="K",
                        kda_num_heads=16, kda_head_dim=128, d_conv=4, mlp="swiglu", d_ff=5632,
                        dtype="bfloat16"),
      data=DataConfig(dataset="stdlib_bytes", seq_len=4096),
      train=TrainConfig(workdir="runs/kda_1b", steps=20_000, batch_size=64,
                        learning_rate=1e-3, warmup_steps=1_000, weight_decay=0.1,
                        mesh_shape=(1, -1, 1, 1), eval_every=1_000, eval_batches=8,
                        checkpoint_every=1_000, log_every=50),
      sample=SampleConfig(prompt="import ", max_new_tokens=400, temperature=0.7, top_p=0.9),
  )
