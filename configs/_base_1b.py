"""What the 1B comparison presets share: width 2048, 20 layers, dense SwiGLU MLPs, vocab 50,280,
sequences of 4096, bf16 compute. They differ only in their mixers (kimi_linear_1b, mla_1b,
gqa_1b), with d_ff chosen per preset so that the totals stay within 0.3% of each other (1.131B to
1.134B parameters). mamba_1b (39 Mamba layers, no MLP) and rwkv7_1b (18 RWKV-7 layers with
their channel mixing) change the layer count and MLP too, to the same total, for
``python -m benchmarks.compare``.

The MLP is dense, not MoE, so that the comparison isolates the mixers; kimi_linear_48b and
kimi_linear_tiny carry the mixture of experts.
"""

from train.config import Config, DataConfig, ModelConfig, SampleConfig, TrainConfig


def config_1b(name: str, **model_fields) -> Config:
  """The shared 1B recipe, with ``model_fields`` (the layer pattern and mixer sizes) on top."""
  model = dict(vocab_size=50_280, d_model=2048, num_layers=20, mlp="swiglu", dtype="bfloat16",
               max_cache_length=8192, kda_num_heads=16, kda_head_dim=128, d_conv=4,
               mla_num_heads=16, mla_kv_lora_rank=512, mla_qk_nope_head_dim=128,
               mla_qk_rope_head_dim=64, mla_v_head_dim=128, mla_use_rope=False,
               attn_num_heads=16, attn_num_kv_heads=4, attn_head_dim=128)
  return Config(
      model=ModelConfig(**{**model, **model_fields}),
      data=DataConfig(dataset="stdlib_bytes", seq_len=4096),
      train=TrainConfig(workdir=f"runs/{name}", steps=20_000, batch_size=64,
                        learning_rate=1e-3, warmup_steps=1_000, weight_decay=0.1,
                        mesh_shape=(1, -1, 1, 1), eval_every=1_000, eval_batches=8,
                        checkpoint_every=1_000, log_every=50),
      sample=SampleConfig(prompt="import ", max_new_tokens=400, temperature=0.7, top_p=0.9),
  )
