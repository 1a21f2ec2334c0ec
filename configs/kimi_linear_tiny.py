"""Kimi-Linear tiny: the hybrid (three KDA layers to one MLA layer, MoE MLPs) on a 2-core CPU.

    python -m train --config configs/kimi_linear_tiny.py

The README's main job. 4 layers "KKKM" (KDA: 4 heads of 32; MLA: 4 heads, latent 64, NoPE as
in Kimi-Linear), width 128; layer 0 has a dense SwiGLU, the others a mixture of 8 experts
(top 2, sigmoid router with correction bias) plus one shared expert. Byte-level, on the Python
standard library's sources (built offline). Generation prefills the prompt, then decodes with
the KDA states and the MLA latent cache.
"""

from train.config import Config, DataConfig, ModelConfig, SampleConfig, TrainConfig


def get_config() -> Config:
  return Config(
      model=ModelConfig(vocab_size=256, d_model=128, num_layers=4, layer_pattern="KKKM",
                        kda_num_heads=4, kda_head_dim=32, d_conv=4,
                        kda_chunk_size=16,  # Chunk 16 measured fastest on CPU (docs/kda.md).
                        mla_num_heads=4, mla_kv_lora_rank=64, mla_qk_nope_head_dim=32,
                        mla_qk_rope_head_dim=16, mla_v_head_dim=32, mla_use_rope=False,
                        max_cache_length=512,
                        mlp="moe", first_k_dense=1, d_ff=256, moe_num_experts=8, moe_top_k=2,
                        moe_num_shared_experts=1, moe_d_ff=128),
      data=DataConfig(dataset="stdlib_bytes", seq_len=128),
      train=TrainConfig(workdir="runs/kimi_linear_tiny", steps=400, batch_size=16,
                        learning_rate=3e-3, warmup_steps=40, eval_every=100,
                        checkpoint_every=100, log_every=50),
      sample=SampleConfig(prompt="def ", max_new_tokens=200, temperature=0.7, top_k=40),
  )
