"""RWKV-7 (Goose) time mixing (letter R) and channel mixing (MLP "rwkv7_channel_mix"), SPEC 2.3-2.5.

Time mixing, per token x with xx = x_{t-1} - x_t and static lerps x_* = x + xx * mu_*:

  r, k, v    = W_r x_r, W_k x_k, W_v x_v
  log decay  = -e^-1/2 sigmoid(w0 + tanh(x_w W1) W2)          soft-clamped decay (fla's form)
  v          <- v + (v_first - v) sigmoid(v0 + x_v V1 V2)     value residual (not in the first
                                                              RWKV-7 layer, which sets v_first)
  a          = sigmoid(a0 + x_a A1 A2)                        in-context learning rate
  g          = sigmoid(x_g G1) G2
  kappa      = L2normalise_per_head(k * k_k)                  removal key
  k          <- k * (1 + (a - 1) * k_a)                       replacement key
  o          = rwkv7(r, log decay, k, v, -kappa, kappa * a)   ops.rwkv7, scale 1
  out        = W_o((GroupNorm_H(o) + sum_head(r * k * r_k) v) * g)

Channel mixing: ``W_v relu(W_k(x + xx mu_k))^2`` (width 4 C, no receptance gate).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import Dense, fan_in_uniform, param
from models.rwkv_common import (HeadGroupNorm, constant, depth_ratios, heads_of, lora_rank,
                                token_shift)
from ops.rwkv7 import rwkv7, rwkv7_step

DECAY_SCALE = math.exp(-0.5)  # 0.6065306597126334: log decay in (-e^-1/2, 0) (SPEC 2.3).
L2_NORM_EPS = 1e-12


def rwkv7_ffn_dim(config) -> int:
  """``rwkv_ffn_dim``, or 4 d_model."""
  return config.rwkv_ffn_dim or 4 * config.d_model


class RWKV7TimeMix(nn.Module):
  """``y, state, v_first = mixer(x, state=None, segment_ids=None, v_first=None)``.

  x [batch, time, d_model]; ``v_first`` [batch, time, H, N] the first RWKV-7 layer's values
  (None in that layer, which returns its own). State: ``{"shift": [batch, d_model] (compute
  dtype), "wkv": [batch, H, N, N] float32}``, key-major.
  """

  config: Any  # train.config.ModelConfig
  num_layers: int = 1
  layer_index: int = 0
  VALUE_RESIDUAL: ClassVar[bool] = True  # models.lm.Block threads v_first through.

  @staticmethod
  def initial_state(config, batch_size: int) -> dict[str, Any]:
    heads, size = heads_of(config), config.rwkv_head_size
    return {"shift": jnp.zeros((batch_size, config.d_model), jnp.dtype(config.dtype)),
            "wkv": jnp.zeros((batch_size, heads, size, size), jnp.float32)}

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None, v_first=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    heads, size, width = heads_of(cfg), cfg.rwkv_head_size, cfg.d_model
    batch, time = x.shape[:2]
    ratio = depth_ratios(self.layer_index, self.num_layers, width)
    decoding = state is not None and time == 1

    powers = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}
    x = x.astype(jnp.float32)
    xx, last = token_shift(x, None if state is None else state["shift"], segment_ids)
    branch = {name: x + xx * param(
        self, f"x_{name}", constant(1.0 - ratio.channel**(power * ratio.one_to_almost_zero)),
        (width,), ("embed",)) for name, power in powers.items()}

    def lora(name, rank, inner=lambda h: h, bias_init=None):
      """bias + inner(x_name A) B with A zero-initialised, B orthogonal x 0.1; [B, T, C]."""
      down = param(self, f"{name}1", nn.initializers.zeros, (width, rank), ("embed", "proj"))
      up = param(self, f"{name}2", nn.initializers.orthogonal(0.1), (rank, width),
                 ("proj", "heads"))
      out = inner(branch[name] @ down) @ up
      if bias_init is not None:
        out = out + param(self, f"{name}0", bias_init, (width,), ("heads",))
      return out

    dense = lambda name, **kw: Dense(width, ("embed", "heads"), dtype=dtype, name=name, **kw)
    per_head = lambda a: a.reshape(batch, time, heads, size)
    r, k, v = (per_head(dense(name)(branch[key]).astype(jnp.float32)) for name, key in
               (("receptance", "r"), ("key", "k"), ("value", "v")))

    n = jnp.arange(width, dtype=jnp.float32) / max(width - 1, 1)
    decay_speed = -7.0 + 5.0 * n**(0.85 + math.sqrt(ratio.zero_to_one))
    log_decay = -DECAY_SCALE * jax.nn.sigmoid(lora(
        "w", lora_rank(cfg.rwkv_decay_lora, 2.5, width), jnp.tanh,
        constant(decay_speed + 0.5)))
    if v_first is None:
      v_first = v
    else:
      mix = jax.nn.sigmoid(lora("v", lora_rank(cfg.rwkv_value_lora, 1.7, width),
                                bias_init=nn.initializers.ones))
      v = v + (v_first - v) * per_head(mix)
    a = per_head(jax.nn.sigmoid(lora("a", lora_rank(cfg.rwkv_a_lora, 2.5, width),
                                     bias_init=nn.initializers.zeros)))
    g = lora("g", lora_rank(cfg.rwkv_gate_lora, 5.0, width), jax.nn.sigmoid)

    k_k = param(self, "k_k", constant(0.71 - 0.1 * n), (width,), ("heads",))
    k_a = param(self, "k_a", constant(1.02), (width,), ("heads",))
    r_k = param(self, "r_k", constant(-0.04), (heads, size), ("heads", "kv"))
    kappa = k * k_k.reshape(heads, size)
    kappa = kappa * jax.lax.rsqrt(jnp.sum(kappa * kappa, -1, keepdims=True) + L2_NORM_EPS)
    k = k * (1.0 + (a - 1.0) * k_a.reshape(heads, size))
    log_decay = per_head(log_decay)

    if decoding:
      o, wkv = rwkv7_step(r[:, 0], log_decay[:, 0], k[:, 0], v[:, 0], -kappa[:, 0],
                          (kappa * a)[:, 0], state["wkv"])
      o = o[:, None]
    else:
      o, wkv = rwkv7(r, log_decay, k, v, -kappa, kappa * a,
                     initial_state=None if state is None else state["wkv"],
                     return_final_state=True, segment_ids=segment_ids,
                     implementation=cfg.rwkv_implementation, chunk_size=cfg.rwkv_chunk_size)
    bonus = jnp.sum(r * k * r_k, axis=-1, keepdims=True) * v
    o = (HeadGroupNorm(name="ln_x")(o) + bonus).reshape(batch, time, width) * g
    o = nn.with_logical_constraint(o.astype(dtype), ("batch", "length", "heads"))
    out = Dense(width, ("heads", "embed"), dtype=dtype, name="output",
                kernel_init=fan_in_uniform(1.0 / math.sqrt(self.num_layers)))(o)
    return out, {"shift": last.astype(dtype), "wkv": wkv}, v_first


class RWKV7ChannelMix(nn.Module):
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
    x = x.astype(jnp.float32)
    xx, last = token_shift(x, None if state is None else state["shift"], segment_ids)
    mu = param(self, "x_k", constant(1.0 - ratio.channel**(ratio.one_to_almost_zero**4)),
               (width,), ("embed",))
    hidden = Dense(rwkv7_ffn_dim(cfg), ("embed", "mlp"), dtype=dtype, name="key")(x + xx * mu)
    hidden = nn.with_logical_constraint(jnp.square(jax.nn.relu(hidden)),
                                        ("batch", "length", "mlp"))
    out = Dense(width, ("mlp", "embed"), dtype=dtype, name="value",
                kernel_init=fan_in_uniform(1.0 / math.sqrt(self.num_layers)))(hidden)
    return out, {"shift": last.astype(dtype)}
