"""RWKV-6 (Finch) wkv: linear attention with a channel-wise decay and a current-token bonus.

Public functions (fla's names and layouts, as ``chunk_rwkv6``: activations [B, T, H, dim],
states [B, H, K, V] float32, the decay in log space):

  rwkv6(r, k, v, w, u, ...)               a sequence; training and prefill.
  rwkv6_step(r, k, v, w, u, state, ...)   one token; the decode path.

Per head, with state S in R^{K x V}, log decay w_t = -exp(w_raw) <= 0, bonus u in R^K and
scale s (SPEC 2.1):

    o_t = (s r_t)^T (S_{t-1} + diag(u) k_t v_t^T),   S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T

The output reads the state before token t's decay and write; the bonus applies only to the
current token. Implementations: ``"reference"`` (token-by-token ``lax.scan``) and ``"xla"``
(chunkwise gated-linear-attention form, ``ops.rwkv6.chunk``, which raises decays below -20 to
-20 for float32 accuracy); ``None`` picks ``"xla"``. Arithmetic is float32 whatever the input
dtype; ``o`` takes v's dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

from ops._chunked import SUB_CHUNK
from ops._validate import check_shape, resolve_implementation
from ops.kda import _is_concrete, _segment_index
from ops.rwkv6 import chunk, reference

IMPLEMENTATIONS = ("xla", "reference")


def _check(r, k, v, w, u, state, state_name: str, layout: list[str]):
  """Validates the shapes shared by ``rwkv6`` and ``rwkv6_step``; returns (H, K, V)."""
  fmt = lambda *names: "[" + ", ".join(layout + list(names)) + "]"
  rank = len(layout) + 2
  if r.ndim != rank:
    raise ValueError(f"r must have shape {fmt('H', 'K')}, got {tuple(r.shape)}")
  lead = tuple(r.shape[:-2])
  H, K = r.shape[-2:]
  check_shape("k", k, lead + (H, K), fmt("H", "K"))
  check_shape("w", w, lead + (H, K), fmt("H", "K"))
  check_shape("v", v, lead + (H, None), fmt("H", "V"))
  V = v.shape[-1]
  check_shape("u", u, (H, K), "[H, K]")
  if _is_concrete(w) and bool(jnp.any(w > 0)):
    raise ValueError("w must be a log-space decay (<= 0 everywhere, fla's -exp(w_raw)); got "
                     f"positive entries (max {float(jnp.max(w)):.3g})")
  if state is not None:
    if state.dtype != jnp.float32:
      raise ValueError(f"{state_name} must be float32, got {state.dtype}")
    check_shape(state_name, state, (lead[0], H, K, V), "[B, H, K, V]")
  return H, K, V


def _prepare(r, k, v, w, u, scale):
  """float32 inputs with r scaled."""
  f32 = lambda x: x.astype(jnp.float32)
  return f32(r) * scale, f32(k), f32(v), f32(w), f32(u)


def rwkv6(r, k, v, w, u, *, scale=1.0, initial_state=None, return_final_state=False,
          segment_ids=None, implementation=None, chunk_size=64):
  """The RWKV-6 wkv over sequences.

  Args:
    r, k: [B, T, H, K] receptance and key.
    v: [B, T, H, V].
    w: [B, T, H, K] log-space decay, <= 0 (fla's ``-exp(w_raw)``).
    u: [H, K] the current-token bonus (``time_faaaa``).
    scale: the receptance scale (the RWKV-6 layer uses 1.0).
    initial_state: optional [B, H, K, V] float32; zeros when None.
    return_final_state: also return the state after the last token of each row.
    segment_ids: optional [B, T] integers of packed rows; the state restarts from zero wherever
      the id changes; initial and final states belong to each row's first and last segment.
    implementation: None, "reference" or "xla".
    chunk_size: tokens per chunk of "xla", a positive multiple of 16.

  Returns:
    (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32 or None).
  """
  implementation = resolve_implementation(implementation, IMPLEMENTATIONS)
  H, K, V = _check(r, k, v, w, u, initial_state, "initial_state", ["B", "T"])
  B, T = r.shape[:2]
  if chunk_size < 1 or chunk_size % SUB_CHUNK:
    raise ValueError(f"chunk_size must be a positive multiple of {SUB_CHUNK}, got {chunk_size}")
  if segment_ids is not None:
    check_shape("segment_ids", segment_ids, (B, T), "[B, T]")

  inputs = _prepare(r, k, v, w, u, scale)
  h0 = jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None else initial_state
  index = None if segment_ids is None else _segment_index(segment_ids)
  if implementation == "reference":
    o, final_state = reference.scan(*inputs, h0, index)
  else:
    o, final_state = chunk.scan(*inputs, h0, index, chunk_size=chunk_size)
  return o.astype(v.dtype), final_state if return_final_state else None


def rwkv6_step(r, k, v, w, u, state=None, *, scale=1.0):
  """One token of ``rwkv6`` (the decode path).

  Args:
    r, k, w: [B, H, K]; v: [B, H, V]; u: [H, K].
    state: [B, H, K, V] float32; zeros when None.

  Returns:
    (o [B, H, V] in v's dtype, new state [B, H, K, V] float32).
  """
  H, K, V = _check(r, k, v, w, u, state, "state", ["B"])
  if state is None:
    state = jnp.zeros((r.shape[0], H, K, V), jnp.float32)
  o, state = reference.update(state, *_prepare(r, k, v, w, u, scale))
  return o.astype(v.dtype), state
