"""The MLA mixer (multi-head latent attention, SPEC 4; letter M), as in DeepSeek-V2/V3 and
Kimi-Linear.

Per token x, with H heads, latent rank C, no-position key size Dn, shared key part R, value size
Dv:

  q           = W_q x, or W_qb RMSNorm(W_qa x) with query compression    [H, Dn + R]
  [c ; k_pe]  = W_kva x;   c <- RMSNorm(c)                               [C], [R]
  k_nope, v   = W_kvb c (per head)                                       [H, Dn], [H, Dv]
  o           = W_o softmax(s (q_nope k_nope + q_pe k_pe) + causal mask) v,   s = (Dn + R)^-1/2

q_pe and k_pe are rotated by RoPE only when ``mla_use_rope``; Kimi-Linear leaves them unrotated
(NoPE). The decode state caches c and k_pe, C + R values per token, and decodes in the absorbed
form (``ops.mla``); training and prefill run the expanded form through flash attention.
Parameter names follow the released checkpoints (q_proj, kv_a_proj_with_mqa, kv_a_layernorm,
kv_b_proj, o_proj).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models.attention import attend_with_cache, positions_and_cache_start, rope_for
from models.layers import Dense, RMSNorm, fan_in_uniform, param
from ops.attention.rope import apply_rope
from ops.mla import mla


class MLAMixer(nn.Module):
  """Multi-head latent attention with a preallocated latent cache.

  ``y, state = mixer(x, state=None, segment_ids=None)`` with x [batch, time, d_model]. The
  state is ``{"latent": [batch, max_cache_length, C], "k_pe": [batch, max_cache_length, R]``
  (compute dtype), ``"position": int32 scalar}``; a call with a state continues the sequence at
  ``position`` (one token: an absorbed decode step).
  """

  config: Any  # train.config.ModelConfig
  num_layers: int = 1

  @staticmethod
  def initial_state(config, batch_size: int) -> dict[str, Any]:
    cache = lambda width: jnp.zeros((batch_size, config.max_cache_length, width),
                                    jnp.dtype(config.dtype))
    return {"latent": cache(config.mla_kv_lora_rank), "k_pe": cache(config.mla_qk_rope_head_dim),
            "position": jnp.zeros((), jnp.int32)}

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    heads, rank = cfg.mla_num_heads, cfg.mla_kv_lora_rank
    nope, rope, v_dim = cfg.mla_qk_nope_head_dim, cfg.mla_qk_rope_head_dim, cfg.mla_v_head_dim
    batch, time = x.shape[:2]
    dense = lambda width, axes, name, **kw: Dense(width, axes, dtype=dtype, name=name, **kw)
    norm = lambda name: RMSNorm(cfg.norm_eps, axis_name="proj", dtype=dtype, name=name)

    if cfg.mla_q_lora_rank:
      q = norm("q_a_layernorm")(dense(cfg.mla_q_lora_rank, ("embed", "proj"), "q_a_proj")(x))
      q = dense(heads * (nope + rope), ("proj", "heads"), "q_b_proj")(q)
    else:
      q = dense(heads * (nope + rope), ("embed", "heads"), "q_proj")(x)
    q = nn.with_logical_constraint(q.reshape(batch, time, heads, nope + rope),
                                   ("batch", "length", "heads", "kv"))
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    latent_and_pe = dense(rank + rope, ("embed", "proj"), "kv_a_proj_with_mqa")(x)
    latent, k_pe = norm("kv_a_layernorm")(latent_and_pe[..., :rank]), latent_and_pe[..., rank:]

    positions, start = positions_and_cache_start(state, batch, time, cfg.max_cache_length)
    logit_factor = 1.0
    if cfg.mla_use_rope:
      inv_freq, logit_factor = rope_for(cfg, rope)
      q_pe = apply_rope(q_pe, positions, inv_freq)
      k_pe = apply_rope(k_pe[:, :, None], positions, inv_freq)[:, :, 0]
    scale = logit_factor / math.sqrt(nope + rope)

    # kv_b_proj maps the latent to each head's [k_nope ; v], head-major like the checkpoints.
    kv_b = param(self, "kv_b_proj", fan_in_uniform(), (rank, heads * (nope + v_dim)),
                 ("proj", "heads")).astype(dtype).reshape(rank, heads, nope + v_dim)
    w_uk, w_uv = kv_b[..., :nope], kv_b[..., nope:]

    def attend(cache, query_positions):
      keys, pe = (latent, k_pe) if cache is None else (cache["latent"], cache["k_pe"])
      return mla(q_nope, q_pe, keys, pe, w_uk, w_uv, scale=scale, segment_ids=segment_ids,
                 query_positions=query_positions,
                 attention_implementation=cfg.attention_implementation)

    o, new_state = attend_with_cache(cfg, state, {"latent": latent, "k_pe": k_pe}, start,
                                     positions, segment_ids, attend)
    o = nn.with_logical_constraint(o.reshape(batch, time, heads * v_dim),
                                   ("batch", "length", "heads"))
    out = dense(cfg.d_model, ("heads", "embed"), "o_proj",
                kernel_init=fan_in_uniform(1.0 / math.sqrt(self.num_layers)))(o)
    return out, new_state
