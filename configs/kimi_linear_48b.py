"""Kimi-Linear 48B-A3B: the released architecture's dimensions (SPEC 5). A TPU-pod / multi-GPU
preset; tests instantiate it abstractly to count its parameters.

    python -m train --config configs/kimi_linear_48b.py --distributed

27 layers, width 2304: KDA (32 heads of 128, short conv 4) everywhere except MLA at 0-indexed
layers 3, 7, 11, 15, 19, 23 and 26 (32 heads, latent 512, NoPE, no query compression). Layer 0
has a dense SwiGLU of 9216; the others route each token to 8 of 256 experts of width 1024
(sigmoid router with correction bias, renormalised, scaled by 2.446) plus one shared expert.
Vocabulary 163,840, untied head, cache for 1M tokens. Experts are divided over the mesh's
``expert`` axis (8 here: run on a multiple of 8 devices). The data default is the byte-level
built-in corpus; name a prepared tokenised TFDS dataset for real training.
"""

from train.config import Config, DataConfig, ModelConfig, SampleConfig, TrainConfig


def get_config() -> Config:
  return Config(
      model=ModelConfig(vocab_size=163_840, d_model=2304, num_layers=27,
                        layer_pattern="KKKM" * 6 + "KKM", norm_eps=1e-5, tie_embeddings=False,
                        dtype="bfloat16",
                        kda_num_heads=32, kda_head_dim=128, d_conv=4,
                        mla_num_heads=32, mla_q_lora_rank=None, mla_kv_lora_rank=512,
                        mla_qk_nope_head_dim=128, mla_qk_rope_head_dim=64, mla_v_head_dim=128,
                        mla_use_rope=False, max_cache_length=1_048_576,
                        mlp="moe", first_k_dense=1, d_ff=9216, moe_num_experts=256,
                        moe_top_k=8, moe_num_shared_experts=1, moe_d_ff=1024,
                        moe_routed_scaling_factor=2.446, moe_renormalize=True),
      data=DataConfig(dataset="stdlib_bytes", seq_len=4096),
      train=TrainConfig(workdir="runs/kimi_linear_48b", steps=100_000, batch_size=512,
                        learning_rate=3e-4, warmup_steps=2_000, mesh_shape=(1, -1, 8, 1),
                        eval_every=1_000, eval_batches=8, checkpoint_every=500, log_every=10),
      sample=SampleConfig(prompt="import ", max_new_tokens=400, temperature=0.7, top_p=0.9),
  )
