"""The channel MLP that follows a mixer in each block (SPEC 5): SwiGLU."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import Dense, fan_in_uniform


def d_ff(config) -> int:
  """``config.d_ff``, or 8/3 d_model rounded up to a multiple of 256 (LLaMA's rule) when None."""
  return config.d_ff or 256 * math.ceil(8 * config.d_model / 3 / 256)


class SwiGLU(nn.Module):
  """``down(silu(gate(x)) * up(x))``, no biases: [batch, time, d_model] -> same, in ``dtype``.

  The hidden width is ``features``, or ``d_ff(config)`` when None; ``down``'s initialisation is
  scaled by 1 / sqrt(num_layers), like the mixers' output projections.
  """

  config: Any  # train.config.ModelConfig
  num_layers: int = 1
  features: int | None = None  # The hidden width; None: d_ff(config).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    width = d_ff(cfg) if self.features is None else self.features
    hidden = lambda name: nn.with_logical_constraint(
        Dense(width, ("embed", "mlp"), dtype=dtype, name=name)(x), ("batch", "length", "mlp"))
    h = jax.nn.silu(hidden("gate")) * hidden("up")
    return Dense(cfg.d_model, ("mlp", "embed"), dtype=dtype,
                 kernel_init=fan_in_uniform(1.0 / math.sqrt(self.num_layers)), name="down")(h)
