"""What the RWKV presets share: LayerNorm blocks with ln0 after the embedding, an untied head,
the version's time mixing (letter F: RWKV-6, R: RWKV-7) and its channel mixing."""

from train.config import Config, DataConfig, ModelConfig, SampleConfig, TrainConfig

LETTERS = {6: "F", 7: "R"}


def rwkv_tiny(version: int) -> Config:
  """2 layers, width 128, 4 heads of 32, 400 steps on the built-in byte corpus: a CPU job."""
  return Config(
      model=ModelConfig(vocab_size=256, d_model=128, num_layers=2,
                        layer_pattern=LETTERS[version], mlp=f"rwkv{version}_channel_mix",
                        norm="layer", embedding_norm=True, tie_embeddings=False,
                        rwkv_head_size=32, rwkv_chunk_size=16),
      data=DataConfig(dataset="stdlib_bytes", seq_len=128),
      train=TrainConfig(workdir=f"runs/rwkv{version}_tiny", steps=400, batch_size=16,
                        learning_rate=3e-3, warmup_steps=40, eval_every=100,
                        checkpoint_every=100, log_every=50),
      sample=SampleConfig(prompt="def ", max_new_tokens=200, temperature=0.7, top_k=40),
  )


def rwkv_0_1b(version: int) -> Config:
  """The official 0.1B size: 12 layers, width 768, heads of 64, vocab 65,536; bf16, GPU."""
  return Config(
      model=ModelConfig(vocab_size=65_536, d_model=768, num_layers=12,
                        layer_pattern=LETTERS[version], mlp=f"rwkv{version}_channel_mix",
                        norm="layer", embedding_norm=True, tie_embeddings=False,
                        rwkv_head_size=64, dtype="bfloat16"),
      data=DataConfig(dataset="stdlib_bytes", seq_len=4096),
      train=TrainConfig(workdir=f"runs/rwkv{version}_0_1b", steps=20_000, batch_size=32,
                        learning_rate=6e-4, warmup_steps=1_000, mesh_shape=(1, -1, 1, 1),
                        eval_every=1_000, eval_batches=8, checkpoint_every=1_000, log_every=50),
      sample=SampleConfig(prompt="import ", max_new_tokens=400, temperature=0.7, top_p=0.9),
  )
