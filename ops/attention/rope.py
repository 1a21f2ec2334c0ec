"""Rotary position embeddings (RoPE) with optional YaRN context extension.

Layout: rotate-half (GPT-NeoX, HF LLaMA). Of a head of D dims, dim i and dim i + D/2 form the
pair rotated by the angle ``position * inv_freq[i]``, with ``inv_freq[i] = theta^(-2i/D)``.

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models";
DeepSeek-V2/V3's form). With a factor s > 1 a pair whose wavelength 2 pi / inv_freq[i] fits more
than ``beta_fast`` times into ``original_max_length`` keeps its frequency, one that fits fewer
than ``beta_slow`` times is divided by s (interpolated), and the pairs between blend the two
along a linear ramp. The pair that turns r times in L tokens is
``i(r) = D * ln(L / (2 pi r)) / (2 ln theta)``; the ramp runs from ``floor(i(beta_fast))`` to
``ceil(i(beta_slow))`` (clipped to [0, D - 1]). YaRN also sharpens the softmax: multiply the
attention scale by ``yarn_attention_factor(s) ** 2``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _correction_pair(rotations: float, head_dim: int, theta: float, length: int) -> float:
  """The (fractional) pair index whose frequency turns ``rotations`` times in ``length`` tokens."""
  return head_dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def rope_frequencies(head_dim: int, theta: float = 10000.0, *, yarn_factor: float = 1.0,
                     original_max_length: int = 4096, beta_fast: float = 32.0,
                     beta_slow: float = 1.0) -> jax.Array:
  """The rotation frequency of each pair of dims.

  Args:
    head_dim: D, the rotated dims per head; even.
    theta: the RoPE base.
    yarn_factor: YaRN's context extension factor s >= 1; 1 gives plain RoPE exactly.
    original_max_length: the context length the model was trained with (YaRN only).
    beta_fast, beta_slow: YaRN's rotation counts bounding the ramp (module docstring).

  Returns:
    inv_freq [D // 2] float32.
  """
  if head_dim < 2 or head_dim % 2:
    raise ValueError(f"head_dim must be even and positive, got {head_dim}")
  if yarn_factor < 1:
    raise ValueError(f"yarn_factor must be >= 1 (1 is plain RoPE), got {yarn_factor}")
  inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if yarn_factor > 1:
    low = max(math.floor(_correction_pair(beta_fast, head_dim, theta, original_max_length)), 0)
    high = min(math.ceil(_correction_pair(beta_slow, head_dim, theta, original_max_length)),
               head_dim - 1)
    ramp = np.clip((np.arange(head_dim // 2) - low) / max(high - low, 1e-3), 0.0, 1.0)
    inv_freq = inv_freq * (1 - ramp) + inv_freq / yarn_factor * ramp
  return jnp.asarray(inv_freq, jnp.float32)


def yarn_attention_factor(yarn_factor: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature: ``0.1 * mscale * ln(s) + 1``, or 1.0 when s <= 1.

  The caller multiplies the softmax scale by the square of this factor.
  """
  if yarn_factor <= 1:
    return 1.0
  return 0.1 * mscale * math.log(yarn_factor) + 1.0


def apply_rope(x, positions, inv_freq) -> jax.Array:
  """Rotates each pair (i, i + D/2) of ``x`` by ``positions * inv_freq[i]``, in float32.

  Args:
    x: [B, T, H, D], D even.
    positions: [B, T] integer token positions.
    inv_freq: [D // 2] from ``rope_frequencies``.

  Returns:
    [B, T, H, D] in x's dtype.
  """
  if x.ndim != 4 or x.shape[-1] % 2:
    raise ValueError(f"x must have shape [B, T, H, D] with D even, got {tuple(x.shape)}")
  B, T, _, D = x.shape
  if tuple(positions.shape) != (B, T):
    raise ValueError(f"positions must have shape [B, T] = [{B}, {T}], got "
                     f"{tuple(positions.shape)}")
  if tuple(inv_freq.shape) != (D // 2,):
    raise ValueError(f"inv_freq must have shape [D // 2] = [{D // 2}], got "
                     f"{tuple(inv_freq.shape)}")
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq.astype(jnp.float32)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
