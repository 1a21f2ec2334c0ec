"""RWKV-7's intra-chunk forward on 16-row sub-chunks, for the GPU kernel: the same
``ChunkMatrices`` as ``_kernel_chunk.intra_forward``, built as KDA's are
(``ops.kda._kernel_subchunk``: why, and the block structure).

Per sub-chunk b (G, G~ the chunk's inclusive and exclusive cumulative log decay):

  diagonal blocks     RWKV-7's ``Chunk`` on the sub-chunk alone: its pair products, A_rb, A_rk
                      and T_bb = (I - A_ab,bb)^-1 depend on differences of G within the
                      sub-chunk only, so its sub-chunk-local gate gives them exactly;
  off-diagonal blocks rows of b against columns of an earlier sub-chunk a, with m the last row
                      of a: exp(R_t - G_i) = exp(R_t - G_m) exp(G_m - G_i) for the row gate R
                      = G~ (A_ab, A_ak: t - 1 >= m) or G (A_rb, A_rk), both exponents <= 0;
  T = (I - A_ab)^-1   block forward substitution;
  outputs             W_b = carried T_b. (a exp(G~)), U_b = T_b. (A_ak v), Y_b = A_rk,b. v,
                      the blocks of A_rb and r exp(G) as soon as known; b and k times
                      exp(G_C - G) and exp(G_C) after the last sub-chunk.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp

from ops.kda._kernel_chunk import F32, Primitives, iota, last_row
from ops.kda._kernel_subchunk import SUB, same_segment, substitution_row
from ops.rwkv7._kernel_chunk import Chunk

__all__ = ["SUB", "Rows", "load_rows", "intra_forward"]


class Rows(NamedTuple):
  """One sub-chunk's inputs, float32: r (scaled), w, k, a, b [S, K], v [S, V], segment, carried,
  last [S, 1]."""

  r: object
  w: object
  k: object
  a: object
  b: object
  v: object
  segment: object
  carried: object
  last: object


def load_rows(tokens, segment, carried, last, scale: float) -> Rows:
  """A sub-chunk's ``Rows`` from its token inputs (r, w, k, a, b, v) as float32 [S, width]
  tiles (r unscaled) and its packed-row masks."""
  r, w, k, a, b, v = tokens
  return Rows(r * scale, w, k, a, b, v, segment, carried, last)


def intra_forward(load: Callable[[int], Rows], num_blocks: int, prims: Primitives,
                  store: Callable) -> None:
  """The chunk's matrices from its ``num_blocks`` sub-chunks (``load(b)``, each loaded once),
  handed to ``store(name, value, b, a=None)`` as soon as they are known: row block b of W, U,
  Rg, Y, Bg, Kg ([S, width]), block (b, a) of A = A_rb ([S, S], zeros above the diagonal) and
  the decay ([1, K], b = None)."""
  dot = prims.dot
  first_row = iota((SUB, 1), 0) == 0
  G_end = 0.0
  kept = []  # per earlier sub-chunk: G at its last row, b and k gated to it, segment, v, last
  rhs_w, ak_v, T = [], [], []  # a exp(G~), A_ak v by sub-chunk; T[b][a] for a <= b
  for blk in range(num_blocks):
    x = load(blk)
    c = Chunk(x.r, x.w, x.k, x.a, x.b, x.segment, x.carried, x.last, prims)
    G = G_end + c.G
    G_before = jnp.where(first_row, G_end, G_end + c.G_before)
    ab_row, ak_row, rk_row = [], [], []
    for a, (G_m, b_cols, k_cols, segment, _, _) in enumerate(kept):
      mask = same_segment(x.segment, segment)
      strict_rows, rows = jnp.exp(G_before - G_m), jnp.exp(G - G_m)
      ab_row.append(dot(x.a * strict_rows, b_cols, trans_b=True) * mask)
      ak_row.append(dot(x.a * strict_rows, k_cols, trans_b=True) * mask)
      store("A", dot(x.r * rows, b_cols, trans_b=True) * mask, blk, a)
      rk_row.append(dot(x.r * rows, k_cols, trans_b=True) * mask)
    store("A", c.A_rb, blk, blk)
    for a in range(blk + 1, num_blocks):
      store("A", jnp.zeros((SUB, SUB), F32), blk, a)
    ab_row.append(c.A_ab)
    ak_row.append(c.A_ak)
    rk_row.append(c.A_rk)
    T.append(substitution_row(T, ab_row, c.T, dot, sign=-1.0))
    values = [v for *_, v, _ in kept] + [x.v]
    ak_v.append(sum(dot(A, v) for A, v in zip(ak_row, values)))
    rhs_w.append(x.a * jnp.exp(G_before))
    store("W", x.carried * sum(dot(T[blk][a], rhs_w[a]) for a in range(blk + 1)), blk)
    store("U", sum(dot(T[blk][a], ak_v[a]) for a in range(blk + 1)), blk)
    store("Y", sum(dot(A, v) for A, v in zip(rk_row, values)), blk)
    store("Rg", x.carried * x.r * jnp.exp(G), blk)
    G_end = last_row(G)
    to_end = jnp.exp(G_end - G)
    kept.append((G_end, x.b * to_end, x.k * to_end, x.segment, x.v, x.last))
    carried = x.carried
  for blk, (G_m, b_cols, k_cols, _, _, last) in enumerate(kept):
    to_end = last * jnp.exp(G_end - G_m)
    store("Bg", b_cols * to_end, blk)
    store("Kg", k_cols * to_end, blk)
  store("decay", last_row(carried) * jnp.exp(G_end), None)
