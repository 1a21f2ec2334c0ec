"""Chunkwise machinery shared by the gated linear recurrences (KDA, RWKV-6, RWKV-7).

Every chunkwise form here splits the sequence into chunks of C tokens, runs a ``lax.scan`` over
the chunks carrying the state [B, H, K, V], and inside a chunk works with the chunk-local
cumulative log decay G (per channel, float32). Three pieces are common:

* ``gated_products``: the pair products sum_d x_rd y_id exp(G_row[r, d] - G_col[i, d]) for
  i <= r (or i < r), computed so that no cumulative gate is exponentiated unreferenced (SPEC 3.5):
  diagonal 16 x 16 sub-blocks use the exact elementwise exponent, off-diagonal sub-blocks
  (sub-chunk a after sub-chunk b) reference the first row n of sub-chunk a,
  (x_a * exp(G_row_a - G_row_n)) (y_b * exp(G_row_n - G_col_b))^T. Cumulative log decays only
  fall with time, so when every kept pair has its row gate taken at or after its column gate
  (G_row <= G_col) every exponent is <= 0.
* ``unit_lower_inverse``: (I + A)^-1 for a strictly lower-triangular A by forward substitution.
* ``chunk_scan``: chunking, padding, the packed-row masks and the rematerialised scan.

``token_scan`` runs the references' one-token updates over time with the same packed-row resets.

All arithmetic is float32 with the highest matmul precision.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
SUB_CHUNK = 16


def einsum(spec, *operands):
  return jnp.einsum(spec, *operands, precision=HIGHEST)


def masked_exp(exponent, mask):
  """exp(exponent) where mask, 0 elsewhere, never evaluating exp of a masked (positive) entry."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, exponent, 0.0)), 0.0)


def gated_products(x, y, G_row, G_col, *, strict: bool):
  """P[r, i] = sum_d x_rd y_id exp(G_row[r, d] - G_col[i, d]) for i <= r (i < r when strict).

  Args:
    x, G_row: [..., C, K] float32, C a multiple of SUB_CHUNK; the rows' vectors and gates.
    y, G_col: [..., C, K] float32; the columns'.
    strict: keep only i < r (else i <= r).

  Returns:
    P [..., C, C], zero above the (strict) diagonal.
  """
  *lead, C, K = x.shape
  ns = C // SUB_CHUNK
  split = lambda a: a.reshape(*lead, ns, SUB_CHUNK, K)
  x, y, G_row, G_col = split(x), split(y), split(G_row), split(G_col)

  rows = jnp.arange(SUB_CHUNK)
  keep = (rows[:, None] > rows[None, :]) if strict else (rows[:, None] >= rows[None, :])
  exponent = G_row[..., :, None, :] - G_col[..., None, :, :]  # [..., ns, r, i, K]
  diag = einsum("...rk,...ik,...rik->...ri", x, y, masked_exp(exponent, keep[..., None]))

  reference = G_row[..., :1, :]  # [..., ns, 1, K]: the first row of each sub-chunk.
  later = (jnp.arange(ns)[:, None] > jnp.arange(ns)[None, :])[:, :, None, None]
  y_to_reference = y[..., None, :, :, :] * masked_exp(
      reference[..., :, None, :, :] - G_col[..., None, :, :, :], later)  # [..., a, b, i, K]
  x_from_reference = x * jnp.exp(G_row - reference)  # [..., a, r, K]
  off = einsum("...ark,...abik->...abri", x_from_reference, y_to_reference)
  blocks = off + jnp.eye(ns)[:, :, None, None] * diag[..., :, None, :, :]
  return jnp.swapaxes(blocks, -3, -2).reshape(*lead, C, C)


def unit_lower_inverse(A):
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
    row = eye[r] - einsum("...i,...ij->...j", coefficients, inverse)
    return jax.lax.dynamic_update_index_in_dim(inverse, row, r, axis=-2)

  inverse = jax.lax.fori_loop(1, SUB_CHUNK, substitute_row,
                              jnp.broadcast_to(eye, diagonal.shape))
  T = {}
  for a in range(ns):
    T[a, a] = inverse[..., a, :, :]
    for b in range(a - 1, -1, -1):
      coupled = sum(einsum("...ri,...ij->...rj", blocks[..., a, j, :, :], T[j, b])
                    for j in range(b, a))
      T[a, b] = -einsum("...ri,...ij->...rj", T[a, a], coupled)
  zero = jnp.zeros_like(inverse[..., 0, :, :])
  rows = [jnp.concatenate([T.get((a, b), zero) for b in range(ns)], axis=-1) for a in range(ns)]
  return jnp.concatenate(rows, axis=-2)


class SegmentMasks(NamedTuple):
  """Packed-row masks of one chunk (all float32 0/1).

  same:    [B, 1, C, C] tokens r and i belong to the same segment.
  carried: [B, 1, C] token r continues the segment that was running before the chunk (the
           incoming state reaches it).
  last:    [B, 1, C] token r belongs to the chunk's last segment (it reaches the outgoing state).
  """

  same: jax.Array
  carried: jax.Array
  last: jax.Array


def chunk_scan(body: Callable, sequences: tuple, initial_state, segment_index, *,
               chunk_size: int, remat: bool = True):
  """Runs ``body`` over the chunks of ``sequences``.

  Args:
    body: (state [B, H, K, V], chunk tuple, SegmentMasks) -> (state, o [B, H, C, V']). Each
      entry of the chunk tuple is its sequence's slice moved to [B, H, C, ...].
    sequences: arrays [B, T, H, ...] float32; padded with zeros to a multiple of chunk_size
      (the bodies must leave the state unchanged on zero tokens).
    initial_state: [B, H, K, V] float32.
    segment_index: None, or [B, T] non-decreasing integers; the state restarts from zero where
      it steps up.
    chunk_size: tokens per chunk, a multiple of SUB_CHUNK.
    remat: recompute each chunk in the backward (memory bounded by T / C states).

  Returns:
    o [B, T, H, V'] and the final state.
  """
  B, T, H = sequences[0].shape[:3]
  num_chunks = -(-T // chunk_size)
  pad = num_chunks * chunk_size - T
  if segment_index is None:
    segment_index = jnp.zeros((B, T), jnp.int32)
  segment_index = jnp.pad(segment_index, [(0, 0), (0, pad)], mode="edge")

  def to_chunks(x):
    """[B, T, H, ...] -> [chunks, B, H, C, ...]."""
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = jnp.moveaxis(x, 2, 1)
    return jnp.moveaxis(x.reshape(B, H, num_chunks, chunk_size, *x.shape[3:]), 2, 0)

  seg = jnp.moveaxis(segment_index.reshape(B, num_chunks, chunk_size), 1, 0)[:, :, None]
  before = jnp.concatenate([seg[:1, ..., :1], seg[:-1, ..., -1:]], axis=0)  # index before chunk
  masks = SegmentMasks(same=(seg[..., :, None] == seg[..., None, :]).astype(jnp.float32),
                       carried=(seg == before).astype(jnp.float32),
                       last=(seg == seg[..., -1:]).astype(jnp.float32))

  def step(state, xs):
    chunk, chunk_masks = xs
    return body(state, chunk, chunk_masks)

  step = jax.checkpoint(step) if remat else step
  final_state, o = jax.lax.scan(step, initial_state,
                                (tuple(map(to_chunks, sequences)), masks))
  o = jnp.moveaxis(o, 0, 2).reshape(B, H, num_chunks * chunk_size, -1)
  return jnp.moveaxis(o, 1, 2)[:, :T], final_state


def token_scan(update: Callable, sequences: tuple, initial_state, segment_index):
  """Runs ``update(state, *token_slices) -> (o_t, state)`` over time (the references).

  Args:
    update: one token for every (batch, head); slices are the sequences at one time step.
    sequences: arrays [B, T, ...].
    initial_state: [B, H, K, V] float32.
    segment_index: None, or [B, T] non-decreasing integers; the state restarts from zero where
      it steps up (before that token reads it).

  Returns:
    o [B, T, ...] and the final state.
  """
  keep = jnp.ones(sequences[0].shape[:2], bool)
  if segment_index is not None:
    keep = keep.at[:, 1:].set(segment_index[:, 1:] == segment_index[:, :-1])

  def step(state, xs):
    *inputs, keep_t = xs
    state = jnp.where(keep_t[:, None, None, None], state, 0.0)
    return update(state, *inputs)[::-1]

  time_first = lambda x: jnp.moveaxis(x, 1, 0)
  final_state, o = jax.lax.scan(step, initial_state,
                                tuple(map(time_first, sequences + (keep,))))
  return time_first(o), final_state
