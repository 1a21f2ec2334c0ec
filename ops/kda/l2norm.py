"""The L2 normalisation of q and k over K (SPEC 3.2, fla's ``l2norm``), x / sqrt(sum x^2 + eps),
and its two halves for kernels that normalise as they load: the inverse norm, computed once per
token, and the backward from the normalised input's cotangent."""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-6  # inside the square root


def inverse_norm(x):
  """1 / sqrt(sum x^2 + EPS) over the last axis: [..., K] of any float dtype -> [..., 1]
  float32."""
  x = x.astype(jnp.float32)
  return jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + EPS)


def normalize(x):
  """x / sqrt(sum x^2 + EPS) over the last axis, float32, same shape as x."""
  return x.astype(jnp.float32) * inverse_norm(x)


def normalize_backward(x, inverse, dy):
  """The cotangent of x for y = x * inverse (``inverse = inverse_norm(x)``) from y's cotangent
  dy: inverse (dy - y (y . dy)), float32 [..., K]. Taken whole in float32: the two terms cancel
  where dy lies along y (at K = 1 they cancel exactly), so rounding either first would show."""
  y = x.astype(jnp.float32) * inverse
  dy = dy.astype(jnp.float32)
  return inverse * (dy - y * jnp.sum(y * dy, axis=-1, keepdims=True))
