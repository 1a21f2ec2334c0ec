"""Building blocks shared by the mixers: logically partitioned parameters, initialisers, Dense,
RMSNorm, LayerNorm.

Logical axis names used on parameters and activations (``train.sharding`` maps them to the mesh):
  batch, length      activations' leading axes
  embed              the model width
  vocab              the vocabulary
  inner              a mixer's expanded width (Mamba's d_inner)
  heads              a mixer's heads, or a head-major flattened (heads, head dim) axis (KDA)
  kv                 the per-head key or value dimension
  mlp                the MLP's hidden width
  expert             the experts of a mixture-of-experts layer
  state, conv, proj  small per-mixer axes that are never sharded (proj: low-rank bottlenecks)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def fan_in_uniform(scale: float = 1.0) -> Initializer:
  """U(-scale / sqrt(fan_in), scale / sqrt(fan_in)), PyTorch's default for Linear and Conv."""
  return nn.initializers.variance_scaling(scale**2 / 3.0, "fan_in", "uniform")


def symmetric_uniform(limit: float) -> Initializer:
  """U(-limit, limit)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


def dt_bias_init(dt_min: float, dt_max: float, floor: float) -> Initializer:
  """softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] and at least ``floor`` (SPEC 1.4).

  Mamba's time-step bias; KDA's ``dt_bias`` uses the same recipe (SPEC 3.2).
  """

  def init(key, shape, dtype=jnp.float32):
    log_dt = jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), floor)
    return dt + jnp.log(-jnp.expm1(-dt))

  return init


def param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
          axes: Sequence[str | None]) -> jax.Array:
  """A float32 parameter carrying logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                      jnp.float32)


class Dense(nn.Module):
  """y = x W (+ b), parameters float32, computed in ``dtype``.

  Attributes:
    features: output width.
    axes: logical names of the kernel's (input, output) axes.
    use_bias: whether to add a bias (initialised by ``bias_init``).
  """

  features: int
  axes: tuple[str | None, str | None]
  use_bias: bool = False
  kernel_init: Initializer = fan_in_uniform()
  bias_init: Initializer = nn.initializers.zeros
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = param(self, "kernel", self.kernel_init, (x.shape[-1], self.features), self.axes)
    y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = param(self, "bias", self.bias_init, (self.features,), self.axes[1:])
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """x / rms(x) * scale over the last axis, computed in float32, returned in ``dtype``."""

  eps: float = 1e-5
  axis_name: str = "embed"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,))
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale).astype(self.dtype)


class LayerNorm(nn.Module):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32, returned in
  ``dtype`` (RWKV's block norms)."""

  eps: float = 1e-5
  axis_name: str = "embed"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,))
    bias = param(self, "bias", nn.initializers.zeros, (x.shape[-1],), (self.axis_name,))
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
                                   + self.eps)
    return (x * scale + bias).astype(self.dtype)
