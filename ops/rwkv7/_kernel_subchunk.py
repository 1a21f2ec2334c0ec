"""RWKV-7's intra-chunk forward and backward on 16-row sub-chunks, for the GPU kernels: the same
``ChunkMatrices`` as ``_kernel_chunk.intra_forward`` and the same gradients as
``_kernel_chunk.token_gradients``, built as KDA's are (``ops.kda._kernel_subchunk``: why, and
the block structure).

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

from ops.kda._kernel_chunk import F32, Primitives, exp, iota, last_row
from ops.kda._kernel_subchunk import SUB, block_inverse_backward, same_segment, substitution_row
from ops.rwkv7._kernel_chunk import Chunk, _diagonal

__all__ = ["SUB", "GRADIENTS", "Rows", "load_rows", "intra_forward", "intra_backward"]

GRADIENTS = ("dr", "dw", "dk", "da", "db", "dv")  # intra_backward's outputs, in the token order


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


def _rows_of_sub_chunk(x: Rows, G_start, earlier, prims: Primitives):
  """Sub-chunk x's gates and its rows of the four pair products: (its ``Chunk``, G, G~, and
  (A_ab, A_ak, A_rb, A_rk), each a list of [S, S] blocks, one per earlier sub-chunk and then
  the diagonal one). ``G_start``: G before x's first row; ``earlier``: per earlier sub-chunk,
  (G at its last row m, its b and k times exp(G_m - G), its segment)."""
  c = Chunk(x.r, x.w, x.k, x.a, x.b, x.segment, x.carried, x.last, prims)
  G = G_start + c.G
  G_before = jnp.where(iota((SUB, 1), 0) == 0, G_start, G_start + c.G_before)
  rows = ([], [], [], [])
  for G_m, b_cols, k_cols, segment in earlier:
    mask = same_segment(x.segment, segment)
    strict_rows, gated_rows = x.a * exp(G_before - G_m), x.r * exp(G - G_m)
    for blocks, (row_factor, columns) in zip(rows, ((strict_rows, b_cols), (strict_rows, k_cols),
                                                    (gated_rows, b_cols), (gated_rows, k_cols))):
      blocks.append(prims.dot(row_factor, columns, trans_b=True) * mask)
  for blocks, diagonal in zip(rows, (c.A_ab, c.A_ak, c.A_rb, c.A_rk)):
    blocks.append(diagonal)
  return c, G, G_before, rows


def intra_forward(load: Callable[[int], Rows], num_blocks: int, prims: Primitives,
                  store: Callable) -> None:
  """The chunk's matrices from its ``num_blocks`` sub-chunks (``load(b)``, each loaded once),
  handed to ``store(name, value, b, a=None)`` as soon as they are known: row block b of W, U,
  Rg, Y, Bg, Kg ([S, width]), block (b, a) of A = A_rb ([S, S], zeros above the diagonal) and
  the decay ([1, K], b = None)."""
  dot = prims.dot
  G_end = 0.0
  kept = []  # per earlier sub-chunk: G at its last row, b and k gated to it, segment, v, last
  rhs_w, ak_v, T = [], [], []  # a exp(G~), A_ak v by sub-chunk; T[b][a] for a <= b
  for blk in range(num_blocks):
    x = load(blk)
    c, G, G_before, (ab_row, ak_row, rb_row, rk_row) = _rows_of_sub_chunk(
        x, G_end, [columns[:4] for columns in kept], prims)
    for a, block in enumerate(rb_row):
      store("A", block, blk, a)
    for a in range(blk + 1, num_blocks):
      store("A", jnp.zeros((SUB, SUB), F32), blk, a)
    T.append(substitution_row(T, ab_row, c.T, dot, sign=-1.0))
    values = [v for *_, v, _ in kept] + [x.v]
    ak_v.append(sum(dot(A, v) for A, v in zip(ak_row, values)))
    rhs_w.append(x.a * exp(G_before))
    store("W", x.carried * sum(dot(T[blk][a], rhs_w[a]) for a in range(blk + 1)), blk)
    store("U", sum(dot(T[blk][a], ak_v[a]) for a in range(blk + 1)), blk)
    store("Y", sum(dot(A, v) for A, v in zip(rk_row, values)), blk)
    store("Rg", x.carried * x.r * exp(G), blk)
    G_end = last_row(G)
    to_end = exp(G_end - G)
    kept.append((G_end, x.b * to_end, x.k * to_end, x.segment, x.v, x.last))
    carried = x.carried
  for blk, (G_m, b_cols, k_cols, _, _, last) in enumerate(kept):
    to_end = last * exp(G_end - G_m)
    store("Bg", b_cols * to_end, blk)
    store("Kg", k_cols * to_end, blk)
  store("decay", last_row(carried) * exp(G_end), None)


def intra_backward(load: Callable[[int], Rows], cotangent: Callable, num_blocks: int,
                   prims: Primitives, store: Callable, scale: float) -> None:
  """The token gradients of one chunk from the cotangents of its matrices, by sub-chunks: the
  values of ``_kernel_chunk.token_gradients``, handed to ``store(name, value, b)`` as row block
  b of each of ``GRADIENTS`` (dr for the unscaled r). ``load(b)`` gives sub-chunk b's ``Rows``
  (called twice a sub-chunk); ``cotangent(name, b, a=None)`` row block b of a matrix's
  cotangent ([S, width]; block (b, a) of a "C" field, [S, S]; the [1, K] "decay" for b = None).
  Three passes, so that only [S, S] blocks and a few [S, K] tiles stay live:

    1. in order: G, G~, the off-diagonal blocks of the four pair products, T by block
       substitution, Z = A_ak v and dT = dW (a exp(G~))^T + dU Z^T by blocks;
    2. [S, S] blocks only: dA_ab = T^T dT T^T on A_ab's support;
    3. in reverse: dZ = T^T dU and from it dA_ak = dZ v^T, dA_rk = dY v^T; each sub-chunk's
       diagonal block by the level split; each off-diagonal block once for both factors (rows
       now, columns summed until their turn), dv likewise; the cotangents through W, r exp(G),
       b and k times exp(G_C - G) and exp(G_C); dw = reverse-cumsum(dG + dG~) - dG~, carried
       over from the later sub-chunks.
  """
  dot = prims.dot
  n = num_blocks

  # Pass 1.
  starts, ends = [], []  # G before and at the end of each sub-chunk, [1, K]
  b_cols, k_cols, values = [], [], []  # b and k times exp(G_m - G) (m the last row), v
  segments, carried = [], []
  A_ak, A_rk, T, dT = [], [], [], []  # blocks [j][a], a <= j
  rhs_w, ak_v = [], []  # a exp(G~), A_ak v by sub-chunk
  through_end = []  # per sub-chunk: the sum over rows of (dBg b + dKg k) exp(G_m - G), [1, K]
  G_start = 0.0
  for j in range(n):
    x = load(j)
    c, G, G_before, (ab_row, ak_row, _, rk_row) = _rows_of_sub_chunk(
        x, G_start, list(zip(ends, b_cols, k_cols, segments)), prims)
    T.append(substitution_row(T, ab_row, c.T, dot, sign=-1.0))
    ak_v.append(sum(dot(A, v) for A, v in zip(ak_row, values + [x.v])))
    rhs_w.append(x.a * exp(G_before))
    dW, dU = x.carried * cotangent("W", j), cotangent("U", j)
    dT.append([dot(dW, rhs_w[a], trans_b=True) + dot(dU, ak_v[a], trans_b=True)
               for a in range(j + 1)])
    G_end = last_row(G)
    to_m = exp(G_end - G)
    b_cols.append(x.b * to_m)
    k_cols.append(x.k * to_m)
    through_end.append(jnp.sum(x.last * (cotangent("Bg", j) * b_cols[j]
                                         + cotangent("Kg", j) * k_cols[j]), axis=0,
                               keepdims=True))
    A_ak.append(ak_row)
    A_rk.append(rk_row)
    starts.append(G_start)
    ends.append(G_end)
    values.append(x.v)
    segments.append(x.segment)
    carried.append(x.carried)
    G_start = G_end
  G_C = G_start
  dG_C = (sum(e * exp(G_C - G_m) for e, G_m in zip(through_end, ends))
          + cotangent("decay", None) * last_row(carried[-1]) * exp(G_C))

  # Pass 2.
  t, i = iota((SUB, SUB), 0), iota((SUB, SUB), 1)

  def support(j, a, strict):  # block (j, a) of a pair product's support, i < t or i <= t
    below = (t > i) if strict else (t >= i)
    return jnp.where(below | (a < j), same_segment(segments[j], segments[a]), 0.0)

  dA_ab = block_inverse_backward(T, dT, dot, sign=-1.0,
                                 support=lambda j, a: support(j, a, strict=True))

  # Pass 3.
  after = 0.0  # the sum of dG + dG~ over the later sub-chunks
  d_cols = [(0.0, 0.0)] * n  # the cotangents of each sub-chunk's gated b and k columns
  dv = [0.0] * n  # each sub-chunk's dv, summed from the later rows
  for j in reversed(range(n)):
    x = load(j)
    c = Chunk(x.r, x.w, x.k, x.a, x.b, x.segment, x.carried, x.last, prims)
    G, G_before = starts[j] + c.G, starts[j] + c.G_before
    gamma, gamma_before = exp(G), exp(G_before)
    dZ = sum(dot(T[b][j], cotangent("U", b), trans_a=True) for b in range(j, n))
    dY_j = cotangent("Y", j)
    dA_ak = [dot(dZ, values[a], trans_b=True) * support(j, a, strict=True)
             for a in range(j + 1)]
    dA_rk = [dot(dY_j, values[a], trans_b=True) * support(j, a, strict=False)
             for a in range(j + 1)]
    dA_rb = [cotangent("A", j, a) * support(j, a, strict=False) for a in range(j + 1)]
    for a in range(j + 1):
      dv[a] = dv[a] + dot(A_ak[j][a], dZ, trans_a=True) + dot(A_rk[j][a], dY_j, trans_a=True)

    (da_b, da_k, dr_b, dr_k), (db_a, dk_a, db_r, dk_r), (dG_before, dG_row), dG = (
        c.products_backward(c.pairs, [dA_ab[j][j], dA_ak[j], dA_rb[j], dA_rk[j]],
                            c.row_gates))
    on_rb, on_rk = _diagonal(dA_rb[j]), _diagonal(dA_rk[j])
    dr = dr_b + dr_k + on_rb * x.b + on_rk * x.k
    da = da_b + da_k
    db = db_a + db_r + on_rb * x.r
    dk = dk_a + dk_r + on_rk * x.r
    dG = dG + dG_row
    for a in range(j):  # block (j, a): j's gated rows against a's gated columns
      strict_rows, rows = exp(G_before - ends[a]), exp(G - ends[a])
      a_rows, r_rows = x.a * strict_rows, x.r * rows
      dA_b, dA_k = (dot(dA_ab[j][a], b_cols[a]) + dot(dA_ak[a], k_cols[a]),
                    dot(dA_rb[a], b_cols[a]) + dot(dA_rk[a], k_cols[a]))
      da = da + dA_b * strict_rows
      dr = dr + dA_k * rows
      dG_before = dG_before + a_rows * dA_b
      dG = dG + r_rows * dA_k
      db_cols, dk_cols = d_cols[a]
      d_cols[a] = (db_cols + dot(dA_ab[j][a], a_rows, trans_a=True)
                   + dot(dA_rb[a], r_rows, trans_a=True),
                   dk_cols + dot(dA_ak[a], a_rows, trans_a=True)
                   + dot(dA_rk[a], r_rows, trans_a=True))
    db_cols, dk_cols = d_cols[j]
    to_m = exp(ends[j] - G)
    db = db + db_cols * to_m
    dk = dk + dk_cols * to_m
    dG = dG - (db_cols * x.b + dk_cols * x.k) * to_m

    dX = sum(dot(T[b][j], carried[b] * cotangent("W", b), trans_a=True) for b in range(j, n))
    da = da + dX * gamma_before
    dG_before = dG_before + dX * x.a * gamma_before
    dRg = x.carried * cotangent("Rg", j)
    dr = dr + dRg * gamma
    dG = dG + dRg * x.r * gamma
    dBg, dKg = x.last * cotangent("Bg", j), x.last * cotangent("Kg", j)
    to_end = exp(G_C - G)
    db = db + dBg * to_end
    dk = dk + dKg * to_end
    dG = dG - (dBg * x.b + dKg * x.k) * to_end
    if j == n - 1:
      dG = dG + jnp.where(iota(dG.shape, 0) == SUB - 1, dG_C, 0.0)
    store("dr", dr * scale, j)
    store("dw", prims.cumsum(dG + dG_before, reverse=True) + after - dG_before, j)
    store("dk", dk, j)
    store("da", da, j)
    store("db", db, j)
    store("dv", dv[j] + cotangent("values", j), j)
    after = after + jnp.sum(dG + dG_before, axis=0, keepdims=True)
