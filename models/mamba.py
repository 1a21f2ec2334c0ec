"""The Mamba-1 mixer (SPEC 1.3-1.5): in_proj, causal conv, selective scan, gate, out_proj."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import Dense, dt_bias_init, fan_in_uniform, param, symmetric_uniform
from ops.selective_scan import selective_scan, selective_scan_step
from ops.short_conv import short_conv, short_conv_step


def dt_rank(config) -> int:
  return config.dt_rank or math.ceil(config.d_model / 16)


def d_inner(config) -> int:
  return config.expand * config.d_model


def _a_log_init(key, shape, dtype=jnp.float32):
  """S4D-real: A_log[d, n] = log(n + 1)."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=dtype)), shape)


class MambaMixer(nn.Module):
  """Selective-scan mixer.

  ``y, state = mixer(x, state=None, segment_ids=None)`` with x [batch, time, d_model]. With a
  state and one token it takes the decode step; otherwise it runs the whole sequence (from the
  state if given) and returns the final state. The state is a dict with ``conv``
  [batch, d_conv - 1, d_inner] (compute dtype) and ``ssm`` [batch, d_inner, d_state] float32.
  """

  config: Any  # train.config.ModelConfig (models never imports train).
  num_layers: int = 1  # Scales out_proj's initialisation by 1 / sqrt(num_layers).

  @staticmethod
  def initial_state(config, batch_size: int) -> dict[str, jax.Array]:
    inner = d_inner(config)
    return {
        "conv": jnp.zeros((batch_size, config.d_conv - 1, inner), jnp.dtype(config.dtype)),
        "ssm": jnp.zeros((batch_size, inner, config.d_state), jnp.float32),
    }

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    inner, rank, n = d_inner(cfg), dt_rank(cfg), cfg.d_state
    constrain = lambda a: nn.with_logical_constraint(a, ("batch", "length", "inner"))

    xz = Dense(2 * inner, ("embed", "inner"), dtype=dtype, name="in_proj")(x)
    xs, z = constrain(xz[..., :inner]), constrain(xz[..., inner:])
    conv_init = symmetric_uniform(1.0 / math.sqrt(cfg.d_conv))  # PyTorch's Conv1d default.
    conv_w = param(self, "conv_weight", conv_init, (cfg.d_conv, inner), ("conv", "inner"))
    conv_b = param(self, "conv_bias", conv_init, (inner,), ("inner",))
    decoding = state is not None and x.shape[1] == 1
    if decoding:
      xc, conv_state = short_conv_step(xs[:, 0], conv_w, conv_b, state["conv"], "silu")
      xc = xc[:, None]
    else:
      xc, conv_state = short_conv(xs, conv_w, conv_b, None if state is None else state["conv"],
                                  "silu", segment_ids=segment_ids)

    proj = Dense(rank + 2 * n, ("inner", "proj"), dtype=dtype, name="x_proj")(xc)
    dt_in, B, C = proj[..., :rank], proj[..., rank:rank + n], proj[..., rank + n:]
    delta = Dense(inner, ("proj", "inner"), dtype=dtype,
                  kernel_init=symmetric_uniform(cfg.dt_scale / math.sqrt(rank)),
                  name="dt_proj")(dt_in)
    dt_init = dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
    dt_bias = param(self, "dt_bias", dt_init, (inner,), ("inner",))
    A = -jnp.exp(param(self, "A_log", _a_log_init, (inner, n), ("inner", "state")))
    D = param(self, "D", nn.initializers.ones, (inner,), ("inner",))

    scan_args = dict(D=D, delta_bias=dt_bias, delta_softplus=True)
    if decoding:
      y, ssm_state = selective_scan_step(state["ssm"], xc[:, 0], delta[:, 0], A, B[:, 0], C[:, 0],
                                         z=z[:, 0], **scan_args)
      y = y[:, None]
    else:
      y, ssm_state = selective_scan(
          xc, delta, A, B, C, z=z, initial_state=None if state is None else state["ssm"],
          return_final_state=True, implementation=cfg.scan_implementation,
          segment_ids=segment_ids, **scan_args)
    y = constrain(y)
    out = Dense(cfg.d_model, ("inner", "embed"), dtype=dtype,
                kernel_init=fan_in_uniform(1.0 / math.sqrt(self.num_layers)), name="out_proj")(y)
    return out, {"conv": conv_state, "ssm": ssm_state}

