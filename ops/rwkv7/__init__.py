"""RWKV-7 (Goose): the diagonal-plus-low-rank state update (SPEC 2.5).

Public functions (fla's names and layouts: activations [B, T, H, dim], states [B, H, K, V]
float32, key-major, w as the log decay):

  rwkv7(r, w, k, v, a, b, ...)              a sequence; training and prefill.
  rwkv7_step(r, w, k, v, a, b, state, ...)  one token; the decode path.

Per head, with state S in R^{K x V} and scale s:

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T,   o_t = S_t^T (s r_t)

The low-rank term acts on the undecayed S_{t-1}; the output reads the updated state. The RWKV-7
layer passes a = -kappa_hat, b = kappa_hat * a_icl and s = 1. The official code keeps the
value-major transpose S^T (SPEC 2.5).

Implementations: ``"reference"`` (token-by-token ``lax.scan``), ``"xla"`` (chunkwise
generalised delta rule on ``ops._chunked``, ``ops.rwkv7.chunk``), ``"pallas_gpu"`` and
``"pallas_tpu"`` (the same chunkwise algorithm as Pallas Triton and Mosaic TPU kernels with a
hand-written backward, ``ops.rwkv7.pallas_gpu`` and ``ops.rwkv7.pallas_tpu``, on KDA's kernel
machinery; interpret mode off their hardware). ``None`` picks the platform's kernels on a GPU or
TPU and ``"xla"`` elsewhere, or ``"xla"`` with a warning for a chunk size the kernels cannot run.
Arithmetic is float32 whatever the input dtype (the kernels read their inputs in their own dtype
and, on hardware, give bfloat16 inputs bfloat16 matrix-product operands with float32
accumulation); ``o`` takes v's dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

from ops._validate import check_shape, resolve_implementation
from ops.kda import _is_concrete, _segment_index
from ops.rwkv7 import chunk, pallas_gpu, pallas_tpu, reference

IMPLEMENTATIONS = ("xla", "reference", "pallas_gpu", "pallas_tpu")
DEFAULT_BY_PLATFORM = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}
KERNELS = {"pallas_gpu": pallas_gpu, "pallas_tpu": pallas_tpu}


def _check(r, w, k, v, a, b, state, state_name: str, layout: list[str]):
  """Validates the arguments shared by ``rwkv7`` and ``rwkv7_step``; returns (H, K, V)."""
  fmt = lambda last: "[" + ", ".join(layout + ["H", last]) + "]"
  arrays = dict(r=r, w=w, k=k, v=v, a=a, b=b)
  for name, x in arrays.items():
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating-point array, got {x.dtype}")
  if r.ndim != len(layout) + 2:
    raise ValueError(f"r must have shape {fmt('K')}, got {tuple(r.shape)}")
  lead = tuple(r.shape[:-1])
  for name in ("w", "k", "a", "b"):
    check_shape(name, arrays[name], r.shape, fmt("K"))
  check_shape("v", v, lead + (None,), fmt("V"))
  H, K, V = r.shape[-2], r.shape[-1], v.shape[-1]
  if _is_concrete(w) and bool(jnp.any(w > 0)):
    raise ValueError("w must be a log-space decay (<= 0 everywhere); got positive entries "
                     f"(max {float(jnp.max(w)):.3g})")
  if state is not None:
    if state.dtype != jnp.float32:
      raise ValueError(f"{state_name} must be float32, got {state.dtype}")
    check_shape(state_name, state, (r.shape[0], H, K, V), "[B, H, K, V]")
  return H, K, V


def _prepare(r, w, k, v, a, b, scale):
  """float32 inputs with r scaled (the plain forms' inputs; the kernels read the arrays as
  given and apply the scale themselves)."""
  r, w, k, v, a, b = (x.astype(jnp.float32) for x in (r, w, k, v, a, b))
  return r * scale, w, k, v, a, b


def rwkv7(r, w, k, v, a, b, *, scale=1.0, initial_state=None, return_final_state=False,
          segment_ids=None, implementation=None, chunk_size=64):
  """RWKV-7 over sequences.

  Args:
    r, k: [B, T, H, K] receptance and (replacement) key.
    w: [B, T, H, K] log-space decay, <= 0 (RWKV-7's layer gives -0.6065 sigmoid(.)).
    v: [B, T, H, V].
    a, b: [B, T, H, K] the low-rank term b (a^T S); the layer's -kappa_hat and
      kappa_hat * a_icl.
    scale: the receptance scale (1 in RWKV-7).
    initial_state: optional [B, H, K, V] float32; zeros when None.
    return_final_state: also return the state after the last token of each row.
    segment_ids: optional [B, T] integers of packed rows; the state restarts from zero wherever
      the id changes; initial and final states belong to each row's first and last segment.
    implementation: None, "reference", "xla", "pallas_gpu" or "pallas_tpu".
    chunk_size: tokens per chunk of "xla" (a positive multiple of 16) and of the Pallas kernels
      (a power of two >= 16).

  Returns:
    (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32 or None).
  """
  if chunk_size < 1 or chunk_size % chunk.SUB_CHUNK:
    raise ValueError(f"chunk_size must be a positive multiple of {chunk.SUB_CHUNK}, got "
                     f"{chunk_size}")
  implementation = resolve_implementation(
      implementation, IMPLEMENTATIONS, DEFAULT_BY_PLATFORM,
      unsupported={name: kernels.unsupported(chunk_size, r.shape[-1])
                   for name, kernels in KERNELS.items()})
  H, K, V = _check(r, w, k, v, a, b, initial_state, "initial_state", ["B", "T"])
  B, T = r.shape[:2]
  if segment_ids is not None:
    check_shape("segment_ids", segment_ids, (B, T), "[B, T]")
  h0 = jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None else initial_state
  index = None if segment_ids is None else _segment_index(segment_ids)
  if implementation in KERNELS:
    o, final_state = KERNELS[implementation].scan(r, w, k, v, a, b, h0, index, scale=scale,
                                                  chunk_size=chunk_size)
    return o, final_state if return_final_state else None
  inputs = _prepare(r, w, k, v, a, b, scale)
  if implementation == "reference":
    o, final_state = reference.scan(*inputs, h0, index)
  else:
    o, final_state = chunk.scan(*inputs, h0, index, chunk_size=chunk_size)
  return o.astype(v.dtype), final_state if return_final_state else None


def rwkv7_step(r, w, k, v, a, b, state=None, *, scale=1.0):
  """One token of ``rwkv7`` (the decode path).

  Args:
    r, w, k, a, b: [B, H, K]; v: [B, H, V].
    state: [B, H, K, V] float32; zeros when None.

  Returns:
    (o [B, H, V] in v's dtype, new state [B, H, K, V] float32).
  """
  H, K, V = _check(r, w, k, v, a, b, state, "state", ["B"])
  if state is None:
    state = jnp.zeros((r.shape[0], H, K, V), jnp.float32)
  o, state = reference.update(state, *_prepare(r, w, k, v, a, b, scale))
  return o.astype(v.dtype), state
