"""What RWKV-6 and RWKV-7 layers share (SPEC 2): the token shift, the depth ratios of their
initialisation, the per-head GroupNorm and the LoRA size rule.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import param

GROUP_NORM_EPS = 64e-5  # 1e-5 * head_size_divisor^2 with the official divisor 8 (SPEC 2.1).


def token_shift(x, previous=None, segment_ids=None):
  """``(xx, last)``: xx_t = x_{t-1} - x_t, and the last token's x (the next call's ``previous``).

  Args:
    x: [B, T, C].
    previous: optional [B, C], the token before x[:, 0] (zeros when None: a sequence start).
    segment_ids: optional [B, T]; x_{t-1} is zero where a new segment starts.
  """
  first = jnp.zeros_like(x[:, :1]) if previous is None else previous[:, None].astype(x.dtype)
  shifted = jnp.concatenate([first, x[:, :-1]], axis=1)
  if segment_ids is not None:
    starts = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], dtype=bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    shifted = jnp.where(starts[..., None], 0, shifted)
  return shifted - x, x[:, -1]


class DepthRatios(NamedTuple):
  """Layer-dependent initialisation constants of the official RWKV code.

  zero_to_one: layer_index / (num_layers - 1) (0 for a single layer).
  one_to_almost_zero: 1 - layer_index / num_layers.
  channel: [C] float32, i / C for channel i.
  """

  zero_to_one: float
  one_to_almost_zero: float
  channel: jax.Array


def depth_ratios(layer_index: int, num_layers: int, width: int) -> DepthRatios:
  return DepthRatios(layer_index / max(num_layers - 1, 1), 1.0 - layer_index / num_layers,
                     jnp.arange(width, dtype=jnp.float32) / width)


def constant(values: jax.Array):
  """An initialiser returning ``values`` (the RWKV curves), ignoring the key."""

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.broadcast_to(values, shape).astype(dtype)

  return init


def lora_rank(given: int | None, factor: float, width: int) -> int:
  """``given``, or the official rule max(32, round(factor sqrt(C) / 32) * 32)."""
  return given or max(32, round(factor * math.sqrt(width) / 32) * 32)


def heads_of(config) -> int:
  """H = d_model / rwkv_head_size; raises ValueError unless it divides."""
  if config.d_model % config.rwkv_head_size:
    raise ValueError(f"d_model ({config.d_model}) must be a multiple of rwkv_head_size "
                     f"({config.rwkv_head_size})")
  return config.d_model // config.rwkv_head_size


class HeadGroupNorm(nn.Module):
  """GroupNorm with one group per head (RWKV's ``ln_x``): [..., H, N] -> same, float32, with
  a per-channel scale and bias of H * N."""

  eps: float = GROUP_NORM_EPS

  @nn.compact
  def __call__(self, x):
    width = x.shape[-2] * x.shape[-1]
    scale = param(self, "scale", nn.initializers.ones, (width,), ("heads",))
    bias = param(self, "bias", nn.initializers.zeros, (width,), ("heads",))
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
                                   + self.eps)
    return x * scale.reshape(x.shape[-2:]) + bias.reshape(x.shape[-2:])
