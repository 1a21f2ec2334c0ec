"""What the fused KDA decode-step kernels share: argument checks and zero padding.

``ops.kda.pallas_gpu_step`` (Triton) and ``ops.kda.pallas_tpu_step`` (Mosaic) take the same
prepared-layout arguments (see ``ops.kda.reference.update``) and pad K and V to what their blocks
need; only the padded sizes differ. Zero padding is exact for the delta rule: padded key rows have
q = k = g = 0 and a zero state row, so they stay zero and add nothing to the reductions over K;
padded value columns have v = 0 and a zero state column, so their residual is 0 and they stay
zero. ``unpad`` slices the results back.
"""

from __future__ import annotations

import jax.numpy as jnp


def check_inputs(state, q, k, v, g, beta):
  """Validates the prepared-layout shapes and the float32 state; returns (B, HV, K, V)."""
  if state.ndim != 4:
    raise ValueError(f"state must have shape [B, HV, K, V], got {tuple(state.shape)}")
  if state.dtype != jnp.float32:
    raise ValueError(f"state must be float32, got {state.dtype}")
  B, HV, K, V = state.shape
  for name, x, shape in (("q", q, (B, HV, K)), ("k", k, (B, HV, K)), ("g", g, (B, HV, K)),
                         ("v", v, (B, HV, V)), ("beta", beta, (B, HV))):
    if tuple(x.shape) != shape:
      raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(x.shape)}")
  return B, HV, K, V


def next_power_of_2(n: int) -> int:
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pad(state, q, k, v, g, *, key_pad: int, value_pad: int):
  """Zero-pads q, k, g along K, v along V and the state along both (no-op for zero pads)."""
  if key_pad:
    pad_k = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, key_pad)))
    q, k, g = pad_k(q), pad_k(k), pad_k(g)
  if value_pad:
    v = jnp.pad(v, ((0, 0), (0, 0), (0, value_pad)))
  if key_pad or value_pad:
    state = jnp.pad(state, ((0, 0), (0, 0), (0, key_pad), (0, value_pad)))
  return state, q, k, v, g


def unpad(o, state, key_dim: int, value_dim: int):
  """Slices the padded output [B, HV, Vp] and state [B, HV, Kp, Vp] back to K and V."""
  if o.shape[-1] != value_dim or state.shape[-2] != key_dim:
    o, state = o[..., :value_dim], state[:, :, :key_dim, :value_dim]
  return o, state
