"""The softmax-attention mixer (the baseline, letter A): multi-head, grouped- or multi-query
attention with RoPE (YaRN-extended when ``rope_yarn_factor`` > 1) and a preallocated KV cache.

Per token x, with H query heads and KH key/value heads of size D (H a multiple of KH):

  q, k, v = W_q x, W_k x, W_v x          [H, D], [KH, D], [KH, D]
  q, k    = RoPE(q, t), RoPE(k, t)       t: the token's position in its sequence
  o       = W_o softmax(s q k^T + causal mask) v,   s = D^-1/2 (x YaRN factor^2)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import Dense, fan_in_uniform
from ops.attention import attention, update_cache
from ops.attention.rope import apply_rope, rope_frequencies, yarn_attention_factor

PER_HEAD = ("batch", "length", "heads", "kv")


def rope_for(config, head_dim: int) -> tuple[jax.Array, float]:
  """(inverse frequencies [head_dim // 2], the logit-scale multiplier) from the RoPE fields."""
  inv_freq = rope_frequencies(head_dim, config.rope_theta, yarn_factor=config.rope_yarn_factor,
                              original_max_length=config.rope_original_max_length)
  return inv_freq, yarn_attention_factor(config.rope_yarn_factor)**2


def positions_and_cache_start(state, batch: int, time: int, max_length: int):
  """Token positions [batch, time] int32 and where they go in the cache.

  Without a state a sequence starts at 0; with one it continues at ``state["position"]``.
  Raises ValueError when a sequence cannot fit the preallocated cache.
  """
  if time > max_length:
    raise ValueError(f"a sequence of {time} tokens does not fit the decode cache of "
                     f"max_cache_length={max_length} tokens; raise --model.max_cache_length")
  start = jnp.zeros((), jnp.int32) if state is None else state["position"]
  positions = start + jnp.arange(time, dtype=jnp.int32)
  return jnp.broadcast_to(positions, (batch, time)), start


def attend_with_cache(config, state, caches: dict[str, jax.Array], start, positions,
                      segment_ids, attend):
  """Writes this call's cache entries at ``start`` and runs ``attend``.

  Args:
    caches: the new entries, name -> [batch, time, ...], written into ``state[name]`` (or, with
      no state, into zeros [batch, max_cache_length, ...] of the compute dtype).
    attend: (cache entries or None, query_positions or None) -> output. Without a state it
      gets None and attends within the sequence (causal, by segment); with a state it gets
      the updated caches and the query positions.

  Returns (output, new state).
  """
  if state is not None and segment_ids is not None:
    raise ValueError("segment_ids cannot be combined with a decode state: an attention "
                     "cache holds one sequence per row")
  time = positions.shape[1]
  base = state if state is not None else {
      name: jnp.zeros((value.shape[0], config.max_cache_length) + value.shape[2:],
                      jnp.dtype(config.dtype)) for name, value in caches.items()}
  written = {name: update_cache(base[name], value, start) for name, value in caches.items()}
  out = attend(None, None) if state is None else attend(written, positions)
  return out, {**written, "position": start + time}


class AttentionMixer(nn.Module):
  """Softmax attention with RoPE and a KV cache.

  ``y, state = mixer(x, state=None, segment_ids=None)`` with x [batch, time, d_model]. The
  state is ``{"k", "v": [batch, max_cache_length, KH, D] (compute dtype), "position": int32
  scalar}``; a call with a state continues the sequence at ``position`` (one token: a decode
  step).
  """

  config: Any  # train.config.ModelConfig
  num_layers: int = 1

  @staticmethod
  def initial_state(config, batch_size: int) -> dict[str, Any]:
    shape = (batch_size, config.max_cache_length, _num_kv_heads(config), config.attn_head_dim)
    return {"k": jnp.zeros(shape, jnp.dtype(config.dtype)),
            "v": jnp.zeros(shape, jnp.dtype(config.dtype)),
            "position": jnp.zeros((), jnp.int32)}

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    heads, kv_heads, head_dim = cfg.attn_num_heads, _num_kv_heads(cfg), cfg.attn_head_dim
    batch, time = x.shape[:2]
    project = lambda count, name: nn.with_logical_constraint(
        Dense(count * head_dim, ("embed", "heads"), dtype=dtype, name=name)(x)
        .reshape(batch, time, count, head_dim), PER_HEAD)
    q, k, v = project(heads, "q_proj"), project(kv_heads, "k_proj"), project(kv_heads, "v_proj")
    positions, start = positions_and_cache_start(state, batch, time, cfg.max_cache_length)
    inv_freq, logit_factor = rope_for(cfg, head_dim)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    scale = logit_factor / math.sqrt(head_dim)

    def attend(cache, query_positions):
      keys, values = (k, v) if cache is None else (cache["k"], cache["v"])
      return attention(q, keys, values, segment_ids=segment_ids, query_positions=query_positions,
                       scale=scale, implementation=cfg.attention_implementation)

    o, new_state = attend_with_cache(cfg, state, {"k": k, "v": v}, start, positions,
                                     segment_ids, attend)
    o = nn.with_logical_constraint(o.reshape(batch, time, heads * head_dim),
                                   ("batch", "length", "heads"))
    out = Dense(cfg.d_model, ("heads", "embed"), dtype=dtype, name="o_proj",
                kernel_init=fan_in_uniform(1.0 / math.sqrt(self.num_layers)))(o)
    return out, new_state


def _num_kv_heads(config) -> int:
  kv_heads = config.attn_num_kv_heads or config.attn_num_heads
  if config.attn_num_heads % kv_heads:
    raise ValueError(f"attn_num_heads ({config.attn_num_heads}) must be a multiple of "
                     f"attn_num_kv_heads ({kv_heads})")
  return kv_heads
