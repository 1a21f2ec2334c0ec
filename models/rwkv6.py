"""RWKV-6 (Finch) time mixing (letter F) and channel mixing (MLP "rwkv6_channel_mix"), SPEC 2.1-2.2.

Time mixing, per token x with xx = x_{t-1} - x_t:

  xxx        = x + xx * mu_x
  m_w..m_g   = tanh(xxx W1) W2                       the 5-way data-dependent lerp (rank 32)
  x_*        = x + xx * (mu_* + m_*),  * in {w, k, v, r, g}
  r, k, v    = W_r x_r, W_k x_k, W_v x_v;  g = SiLU(W_g x_g)
  log decay  = -exp(d + tanh(x_w Wd1) Wd2)           per channel (decay LoRA rank 64)
  o          = wkv6(r, k, v, log decay, bonus u)     ops.rwkv6, scale 1
  out        = W_o(GroupNorm_H(o) * g)

Channel mixing: ``sigmoid(W_r(x + xx mu_r)) * W_v relu(W_k(x + xx mu_k))^2``.
Parameter names follow the official code (time_maa_*, time_decay*, time_faaaa, ln_x, ...).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import Dense, fan_in_uniform, param, symmetric_uniform
from models.rwkv_common import HeadGroupNorm, constant, depth_ratios, heads_of, token_shift
from ops.rwkv6 import rwkv6, rwkv6_step

BRANCHES = ("w", "k", "v", "r", "g")


def rwkv6_ffn_dim(config) -> int:
  """``rwkv_ffn_dim``, or the official int(3.5 C // 32 * 32)."""
  return config.rwkv_ffn_dim or int(3.5 * config.d_model // 32 * 32)


class RWKV6TimeMix(nn.Module):
  """``y, state = mixer(x, state=None, segment_ids=None)``, x [batch, time, d_model].

  State: ``{"shift": [batch, d_model] (compute dtype), "wkv": [batch, H, N, N] float32}``.
  """

  config: Any  # train.config.ModelConfig
  num_layers: int = 1
  layer_index: int = 0

  @staticmethod
  def initial_state(config, batch_size: int) -> dict[str, Any]:
    heads, size = heads_of(config), config.rwkv_head_size
    return {"shift": jnp.zeros((batch_size, config.d_model), jnp.dtype(config.dtype)),
            "wkv": jnp.zeros((batch_size, heads, size, size), jnp.float32)}

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    heads, size, width = heads_of(cfg), cfg.rwkv_head_size, cfg.d_model
    batch, time = x.shape[:2]
    ratio = depth_ratios(self.layer_index, self.num_layers, width)
    decoding = state is not None and time == 1

    curve = lambda power: constant(1.0 - ratio.channel**power)
    mu = {"x": curve(ratio.one_to_almost_zero), "w": curve(ratio.one_to_almost_zero),
          "k": curve(ratio.one_to_almost_zero),
          "v": constant(1.0 - (ratio.channel**ratio.one_to_almost_zero + 0.3 * ratio.zero_to_one)),
          "r": curve(0.5 * ratio.one_to_almost_zero), "g": curve(0.5 * ratio.one_to_almost_zero)}
    mu = {name: param(self, f"time_maa_{name}", init, (width,), ("embed",))
          for name, init in mu.items()}
    lora = cfg.rwkv_mix_lora
    maa_w1 = param(self, "time_maa_w1", nn.initializers.zeros, (width, len(BRANCHES) * lora),
                   ("embed", "proj"))
    maa_w2 = param(self, "time_maa_w2", symmetric_uniform(0.01), (len(BRANCHES), lora, width),
                   (None, "proj", "embed"))

    x = x.astype(jnp.float32)
    xx, last = token_shift(x, None if state is None else state["shift"], segment_ids)
    mix = jnp.tanh((x + xx * mu["x"]) @ maa_w1).reshape(batch, time, len(BRANCHES), lora)
    mix = jnp.einsum("btfl,flc->fbtc", mix, maa_w2)
    branch = {name: x + xx * (mu[name] + mix[i]) for i, name in enumerate(BRANCHES)}

    dense = lambda name, **kw: Dense(width, ("embed", "heads"), dtype=dtype, name=name, **kw)
    per_head = lambda a: a.reshape(batch, time, heads, size)
    r, k, v = (per_head(dense(name)(branch[key])) for name, key in
               (("receptance", "r"), ("key", "k"), ("value", "v")))
    g = jax.nn.silu(dense("gate")(branch["g"]).astype(jnp.float32))

    decay_rank = cfg.rwkv_decay_lora or 64
    n = jnp.arange(width, dtype=jnp.float32) / max(width - 1, 1)
    time_decay = param(self, "time_decay",
                       constant(-6.0 + 5.0 * n**(0.7 + 1.3 * ratio.zero_to_one)), (width,),
                       ("heads",))
    decay_w1 = param(self, "time_decay_w1", nn.initializers.zeros, (width, decay_rank),
                     ("embed", "proj"))
    decay_w2 = param(self, "time_decay_w2", symmetric_uniform(0.01), (decay_rank, width),
                     ("proj", "heads"))
    log_decay = per_head(-jnp.exp(time_decay + jnp.tanh(branch["w"] @ decay_w1) @ decay_w2))
    zigzag = ((jnp.arange(width) + 1) % 3 - 1) * 0.1
    bonus = param(self, "time_faaaa",
                  constant((ratio.zero_to_one * (1.0 - n) + zigzag).reshape(heads, size)),
                  (heads, size), ("heads", "kv"))

    if decoding:
      o, wkv = rwkv6_step(r[:, 0], k[:, 0], v[:, 0], log_decay[:, 0], bonus, state["wkv"])
      o = o[:, None]
    else:
      o, wkv = rwkv6(r, k, v, log_decay, bonus, initial_state=None if state is None else
                     state["wkv"], return_final_state=True, segment_ids=segment_ids,
                     implementation=cfg.rwkv_implementation, chunk_size=cfg.rwkv_chunk_size)
    o = HeadGroupNorm(name="ln_x")(o).reshape(batch, time, width) * g
    o = nn.with_logical_constraint(o.astype(dtype), ("batch", "length", "heads"))
    out = Dense(width, ("heads", "embed"), dtype=dtype, name="output",
                kernel_init=fan_in_uniform(1.0 / math.sqrt(self.num_layers)))(o)
    return out, {"shift": last.astype(dtype), "wkv": wkv}


class RWKV6ChannelMix(nn.Module):
  """``y, state = mlp(x, state=None, segment_ids=None)``; state ``{"shift": [batch, d_model]}``."""

  config: Any
  num_layers: int = 1
  layer_index: int = 0

  @staticmethod
  def initial_state(config, batch_size: int) -> dict[str, Any]:
    return {"shift": jnp.zeros((batch_size, config.d_model), jnp.dtype(config.dtype))}

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    cfg = self.config
    dtype, width = jnp.dtype(cfg.dtype), cfg.d_model
    ratio = depth_ratios(self.layer_index, self.num_layers, width)
    mu = lambda name: param(self, name, constant(1.0 - ratio.channel**ratio.one_to_almost_zero),
                            (width,), ("embed",))
    x = x.astype(jnp.float32)
    xx, last = token_shift(x, None if state is None else state["shift"], segment_ids)
    hidden = Dense(rwkv6_ffn_dim(cfg), ("embed", "mlp"), dtype=dtype, name="key")(
        x + xx * mu("time_maa_k"))
    hidden = nn.with_logical_constraint(jnp.square(jax.nn.relu(hidden)),
                                        ("batch", "length", "mlp"))
    value = Dense(width, ("mlp", "embed"), dtype=dtype, name="value",
                  kernel_init=fan_in_uniform(1.0 / math.sqrt(self.num_layers)))(hidden)
    gate = Dense(width, ("embed", "heads"), dtype=dtype, name="receptance")(
        x + xx * mu("time_maa_r"))
    return jax.nn.sigmoid(gate.astype(jnp.float32)) * value, {"shift": last.astype(dtype)}
