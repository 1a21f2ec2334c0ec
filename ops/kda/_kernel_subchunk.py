"""KDA's intra-chunk forward on 16-row sub-chunks: the GPU kernel's register-sized form of
``_kernel_chunk.intra_forward`` (same ``ChunkMatrices``, same mathematics, SPEC 3.4-3.5).

Why: the level split on whole [C, K] and [C, C] tiles holds so many of them that the Triton
kernel runs at 255 registers and spills at C = 64 (docs/kernels.md, register report), and each
of its six levels is a full C x K x C product masked to its pairs. Here the chunk's n = C / 16
sub-chunks are visited in order and every tile is [16, K] or [16, 16]:

  diagonal blocks     ``Chunk`` on the sub-chunk alone (the level split, levels 1, 2, 4, 8, and
                      T_bb): its products depend on differences of G within the sub-chunk only,
                      so its sub-chunk-local gate gives them exactly;
  off-diagonal blocks rows of sub-chunk b against columns of an earlier sub-chunk a: with m the
                      last row of a, exp(G_r - G_i) = exp(G_r - G_m) exp(G_m - G_i), both
                      exponents <= 0 (the cumulative log gate only falls), so each block is one
                      [16, K] x [K, 16] product of gated rows and gated columns, all its pairs
                      strictly lower;
  T = (I + A_kk)^-1   block forward substitution: T_bb by the level split, and for a < b
                      T_ba = -T_bb sum_{a <= c < b} A_bc T_ca;
  outputs             per sub-chunk b, stored as soon as known: W_b = carried T_b. (beta k
                      Gamma) and U_b = T_b. (beta v) (T's row b needs sub-chunks <= b only),
                      Q Gamma, the blocks of A_qk; after the last, K exp(G_C - G) = each column
                      factor times exp(G_C - G_m), and exp(G_C).

The pair products cost n (n + 1) / 2 block products instead of log2(C) full ones: 10 against 6
C x K x C at C = 64, i.e. 0.63 M against 6.3 M multiply-adds per pair type and head (K = 128).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp

from ops.kda._kernel_chunk import F32, Chunk, Primitives, eye, last_row

SUB = 16  # rows per sub-chunk: the smallest tile Triton's tensor-core products take


class Rows(NamedTuple):
  """One sub-chunk's inputs, float32: q (scaled), k, g [S, K], v [S, V], beta, segment, carried,
  last [S, 1]."""

  q: object
  k: object
  g: object
  v: object
  beta: object
  segment: object
  carried: object
  last: object


def same_segment(rows, columns):
  """[S, S] float 0/1: row r of one sub-chunk and column i of another in the same segment, from
  their [S, 1] segment indices."""
  return (rows == columns.reshape(1, columns.shape[0])).astype(F32)


def substitution_row(T, A_row, T_bb, dot, sign: float):
  """Row b of T = (I + sign A)^-1 by blocks, given T's rows before it, row b of A's blocks
  (A_row[c] for c <= b) and T_bb = (I + sign A_bb)^-1: for a < b,
  T_ba = -sign T_bb sum_{a <= c < b} A_bc T_ca."""
  b = len(T)
  return [-sign * dot(T_bb, sum(dot(A_row[c], T[c][a], inverse=True) for c in range(a, b)),
                      inverse=True) for a in range(b)] + [T_bb]


def load_rows(tokens, segment, carried, last, scale: float) -> Rows:
  """A sub-chunk's ``Rows`` from its token inputs (q, k, g, v, beta) as float32 [S, width] tiles
  (q unscaled) and its packed-row masks."""
  q, k, g, v, beta = tokens
  return Rows(q * scale, k, g, v, beta, segment, carried, last)


def intra_forward(load: Callable[[int], Rows], num_blocks: int, prims: Primitives,
                  store: Callable) -> None:
  """The chunk's matrices from its ``num_blocks`` sub-chunks (``load(b)``, each loaded once),
  handed to ``store(name, value, b, a=None)`` as soon as they are known, so that few tiles stay
  live: row block b of W, U, Qg, Kg ([S, width]), block (b, a) of A ([S, S], zeros above the
  diagonal) and the decay ([1, K], b = None)."""
  dot = prims.dot
  G_end = 0.0
  kept = []  # per earlier sub-chunk: (G at its last row, its gated columns, segment, last)
  rhs_k, rhs_v, T = [], [], []  # T[b][a] for a <= b
  for b in range(num_blocks):
    x = load(b)
    c = Chunk(x.q, x.k, x.g, x.beta, x.segment, x.carried, x.last, prims)
    G = G_end + c.G
    kk_row = []
    for a, (G_m, columns, segment, _) in enumerate(kept):
      to_m = jnp.exp(G - G_m)
      mask = same_segment(x.segment, segment)
      store("A", dot(x.q * to_m, columns, trans_b=True) * mask, b, a)
      kk_row.append(x.beta * dot(x.k * to_m, columns, trans_b=True) * mask)
    diagonal = jnp.sum(x.q * x.k, axis=1, keepdims=True) * eye(SUB)
    store("A", (c.P_qk + diagonal) * c.lower, b, b)
    for a in range(b + 1, num_blocks):
      store("A", jnp.zeros((SUB, SUB), F32), b, a)
    kk_row.append(c.A_kk)
    T.append(substitution_row(T, kk_row, c.T, dot, sign=1.0))
    gamma = jnp.exp(G)
    rhs_k.append(x.beta * x.k * gamma)
    rhs_v.append(x.beta * x.v)
    store("W", x.carried * sum(dot(T[b][a], rhs_k[a]) for a in range(b + 1)), b)
    store("U", sum(dot(T[b][a], rhs_v[a]) for a in range(b + 1)), b)
    store("Qg", x.carried * x.q * gamma, b)
    G_end = last_row(G)
    kept.append((G_end, x.k * jnp.exp(G_end - G), x.segment, x.last))
    carried = x.carried
  for b, (G_m, columns, _, last) in enumerate(kept):
    store("Kg", last * columns * jnp.exp(G_end - G_m), b)
  store("decay", last_row(carried) * jnp.exp(G_end), None)
