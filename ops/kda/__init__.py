"""Kimi Delta Attention: the delta rule with a channel-wise gate (SPEC 3).

Public functions (fla's names and layouts: activations [B, T, heads, dim], states
[N, HV, K, V] float32, gates in log space):

  kda(q, k, v, g, beta, ...)               a sequence; training and prefill.
  kda_step(q, k, v, g, beta, state, ...)   one token; the decode path.
  gated_delta_rule(q, k, v, g, beta, ...)  Gated DeltaNet: one gate value per head.
  kda_gate(g_raw, A_log, dt_bias, ...)     the layer's gate (SPEC 3.2), in log space.

Per value head, with state S in R^{K x V}, ``alpha_t = exp(g_t)`` and scale s:

    S_t = (I - beta_t k_t k_t^T) diag(alpha_t) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T (s q_t)

Implementations: ``"reference"`` (token-by-token ``lax.scan``), ``"xla"`` (chunkwise WY /
UT-transform form, ``ops.kda.chunk``), ``"pallas_gpu"`` and ``"pallas_tpu"`` (the same chunkwise
algorithm as Pallas Triton and Mosaic TPU kernels, ``ops.kda.pallas_gpu`` and
``ops.kda.pallas_tpu``; interpret mode off their hardware). ``None`` picks the platform's kernels
on a GPU or TPU and ``"xla"`` elsewhere. Arithmetic is float32 whatever the input dtype (the
kernels' matrix products use TF32 passes on the GPU, see ``ops.kda.pallas_gpu``); ``o`` takes v's
dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ops._validate import check_shape, resolve_implementation
from ops.kda import (chunk, l2norm, pallas_gpu, pallas_gpu_step, pallas_tpu, pallas_tpu_step,
                     reference)

IMPLEMENTATIONS = ("xla", "reference", "pallas_gpu", "pallas_tpu")
STEP_IMPLEMENTATIONS = ("reference", "pallas_gpu", "pallas_tpu")
STEP_UPDATES = {"reference": reference.update, "pallas_gpu": pallas_gpu_step.update,
                "pallas_tpu": pallas_tpu_step.update}
DEFAULT_BY_PLATFORM = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}
KERNELS = {"pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check(q, k, v, g, beta, state, state_name: str, layout: list[str]):
  """Validates the shapes shared by ``kda`` and ``kda_step``; returns (H, HV, K, V)."""
  fmt = lambda *names: "[" + ", ".join(layout + list(names)) + "]"
  rank = len(layout) + 2
  if q.ndim != rank:
    raise ValueError(f"q must have shape {fmt('H', 'K')}, got {tuple(q.shape)}")
  lead = tuple(q.shape[:-2])
  H, K = q.shape[-2:]
  check_shape("k", k, lead + (H, K), fmt("H", "K"))
  if v.ndim != rank or tuple(v.shape[:-2]) != lead:
    raise ValueError(f"v must have shape {fmt('HV', 'V')} with leading axes {lead}, got "
                     f"{tuple(v.shape)}")
  HV, V = v.shape[-2:]
  if HV % H:
    raise ValueError(f"v's heads (HV={HV}) must be a multiple of q and k's heads (H={H})")
  check_shape("g", g, lead + (HV, K), fmt("HV", "K"))
  check_shape("beta", beta, lead + (HV,), fmt("HV"))
  if _is_concrete(g) and bool(jnp.any(g > 0)):
    raise ValueError("g must be a log-space decay (<= 0 everywhere); got positive entries "
                     f"(max {float(jnp.max(g)):.3g}). Use kda_gate to map raw logits.")
  if state is not None:
    if state.dtype != jnp.float32:
      raise ValueError(f"{state_name} must be float32, got {state.dtype}")
    if state.ndim != 4 or tuple(state.shape[1:]) != (HV, K, V):
      raise ValueError(f"{state_name} must have shape [N, HV, K, V] = [N, {HV}, {K}, {V}], got "
                       f"{tuple(state.shape)}")
  return H, HV, K, V


def _prepare(q, k, v, g, beta, H, HV, K, scale, use_qk_l2norm_in_kernel, *, for_kernel=False):
  """q, k repeated to the value heads (head axis -2), L2-normalised if asked, q scaled; every
  input float32.

  ``for_kernel``: each input keeps its dtype and q, k are neither normalised nor scaled (the
  Pallas kernels take ``use_qk_l2norm_in_kernel`` and the scale themselves).
  """
  if for_kernel:
    q, k = (jnp.repeat(x, HV // H, axis=-2) for x in (q, k))
    return q, k, v, g, beta
  q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
  if use_qk_l2norm_in_kernel:
    q32, k32 = l2norm.normalize(q32), l2norm.normalize(k32)
  q, k = (jnp.repeat(x, HV // H, axis=-2) for x in (q32 * _scale(scale, K), k32))
  return tuple(x.astype(jnp.float32) for x in (q, k, v, g, beta))


def _scale(scale, K):
  return K ** -0.5 if scale is None else scale


def _segment_index(segment_ids):
  """Non-decreasing index per row that steps up wherever the id changes."""
  changes = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
  first = jnp.zeros((segment_ids.shape[0], 1), jnp.int32)
  return jnp.concatenate([first, jnp.cumsum(changes, axis=1)], axis=1)


def _sequence_layout(cu_seqlens, time: int):
  """Gather indices [N, T_max] of a packed row and the validity mask, from concrete offsets."""
  if not _is_concrete(cu_seqlens):
    raise ValueError("cu_seqlens must be concrete (a NumPy array or a list), not traced; "
                     "pass segment_ids inside jit")
  offsets = np.asarray(cu_seqlens)
  if (offsets.ndim != 1 or offsets.size < 2 or offsets[0] != 0 or offsets[-1] != time
      or np.any(np.diff(offsets) < 0)):
    raise ValueError(f"cu_seqlens must be non-decreasing offsets [0, ..., T={time}], got "
                     f"{offsets.tolist()}")
  lengths = np.diff(offsets)
  positions = np.arange(max(int(lengths.max()), 1))
  valid = positions[None, :] < lengths[:, None]
  index = np.where(valid, offsets[:-1, None] + positions[None, :], 0)
  return index, valid


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, return_final_state=False,
        segment_ids=None, cu_seqlens=None, use_qk_l2norm_in_kernel=False, implementation=None,
        chunk_size=64):
  """KDA over sequences.

  Args:
    q, k: [B, T, H, K].
    v: [B, T, HV, V], HV a multiple of H; value head j reads q/k head j // (HV // H).
    g: [B, T, HV, K] log-space decay, <= 0.
    beta: [B, T, HV] write strength (post-sigmoid).
    scale: the query scale; K ** -0.5 when None.
    initial_state: optional [N, HV, K, V] float32 (N = B, or the number of sequences with
      cu_seqlens); zeros when None.
    return_final_state: also return the state after the last token of each row / sequence.
    segment_ids: optional [B, T] integers of packed rows; the state restarts from zero wherever
      the id changes; initial and final states belong to each row's first and last segment.
    cu_seqlens: optional concrete [N + 1] offsets of N sequences packed in one row (B = 1);
      each sequence runs alone from its own initial state and returns its own final state.
    use_qk_l2norm_in_kernel: L2-normalise q and k over K first (x / sqrt(sum x^2 + 1e-6),
      ``ops.kda.l2norm``); the GPU kernels do it as they load q and k, from a float32 inverse
      norm per token, the other forms in XLA before the op.
    implementation: None, "reference", "xla", "pallas_gpu" or "pallas_tpu".
    chunk_size: tokens per chunk of "xla" (a positive multiple of 16) and of the Pallas kernels
      (a power of two >= 16).

  Returns:
    (o [B, T, HV, V] in v's dtype, final state [N, HV, K, V] float32 or None).
  """
  if chunk_size < 1 or chunk_size % chunk.SUB_CHUNK:
    raise ValueError(f"chunk_size must be a positive multiple of {chunk.SUB_CHUNK}, got "
                     f"{chunk_size}")
  implementation = resolve_implementation(
      implementation, IMPLEMENTATIONS, DEFAULT_BY_PLATFORM,
      unsupported={name: kernels.unsupported(chunk_size, q.shape[-1])
                   for name, kernels in KERNELS.items()})
  H, HV, K, V = _check(q, k, v, g, beta, initial_state, "initial_state", ["B", "T"])
  B, T = q.shape[:2]
  if segment_ids is not None and cu_seqlens is not None:
    raise ValueError("give segment_ids or cu_seqlens, not both")
  if cu_seqlens is not None:
    if B != 1:
      raise ValueError(f"cu_seqlens needs a batch of one packed row (B = 1), got B = {B}")
    index, valid = _sequence_layout(cu_seqlens, T)
    num_sequences = index.shape[0]
    if initial_state is not None and initial_state.shape[0] != num_sequences:
      raise ValueError(f"initial_state must hold one state per sequence ({num_sequences}), "
                       f"got {initial_state.shape[0]}")
    mask = lambda x: x[0][index] * valid.reshape(valid.shape + (1,) * (x.ndim - 2))
    o, final_state = kda(*map(mask, (q, k, v, g, beta)), scale=scale,
                         initial_state=initial_state, return_final_state=True,
                         use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                         implementation=implementation, chunk_size=chunk_size)
    o = o[valid][None]
    return o, final_state if return_final_state else None
  if initial_state is not None and initial_state.shape[0] != B:
    raise ValueError(f"initial_state must have shape [B={B}, HV, K, V], got "
                     f"{tuple(initial_state.shape)}")
  if segment_ids is not None:
    check_shape("segment_ids", segment_ids, (B, T), "[B, T]")

  h0 = (jnp.zeros((B, HV, K, V), jnp.float32) if initial_state is None else initial_state)
  index = None if segment_ids is None else _segment_index(segment_ids)
  if implementation in KERNELS:
    inputs = _prepare(q, k, v, g, beta, H, HV, K, scale, use_qk_l2norm_in_kernel,
                      for_kernel=True)
    o, final_state = KERNELS[implementation].scan(
        *inputs, h0, index, scale=_scale(scale, K), chunk_size=chunk_size,
        l2_normalize_qk=use_qk_l2norm_in_kernel)
    return o, final_state if return_final_state else None
  inputs = _prepare(q, k, v, g, beta, H, HV, K, scale, use_qk_l2norm_in_kernel)
  if implementation == "reference":
    o, final_state = reference.scan(*inputs, h0, index)
  else:
    o, final_state = chunk.scan(*inputs, h0, index, chunk_size=chunk_size)
  return o.astype(v.dtype), final_state if return_final_state else None


def gated_delta_rule(q, k, v, g, beta, **kwargs):
  """Gated DeltaNet: ``kda`` with one gate value per head, g [B, T, HV], broadcast over K."""
  if g.ndim != 3:
    raise ValueError(f"g must have shape [B, T, HV] (one gate per head), got {tuple(g.shape)}")
  return kda(q, k, v, jnp.broadcast_to(g[..., None], g.shape + (q.shape[-1],)), beta, **kwargs)


def kda_step(q, k, v, g, beta, state=None, *, scale=None, use_qk_l2norm_in_kernel=False,
             implementation=None):
  """One token of ``kda`` (the decode path).

  Args:
    q, k: [B, H, K]; v: [B, HV, V]; g: [B, HV, K]; beta: [B, HV].
    state: [B, HV, K, V] float32; zeros when None.
    implementation: None, "reference" (``ops.kda.reference.update``), "pallas_gpu" or
      "pallas_tpu" (one fused kernel, ``ops.kda.pallas_gpu_step`` / ``pallas_tpu_step``;
      interpret mode off their hardware). None picks the platform's kernel on a GPU or TPU and
      "reference" elsewhere.

  Returns:
    (o [B, HV, V] in v's dtype, new state [B, HV, K, V] float32).
  """
  H, HV, K, V = _check(q, k, v, g, beta, state, "state", ["B"])
  if state is None:
    state = jnp.zeros((q.shape[0], HV, K, V), jnp.float32)
  elif state.shape[0] != q.shape[0]:
    raise ValueError(f"state must have shape [B={q.shape[0]}, HV, K, V], got {tuple(state.shape)}")
  implementation = resolve_implementation(implementation, STEP_IMPLEMENTATIONS,
                                          DEFAULT_BY_PLATFORM)
  inputs = _prepare(q, k, v, g, beta, H, HV, K, scale, use_qk_l2norm_in_kernel)
  o, state = STEP_UPDATES[implementation](state, *inputs)
  return o.astype(v.dtype), state


def kda_gate(g_raw, A_log, dt_bias=None, lower_bound=None):
  """The KDA layer's log-space gate (SPEC 3.2), float32, same shape as g_raw [..., HV, K].

  Without ``lower_bound``: ``g = -exp(A_log[h]) * softplus(g_raw + dt_bias[h, k])`` (<= 0).
  With ``lower_bound`` in [-5, 0) (the bounded "safe" gate):
  ``g = lower_bound * sigmoid(exp(A_log[h]) * (g_raw + dt_bias[h, k]))``, in [lower_bound, 0).

  Args:
    g_raw: [..., HV, K] logits.
    A_log: [HV] per-head log rate.
    dt_bias: optional [HV * K] per-channel bias (fla's flat layout).
    lower_bound: optional float in [-5, 0).
  """
  if g_raw.ndim < 2:
    raise ValueError(f"g_raw must have shape [..., HV, K], got {tuple(g_raw.shape)}")
  HV, K = g_raw.shape[-2:]
  check_shape("A_log", A_log, (HV,), "[HV]")
  x = g_raw.astype(jnp.float32)
  if dt_bias is not None:
    check_shape("dt_bias", dt_bias, (HV * K,), "[HV * K]")
    x = x + dt_bias.astype(jnp.float32).reshape(HV, K)
  rate = jnp.exp(A_log.astype(jnp.float32))[:, None]
  if lower_bound is None:
    return -rate * jax.nn.softplus(x)
  if not -5.0 <= lower_bound < 0.0:
    raise ValueError(f"lower_bound must be in [-5, 0), got {lower_bound}")
  return lower_bound * jax.nn.sigmoid(rate * x)
