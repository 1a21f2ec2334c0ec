"""Chunkwise-parallel KDA (SPEC 3.3-3.5) in plain JAX (implementation ``"xla"``).

Per chunk of C tokens with the chunk-local cumulative gate G (Gamma = exp G) and the state S
before the chunk:

    A_kk[r, i] = beta_r sum_d k_rd k_id exp(G_rd - G_id)   (i < r)
    A_qk[r, i] =        sum_d q_rd k_id exp(G_rd - G_id)   (i <= r; q is pre-scaled)
    T = (I + A_kk)^-1,  W = T diag(beta) (K * Gamma),  U = T diag(beta) V
    V~ = U - W S,  O = (Q * Gamma) S + A_qk V~,  S' = diag(Gamma_C) S + (K * exp(G_C - G))^T V~

No cumulative gate is exponentiated unreferenced (SPEC 3.5): diagonal 16 x 16 sub-blocks use the
exact elementwise exp(G_r - G_i) with i <= r, and off-diagonal sub-blocks (sub-chunk a after
sub-chunk b) take the first row n of sub-chunk a as reference:
(X_a * exp(G_a - G_n)) (K_b * exp(G_n - G_b))^T, both exponents <= 0. Every other exponent is a
difference later-minus-earlier, also <= 0.

A ``lax.scan`` walks the chunks. Its body is rematerialised (``jax.checkpoint``), so the backward
keeps one [K, V] state per chunk and recomputes the chunk's intermediates: memory stays bounded
by the inputs plus T / C states. All arithmetic is float32 with the highest matmul precision.

Packed rows (``segment_index``): the state restarts from zero where the index steps up. Inside a
chunk the pair products are masked to the same segment; the incoming state reaches only rows of
the segment that continues from the previous chunk, and only rows of the chunk's last segment
reach the outgoing state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
SUB_CHUNK = 16


def _einsum(spec, *operands):
  return jnp.einsum(spec, *operands, precision=HIGHEST)


def _masked_exp(exponent, mask):
  """exp(exponent) where mask, 0 elsewhere, never evaluating exp of a masked (positive) entry."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, exponent, 0.0)), 0.0)


def _gated_products(q, k, G):
  """A_qk (diagonal included) and sum_d k_rd k_id exp(G_rd - G_id) (strictly lower).

  Args:
    q, k, G: [..., C, K] float32 with C a multiple of SUB_CHUNK.

  Returns:
    (A_qk, A_kk_unscaled), each [..., C, C].
  """
  *lead, C, K = q.shape
  ns = C // SUB_CHUNK
  split = lambda x: x.reshape(*lead, ns, SUB_CHUNK, K)
  q, k, G = split(q), split(k), split(G)

  # Diagonal sub-blocks: exact exp(G_r - G_i) for i <= r (i < r for the key-key product).
  rows = jnp.arange(SUB_CHUNK)
  lower = (rows[:, None] >= rows[None, :])[..., None]
  strict = (rows[:, None] > rows[None, :])[..., None]
  exponent = G[..., :, None, :] - G[..., None, :, :]  # [..., ns, r, i, K]
  qk_diag = _einsum("...rk,...ik,...rik->...ri", q, k, _masked_exp(exponent, lower))
  kk_diag = _einsum("...rk,...ik,...rik->...ri", k, k, _masked_exp(exponent, strict))

  # Off-diagonal sub-blocks a > b, referenced to the first row of sub-chunk a.
  reference = G[..., :1, :]  # [..., ns, 1, K]
  later = (jnp.arange(ns)[:, None] > jnp.arange(ns)[None, :])[:, :, None, None]
  k_to_reference = k[..., None, :, :, :] * _masked_exp(
      reference[..., :, None, :, :] - G[..., None, :, :, :], later)  # [..., a, b, i, K]
  from_reference = jnp.exp(G - reference)  # [..., a, r, K], exponents <= 0
  qk_off = _einsum("...ark,...abik->...abri", q * from_reference, k_to_reference)
  kk_off = _einsum("...ark,...abik->...abri", k * from_reference, k_to_reference)

  def assemble(off, diag):
    blocks = off + jnp.eye(ns)[:, :, None, None] * diag[..., :, None, :, :]
    return jnp.swapaxes(blocks, -3, -2).reshape(*lead, C, C)

  return assemble(qk_off, qk_diag), assemble(kk_off, kk_diag)


def _unit_lower_inverse(A):
  """(I + A)^-1 for strictly lower-triangular A [..., C, C], C a multiple of SUB_CHUNK.

  Forward substitution inside each 16 x 16 diagonal block, then block forward substitution,
  T_ab = -T_aa sum_{b <= j < a} A_aj T_jb (SPEC 3.4's merge). Only matmuls and row updates: no
  LAPACK call (its batched CPU solve can deadlock XLA's thread pool on small machines) and no
  power series (whose alternating terms cancel catastrophically for repeated keys).
  """
  *lead, C, _ = A.shape
  ns = C // SUB_CHUNK
  blocks = jnp.swapaxes(A.reshape(*lead, ns, SUB_CHUNK, ns, SUB_CHUNK), -3, -2)  # [.., a, b, r, i]
  diagonal = jnp.diagonal(blocks, axis1=-4, axis2=-3)  # [..., r, i, a]
  diagonal = jnp.moveaxis(diagonal, -1, -3)  # [..., a, r, i]
  eye = jnp.eye(SUB_CHUNK, dtype=A.dtype)

  def substitute_row(r, inverse):
    # Row r of the block inverse: e_r - sum_{i<r} D[r, i] inverse[i]; D[r, i>=r] is zero.
    coefficients = jax.lax.dynamic_index_in_dim(diagonal, r, axis=-2, keepdims=False)
    row = eye[r] - _einsum("...i,...ij->...j", coefficients, inverse)
    return jax.lax.dynamic_update_index_in_dim(inverse, row, r, axis=-2)

  inverse = jax.lax.fori_loop(1, SUB_CHUNK, substitute_row,
                              jnp.broadcast_to(eye, diagonal.shape))
  T = {}
  for a in range(ns):
    T[a, a] = inverse[..., a, :, :]
    for b in range(a - 1, -1, -1):
      coupled = sum(_einsum("...ri,...ij->...rj", blocks[..., a, j, :, :], T[j, b])
                    for j in range(b, a))
      T[a, b] = -_einsum("...ri,...ij->...rj", T[a, a], coupled)
  zero = jnp.zeros_like(inverse[..., 0, :, :])
  rows = [jnp.concatenate([T.get((a, b), zero) for b in range(ns)], axis=-1) for a in range(ns)]
  return jnp.concatenate(rows, axis=-2)


def _chunk(state, xs):
  """One chunk for every (batch, head). state: [B, HV, K, V]; xs: this chunk's slices."""
  q, k, v, g, beta, same, carried, last = xs  # q, k, g [B, HV, C, K]; v [B, HV, C, V]
  G = jnp.cumsum(g, axis=-2)
  A_qk, A_kk = _gated_products(q, k, G)
  A_qk = A_qk * same
  A_kk = A_kk * same * beta[..., :, None]
  T = _unit_lower_inverse(A_kk)
  gamma = jnp.exp(G)
  W = _einsum("...ri,...ik->...rk", T, beta[..., None] * k * gamma) * carried[..., None]
  U = _einsum("...ri,...iv->...rv", T, beta[..., None] * v)
  pseudo_values = U - _einsum("...rk,...kv->...rv", W, state)
  o = (_einsum("...rk,...kv->...rv", q * gamma * carried[..., None], state)
       + _einsum("...ri,...iv->...rv", A_qk, pseudo_values))
  G_last = G[..., -1:, :]
  k_to_end = k * jnp.exp(G_last - G) * last[..., None]
  state_kept = jnp.exp(G_last[..., 0, :])[..., None] * carried[..., -1, None, None]
  state = state * state_kept + _einsum("...ik,...iv->...kv", k_to_end, pseudo_values)
  return state, o


@functools.partial(jax.jit, static_argnames=("chunk_size", "remat"))
def scan(q, k, v, g, beta, initial_state, segment_index, *, chunk_size: int = 64,
         remat: bool = True):
  """Same contract as ``reference.scan``.

  Args:
    chunk_size: tokens per chunk, a multiple of SUB_CHUNK.
    remat: recompute each chunk in the backward (bounded memory). False keeps every
      intermediate, as plain autodiff would (for memory comparisons).
  """
  B, T, HV, K = q.shape
  num_chunks = -(-T // chunk_size)
  pad = num_chunks * chunk_size - T
  if segment_index is None:
    segment_index = jnp.zeros((B, T), jnp.int32)
  # Padded tokens have k = v = g = beta = 0: they leave the state unchanged.
  segment_index = jnp.pad(segment_index, [(0, 0), (0, pad)], mode="edge")

  def to_chunks(x):
    """[B, T, HV, ...] -> [chunks, B, HV, C, ...]."""
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = jnp.moveaxis(x, 2, 1)
    return jnp.moveaxis(x.reshape(B, HV, num_chunks, chunk_size, *x.shape[3:]), 2, 0)

  seg = jnp.moveaxis(segment_index.reshape(B, num_chunks, chunk_size), 1, 0)[:, :, None]
  before = jnp.concatenate([seg[:1, ..., :1], seg[:-1, ..., -1:]], axis=0)  # index before chunk
  same = (seg[..., :, None] == seg[..., None, :]).astype(jnp.float32)  # [n, B, 1, C, C]
  carried = (seg == before).astype(jnp.float32)  # [n, B, 1, C]
  last = (seg == seg[..., -1:]).astype(jnp.float32)
  xs = tuple(map(to_chunks, (q, k, v, g, beta))) + (same, carried, last)
  body = jax.checkpoint(_chunk) if remat else _chunk
  final_state, o = jax.lax.scan(body, initial_state, xs)
  o = jnp.moveaxis(o, 0, 2).reshape(B, HV, num_chunks * chunk_size, -1)
  return jnp.moveaxis(o, 1, 2)[:, :T], final_state
