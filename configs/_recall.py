"""What the recall presets share: the tiny models that ``python -m benchmarks.recall`` compares.

Every architecture gets the same width (64) and depth (2 layers), byte vocabulary (256, so one
model config serves MQAR's small vocabulary and passkey's bytes), and the same training recipe
(800 steps of batch 32 for MQAR, AdamW at 1e-3 with 50 warmup steps and a cosine to 10%:
the rate at which the attention baseline formed its induction heads soonest in short trials). Each keeps the block it is
used with elsewhere in the project: a SwiGLU MLP of width 128 after KDA, attention and the
hybrid's layers; Mamba blocks without an MLP (as mamba_tiny and the Mamba paper); RWKV-7 with its
own channel mixing and LayerNorms (as rwkv7_tiny). Parameter counts therefore differ somewhat
(80k-160k); the benchmark reports them. The hybrid is Kimi-Linear's pairing at this depth: a KDA
layer then an MLA layer (NoPE, latent 32), one to one rather than three to one, since two layers
hold only one of each. The attention baseline has 8 heads of 8, each with its own keys and
values: in short MQAR trials at this width, 4 heads of 16 (and 8 heads sharing 4 key/value heads,
grouped-query) formed the induction heads that recall needs after 1,200 to beyond 2,500 steps
depending on the seed, 8 full heads after 900 to 1,200 for each of five seeds. Grouped-query
attention is what the 1B baseline (``gqa_1b``) uses; pass
``--override model.attn_num_kv_heads=4`` to compare it here.

The data section is the byte corpus, so ``python -m train --config configs/recall_kda.py`` also
trains the same model as a language model; the benchmark replaces the data with its tasks and
takes steps, batch size, learning rate and warmup from the train section.
"""

from train.config import Config, DataConfig, ModelConfig, SampleConfig, TrainConfig

WIDTH = 64
LAYERS = 2

ARCHITECTURES = {
    "kda": dict(layer_pattern="K", kda_num_heads=WIDTH // 32, kda_head_dim=32, kda_chunk_size=16,
                mlp="swiglu", d_ff=2 * WIDTH),
    "mamba": dict(layer_pattern="S", d_state=16, expand=2, mlp="none"),
    "rwkv7": dict(layer_pattern="R", mlp="rwkv7_channel_mix", norm="layer", embedding_norm=True,
                  tie_embeddings=False, rwkv_head_size=32, rwkv_chunk_size=16),
    "hybrid": dict(layer_pattern="KM", kda_num_heads=WIDTH // 32, kda_head_dim=32,
                   kda_chunk_size=16, mla_num_heads=WIDTH // 32, mla_kv_lora_rank=WIDTH // 2,
                   mla_qk_nope_head_dim=32, mla_qk_rope_head_dim=16, mla_v_head_dim=32,
                   mla_use_rope=False, mlp="swiglu", d_ff=2 * WIDTH),
    "attention": dict(layer_pattern="A", attn_num_heads=WIDTH // 8, attn_num_kv_heads=None,
                      attn_head_dim=8, mlp="swiglu", d_ff=2 * WIDTH),
}


def recall_tiny(architecture: str) -> Config:
  return Config(
      model=ModelConfig(vocab_size=256, d_model=WIDTH, num_layers=LAYERS, max_cache_length=1024,
                        **ARCHITECTURES[architecture]),
      data=DataConfig(dataset="stdlib_bytes", seq_len=128),
      train=TrainConfig(workdir=f"runs/recall_{architecture}", steps=800, batch_size=32,
                        learning_rate=1e-3, warmup_steps=50, eval_every=100,
                        checkpoint_every=100, log_every=50),
      sample=SampleConfig(prompt="def ", max_new_tokens=200, temperature=0.7, top_k=40),
  )
