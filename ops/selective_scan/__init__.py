"""Mamba-1 selective scan (SPEC 1.2) in a time-major layout.

Public functions:
  selective_scan(u, delta, A, B, C, ...)    the whole sequence; training and prefill.
  selective_scan_step(state, u, delta, ...) one token; the decode path.

Implementations: ``"reference"`` (token-by-token ``lax.scan``, float32), ``"xla"`` (chunked
associative scan with the state carried across chunks), ``"pallas_gpu"`` (one fused Pallas
Triton kernel for the forward and one for the backward; on CPU it runs in the Pallas
interpreter) and ``"pallas_tpu"`` (the same as Pallas TPU (Mosaic) kernels; off TPU they run in
TPU interpret mode; B and C in groups need a multiple of 128 channels per group).
``None`` picks ``"pallas_gpu"`` on GPU, ``"pallas_tpu"`` on TPU (``"xla"``, with a warning, for
a shape it does not support), ``"reference"`` on CPU, where the token-by-token scan measured
faster (docs/selective_scan.md), and ``"xla"`` elsewhere.
All arithmetic is float32 whatever the input dtype; outputs take ``u``'s dtype and states are
float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ops._validate import check_shape, resolve_implementation
from ops.selective_scan import chunk, pallas_gpu, pallas_tpu, reference

IMPLEMENTATIONS = ("xla", "reference", "pallas_gpu", "pallas_tpu")
DEFAULT_BY_PLATFORM = {"cpu": "reference", "gpu": "pallas_gpu", "tpu": "pallas_tpu"}


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, state, *, with_time: bool, state_name: str):
  """Validates shapes for a sequence (with_time) or one token; returns (channels, state, groups)."""
  lead_names = ["batch", "time"] if with_time else ["batch"]
  layout = lambda *names: "[" + ", ".join(lead_names + list(names)) + "]"
  if u.ndim != len(lead_names) + 1:
    raise ValueError(f"u must have shape {layout('channels')}, got {tuple(u.shape)}")
  lead, channels = tuple(u.shape[:-1]), u.shape[-1]
  check_shape("delta", delta, u.shape, layout("channels"))
  if z is not None:
    check_shape("z", z, u.shape, layout("channels"))
  check_shape("A", A, (channels, None), "[channels, state]")
  state_size = A.shape[1]
  if B.ndim not in (len(lead) + 1, len(lead) + 2):
    raise ValueError(f"B must have shape {layout('state')} or {layout('groups', 'state')}, got "
                     f"{tuple(B.shape)}")
  grouped = B.ndim == len(lead) + 2
  groups = B.shape[len(lead)] if grouped else 1
  expected = lead + ((groups,) if grouped else ()) + (state_size,)
  for name, x in (("B", B), ("C", C)):
    check_shape(name, x, expected, layout("groups", "state") if grouped else layout("state"))
  if channels % groups:
    raise ValueError(f"B: groups ({groups}) must divide channels ({channels})")
  for name, x in (("D", D), ("delta_bias", delta_bias)):
    if x is not None:
      check_shape(name, x, (channels,), "[channels]")
  if state is not None:
    check_shape(state_name, state, (lead[0], channels, state_size), "[batch, channels, state]")
  return channels, state_size, groups


def _discretisation_step(delta, delta_bias, delta_softplus):
  delta = delta.astype(jnp.float32)
  if delta_bias is not None:
    delta = delta + delta_bias.astype(jnp.float32)
  return jax.nn.softplus(delta) if delta_softplus else delta


def _readout(y, u, D, z):
  """out = y + D u, gated by SiLU(z); float32 in, u's dtype out."""
  if D is not None:
    y = y + D.astype(jnp.float32) * u.astype(jnp.float32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(jnp.float32))
  return y.astype(u.dtype)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, implementation=None,
                   segment_ids=None, chunk_size=None):
  """Selective scan over a sequence.

  Args:
    u: [batch, time, channels] input, any float dtype.
    delta: [batch, time, channels] step size before ``delta_bias`` and softplus.
    A: [channels, state] continuous-time transition (negative for a stable scan).
    B, C: [batch, time, state], or [batch, time, groups, state] where channel d uses group
      ``d // (channels // groups)``.
    D: optional [channels] skip connection.
    z: optional [batch, time, channels] gate; the output is multiplied by SiLU(z).
    delta_bias: optional [channels], added to delta.
    delta_softplus: apply softplus to delta (after the bias).
    initial_state: optional [batch, channels, state] float32; zeros when None.
    return_final_state: also return the state after the last token.
    implementation: None, "reference", "xla", "pallas_gpu" or "pallas_tpu".
    segment_ids: optional [batch, time] integers of a packed batch; the state restarts from
      zero wherever the id changes, so no token sees another segment.
    chunk_size: tokens per chunk of the "xla" form (default ``chunk.DEFAULT_CHUNK_SIZE``).

  Returns:
    out [batch, time, channels] in u's dtype, and with ``return_final_state`` the final state
    [batch, channels, state] float32.
  """
  channels, state_size, groups = _check_inputs(
      u, delta, A, B, C, D, z, delta_bias, initial_state, with_time=True,
      state_name="initial_state")
  batch, time = u.shape[:2]
  if segment_ids is not None:
    check_shape("segment_ids", segment_ids, (batch, time), "[batch, time]")
  implementation = resolve_implementation(
      implementation, IMPLEMENTATIONS, DEFAULT_BY_PLATFORM,
      unsupported={"pallas_tpu": pallas_tpu.unsupported(channels, groups, state_size,
                                                        itemsize=u.dtype.itemsize)})
  if chunk_size is not None and (implementation != "xla" or chunk_size < 1):
    raise ValueError(f"chunk_size applies to implementation 'xla' only and must be >= 1, got "
                     f"chunk_size={chunk_size} with implementation={implementation!r}")

  keep = None
  if segment_ids is not None:
    starts = segment_ids[:, 1:] != segment_ids[:, :-1]
    keep = jnp.ones((batch, time), jnp.float32).at[:, 1:].set(jnp.where(starts, 0.0, 1.0))

  if implementation in ("pallas_gpu", "pallas_tpu"):
    kernels = pallas_gpu if implementation == "pallas_gpu" else pallas_tpu
    out, final_state = kernels.selective_scan(
        u, delta, A, B.reshape(batch, time, groups, state_size),
        C.reshape(batch, time, groups, state_size), D, z, delta_bias, delta_softplus, keep,
        initial_state)
    return (out, final_state) if return_final_state else out

  grouped = (batch, time, groups, channels // groups)
  delta_f = _discretisation_step(delta, delta_bias, delta_softplus).reshape(grouped)
  u_g = u.astype(jnp.float32).reshape(grouped)
  B_g, C_g = (x.astype(jnp.float32).reshape(batch, time, groups, state_size) for x in (B, C))
  A_g = A.astype(jnp.float32).reshape(groups, channels // groups, state_size)
  if keep is None:
    keep = jnp.ones((batch, time), jnp.float32)
  if initial_state is None:
    h0 = jnp.zeros((batch, groups, channels // groups, state_size), jnp.float32)
  else:
    h0 = initial_state.astype(jnp.float32).reshape(batch, groups, channels // groups, state_size)

  if implementation == "reference":
    y, final_state = reference.scan(u_g, delta_f, A_g, B_g, C_g, keep, h0)
  else:
    y, final_state = chunk.scan(u_g, delta_f, A_g, B_g, C_g, keep, h0,
                                chunk_size=chunk_size or chunk.DEFAULT_CHUNK_SIZE)
  out = _readout(y.reshape(batch, time, channels), u, D, z)
  if return_final_state:
    return out, final_state.reshape(batch, channels, state_size)
  return out


def selective_scan_step(state, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                        delta_softplus=False):
  """Advances the scan by one token (the decode path).

  Args:
    state: [batch, channels, state] float32.
    u, delta, z: [batch, channels].
    A: [channels, state].
    B, C: [batch, state] or [batch, groups, state].
    D, delta_bias, delta_softplus: as in ``selective_scan``.

  Returns:
    (out [batch, channels] in u's dtype, new state [batch, channels, state] float32).
  """
  channels, state_size, groups = _check_inputs(
      u, delta, A, B, C, D, z, delta_bias, state, with_time=False, state_name="state")
  batch = u.shape[0]
  grouped = (batch, groups, channels // groups)
  y, new_state = reference.update(
      state.astype(jnp.float32).reshape(grouped + (state_size,)),
      u.astype(jnp.float32).reshape(grouped),
      _discretisation_step(delta, delta_bias, delta_softplus).reshape(grouped),
      A.astype(jnp.float32).reshape(groups, channels // groups, state_size),
      B.astype(jnp.float32).reshape(batch, groups, state_size),
      C.astype(jnp.float32).reshape(batch, groups, state_size))
  return (_readout(y.reshape(batch, channels), u, D, z),
          new_state.reshape(batch, channels, state_size))
