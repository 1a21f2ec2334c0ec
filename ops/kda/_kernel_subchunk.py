"""KDA's intra-chunk forward and backward on 16-row sub-chunks: the GPU kernels' register-sized
form of ``_kernel_chunk.intra_forward`` and ``token_gradients`` (same ``ChunkMatrices``, same
gradients, same mathematics, SPEC 3.4-3.6), as the steps of the GPU kernels.

Why: the level split on whole [C, K] and [C, C] tiles holds so many of them that the Triton
kernel runs at 255 registers and spills at C = 64 (docs/kernels.md, register report), and each
of its six levels is a full C x K x C product masked to its pairs. Here the chunk's n = C / 16
sub-chunks are the unit, and the forward is three steps, each a kernel of its own on the GPU
(``ops.kda.pallas_gpu``), so that every program is short and many run at once:

  ``pair_rows``       one program per sub-chunk j: row block j of A_qk and P_kk (A_kk before
                      beta) and, for the backward, j's ``gated_operands``. The diagonal
                      block by ``Chunk`` on the sub-chunk alone (the level split, levels 1, 2,
                      4, 8), whose products depend on differences of G within it only; each
                      earlier sub-chunk a as one [16, K] x [K, 16] product of gated rows and
                      gated columns referenced at m, the last row of a:
                      exp(G_r - G_i) = exp(G_r - G_m) exp(G_m - G_i), both exponents <= 0 (the
                      cumulative log gate only falls), all its pairs strictly lower;
  ``inverse_blocks``  one program per chunk, [16, 16] blocks only: T = (I + A_kk)^-1, the
                      diagonal blocks' inverses T_bb by the level split, then block forward
                      substitution, T_ba = -T_bb sum_{a <= c < b} A_bc T_ca;
  ``chunk_outputs``   one program per chunk and 64-column block: W = carried T (beta k
                      Gamma) and U = T (beta v) as C x C x 64 products, Q Gamma,
                      K exp(G_C - G) and exp(G_C), each column-wise in k, g and v.

The backward is three steps, on the P_kk, T and gated operands that the forward saved:

  ``wy_dA_kk_chunk``  one program per chunk: dT = dW (beta k Gamma)^T + dU (beta v)^T summed
                      over column blocks, dA_kk = -T^T dT T^T and dbeta's part through A_kk;
  ``wy_column_block`` one program per chunk and column block: the rest of the cotangents
                      through W and U (dv, dk's part through W, dbeta's part), whole [C, C]
                      and [C, width] tiles, as fla's WY backward;
  ``gradient_rows``   one program per sub-chunk j and block of key columns: its rows against
                      the earlier sub-chunks and its columns against the later ones, the
                      diagonal block by the level split, the cotangents through Q Gamma,
                      K exp(G_C - G) and exp(G_C); dg then follows as a reverse cumulative sum
                      over the chunk (``dg_from_rows``). Without the W and U part it fits 168
                      registers on 32 columns (docs/kernels.md, version 9).

The pair products cost n (n + 1) / 2 block products instead of log2(C) full ones: 10 against 6
C x K x C at C = 64, i.e. 0.63 M against 6.3 M multiply-adds per pair type and head (K = 128).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ops.kda._kernel_chunk import (F32, Chunk, LevelSplit, Primitives, exp, eye, iota, last_row,
                                   rows_and_columns_cotangents, unit_lower_inverse, wy_columns,
                                   wy_dA_kk, wy_dT)

SUB = 16  # rows per sub-chunk: the smallest tile Triton's tensor-core products take
GRADIENTS = ("dq", "dk", "dg", "dv", "dbeta")  # the token gradients, in the token order


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


def block_inverse_backward(T, dT, dot, sign: float, support: Callable):
  """The cotangent of A for T = (I + sign A)^-1 by [S, S] blocks: -sign T^T dT T^T on A's
  support, from the lower blocks T[b][a] and dT[b][a] (a <= b; dT's upper blocks do not matter,
  T's being zero whatever A is) and ``support(b, a)``, block (b, a) of A's 0/1 support. Returned
  as blocks [b][a], a <= b: Z = dT T^T first, then T^T Z, 20 block products each at 4 blocks."""
  n = len(T)
  Z = [[sum(dot(dT[m][i], T[a][i], trans_b=True, inverse=True) for i in range(a + 1))
        for a in range(m + 1)] for m in range(n)]
  return [[-sign * sum(dot(T[m][b], Z[m][a], trans_a=True, inverse=True) for m in range(b, n))
           * support(b, a) for a in range(b + 1)] for b in range(n)]


def load_rows(tokens, segment, carried, last, scale: float) -> Rows:
  """A sub-chunk's ``Rows`` from its token inputs (q, k, g, v, beta) as float32 [S, width] tiles
  (q unscaled) and its packed-row masks."""
  q, k, g, v, beta = tokens
  return Rows(q * scale, k, g, v, beta, segment, carried, last)


def _gated_columns(y: Rows, prims: Primitives, local=None):
  """An earlier sub-chunk's pair columns referenced at its last row m: (k exp(G_m - G) [S, K],
  its total gate G_m - G_start [1, K]); exponents <= 0. ``local``: y's cumulative gate within
  it, where already formed."""
  local = prims.cumsum(y.g, reverse=False) if local is None else local
  total = last_row(local)
  return y.k * exp(total - local), total


def pair_rows(load: Callable, j, prims: Primitives, store: Callable,
              store_gated: Callable | None = None) -> None:
  """Row block j of A_qk and of M, the pair kernel's work for sub-chunk j (``j`` may be traced:
  the earlier sub-chunks are a loop), each [S, S] block (j, a), a <= j, handed to
  ``store(name, value, a)``: "A" for A_qk, "M" for P_kk, A_kk before its rows' beta (the
  backward reads it for dbeta). Blocks above the diagonal, zero, are not stored: the block
  inverse writes A_qk's (``inverse_blocks``' caller) and no step reads M's. Given
  ``store_gated(name, value)``, sub-chunk j's ``gated_operands`` go to it too, for the backward
  (docs/kernels.md, version 19), after j's blocks: stored before them, they cost the pair rows
  0.07 ms more at B4 T8192 (version 20).

  ``load(a)`` gives sub-chunk a's ``Rows``. The earlier sub-chunks a = j - 1, ..., 0 are visited
  backwards carrying ``since``, the sum of g over the sub-chunks between a and j, so that with
  m the last row of a: G_r - G_m = (local cumulative gate of j at r) + since and
  G_m - G_i = (a's total) - (a's local cumulative gate at i), both <= 0, and no absolute G is
  needed.
  """
  dot = prims.dot
  x = load(j)
  c = Chunk(x.q, x.k, x.g, x.beta, x.segment, x.carried, x.last, prims)
  diagonal = jnp.sum(x.q * x.k, axis=1, keepdims=True) * eye(SUB)
  store("A", (c.P_qk + diagonal) * c.lower, j)
  store("M", c.P_kk * c.strict, j)

  def earlier(step, since):
    a = j - 1 - step
    y = load(a)
    columns, total = _gated_columns(y, prims)
    to_m = exp(c.G + since)
    mask = same_segment(x.segment, y.segment)
    store("A", dot(x.q * to_m, columns, trans_b=True) * mask, a)
    store("M", dot(x.k * to_m, columns, trans_b=True) * mask, a)
    return since + total

  jax.lax.fori_loop(0, j, earlier, jnp.zeros((1, x.g.shape[1]), F32))
  if store_gated is not None:
    for name, value in gated_operands(x, prims, local=c.G).items():
      store_gated(name, value)


def inverse_blocks(load: Callable, beta: Callable, num_blocks: int, prims: Primitives,
                   store: Callable) -> None:
  """T = (I + A_kk)^-1 from P_kk's blocks (``load(b, a)``, a <= b, as ``pair_rows`` stores
  them) and sub-chunk b's beta (``beta(b)``, [S, 1]): each diagonal block's inverse T_bb by the
  level split, then block forward substitution; each [S, S] block of T handed to
  ``store(value, b, a)``, zeros above the diagonal."""
  T = []
  for b in range(num_blocks):
    row = [beta(b) * load(b, a) for a in range(b + 1)]
    T_bb = unit_lower_inverse(row[b], prims.dot)
    T.append(substitution_row(T, row, T_bb, prims.dot, sign=1.0))
    for a in range(num_blocks):
      store(T[b][a] if a <= b else jnp.zeros((SUB, SUB), F32), b, a)


def chunk_outputs(x: Rows, T, prims: Primitives, store: Callable) -> None:
  """The chunk matrices that follow from T, for the whole chunk's ``Rows`` x ([C, width]) and
  T = (I + A_kk)^-1 [C, C], each handed to ``store(name, value)``: W = carried T (beta k
  Gamma), U = T (beta v), Qg = carried q Gamma, Kg = last k exp(G_C - G) ([C, width]) and the
  decay carried_C exp(G_C) ([1, K]). Each is a column-wise function of x's columns, so x may
  hold a block of the key and value columns (the outputs are then that block's)."""
  G = prims.cumsum(x.g, reverse=False)
  gamma = exp(G)
  store("W", x.carried * prims.dot(T, x.beta * x.k * gamma))
  store("U", prims.dot(T, x.beta * x.v))
  store("Qg", x.carried * x.q * gamma)
  G_C = last_row(G)
  store("Kg", x.last * x.k * exp(G_C - G))
  store("decay", last_row(x.carried) * exp(G_C))


def wy_dA_kk_chunk(load: Callable, column_blocks: int, T, P_kk, prims: Primitives,
                   store: Callable) -> None:
  """dA_kk = -T^T dT T^T of a whole chunk (``_kernel_chunk.wy_backward``), dT summed over
  blocks of its K and V columns, handed to ``store(name, value)``: "dA_kk" [C, C] and "dbeta"
  [C, 1], dbeta's part through A_kk = diag(beta) P_kk.

  ``load(cb)`` gives (the chunk's ``Rows`` on column block cb of k, g and v, dW's and dU's
  block); T and P_kk [C, C] (P_kk's upper blocks may hold anything).
  """
  def dT_part(cb, dT):
    x, dW, dU = load(cb)
    return dT + wy_dT(x.k, x.v, x.beta, _gates(x, prims), x.carried, dW, dU, prims.dot)

  C = T.shape[0]
  strictly_lower = iota((C, C), 0) > iota((C, C), 1)
  dT = jax.lax.fori_loop(0, column_blocks, dT_part, jnp.zeros((C, C), F32))
  x0 = load(0)[0]
  dA_kk = wy_dA_kk(T, dT, jnp.where(strictly_lower, same_segment(x0.segment, x0.segment), 0.0),
                   prims.dot)
  store("dA_kk", dA_kk)
  store("dbeta", jnp.sum(dA_kk * jnp.where(strictly_lower, P_kk, 0.0), axis=1, keepdims=True))


def wy_column_block(x: Rows, dW, dU, T, prims: Primitives):
  """(dv, dk's part through W (which ``gradient_rows`` adds to its rows), dbeta's part through
  W and U [C, 1]) of a whole chunk on one block of its K and V columns (``x``, dW and dU that
  block's, T [C, C]): column-wise, so the blocks may go to separate programs, their dbeta parts
  summed after."""
  return wy_columns(T, x.k, x.v, x.beta, _gates(x, prims), x.carried, dW, dU, prims.dot)


GATED = ("k_to_end", "q_from_start", "k_from_start", "total")  # ``gated_operands``' names


def gated_operands(y: Rows, prims: Primitives, local=None) -> dict:
  """Sub-chunk y's pair operands that depend on y alone, with L the cumulative gate within y
  (inclusive; ``local``, where already formed) and L_m its last row: "k_to_end" =
  k exp(L_m - L), y as the columns of a later sub-chunk's rows; "q_from_start" = q exp(L) and
  "k_from_start" = k exp(L), y as the rows of an earlier one's columns ([S, width] each, every
  exponent <= 0); and "total" = L_m [1, width]."""
  local = prims.cumsum(y.g, reverse=False) if local is None else local
  k_to_end, total = _gated_columns(y, prims, local)
  from_start = exp(local)
  return dict(k_to_end=k_to_end, q_from_start=y.q * from_start, k_from_start=y.k * from_start,
              total=total)


def _gates(x: Rows, prims: Primitives):
  """Gamma = exp(G) [C, width] of a whole chunk's rows, G the cumulative gate from its start."""
  return exp(prims.cumsum(x.g, reverse=False))


def gradient_rows(load: Callable, gated: Callable, cotangent: Callable, load_dA_kk: Callable,
                  load_dk_w: Callable, j, num_blocks: int, prims: Primitives, store: Callable,
                  scale: float) -> None:
  """Sub-chunk j's token gradients through the pair products, Q Gamma, K exp(G_C - G) and
  exp(G_C) (``j`` may be traced), handed to ``store(name, value)``: dq (for the unscaled q),
  dk ([S, K], with dk's part through W, ``load_dk_w(j)``, from ``wy_column_block``) and, for g, "dG"
  (the cotangent of the cumulative gate G at j's rows, [S, K]) and "through_end" ([1, K], its
  part of dG_C, the cotangent of G at the chunk's last row); dg is the reverse cumulative sum of
  dG over the chunk plus the chunk's sum of through_end (``dg_from_rows``).

  ``load(a)`` gives sub-chunk a's ``Rows``; ``gated(name, a)`` its ``gated_operands``
  ([S, width], "total" [1, width]); ``cotangent(name, b, a=None)`` row block b of a
  chunk matrix's cotangent ([S, width]; block (b, a) of "A"; the [1, K] "decay" for b = None);
  ``load_dA_kk(b, a)`` [S, S] blocks (a <= b) of dA_kk (``wy_dA_kk_chunk``). Sub-chunk j takes part
  in the pair products as rows (against the earlier sub-chunks a, visited backwards with the
  sum of g between them carried, as ``pair_rows`` does) and as columns (against the later
  sub-chunks b, visited in order with the sum of g between them carried: b's rows referenced at
  the row before b, so that the sum scales the product's columns).

  Every output is column-wise in the key columns, so the columns may be split across programs:
  given a block of the K columns of every input and cotangent, it returns that block's columns.
  """
  dot = prims.dot
  x = load(j)
  split = LevelSplit(prims.cumsum(x.g, reverse=False), x.g, x.segment, x.carried, x.last, prims)
  local, K = split.G, x.g.shape[1]
  total = last_row(local)

  def earlier(step, carry):
    since, dq, dk = carry
    a = j - 1 - step
    columns = gated("k_to_end", a)
    to_m = exp(local + since)
    mask = same_segment(x.segment, load(a).segment)
    dA_qk = cotangent("A", j, a) * mask
    dA_kk = load_dA_kk(j, a)
    return (since + gated("total", a), dq + dot(dA_qk, columns) * to_m,
            dk + dot(x.beta * dA_kk, columns) * to_m)

  zeros = jnp.zeros_like(x.k)
  G_start, dq, dk = jax.lax.fori_loop(0, j, earlier, (jnp.zeros((1, K), F32), zeros, zeros))

  def later(b, carry):
    gap, dY = carry
    z = load(b)
    mask = same_segment(z.segment, x.segment)
    products = (dot(cotangent("A", b, j) * mask, gated("q_from_start", b), trans_a=True)
                + dot(z.beta * load_dA_kk(b, j), gated("k_from_start", b), trans_a=True))
    return gap + gated("total", b), dY + products * exp(gap)

  gap, dY = jax.lax.fori_loop(j + 1, num_blocks, later, (jnp.zeros((1, K), F32), zeros))

  dA_qk_jj = cotangent("A", j, j) * split.lower
  dA_kk_jj = load_dA_kk(j, j)
  (dq_d, dk_row), (dk_qk, dk_kk), _, _ = split.products_backward(
      [(x.q, x.k, 0), (x.k, x.k, 0)], [dA_qk_jj, x.beta * dA_kk_jj])
  on_diagonal = jnp.sum(jnp.where(iota((SUB, SUB), 0) == iota((SUB, SUB), 1), dA_qk_jj, 0.0),
                        axis=1, keepdims=True)

  G = G_start + local
  gamma = exp(G)
  G_C = G_start + total + gap
  to_end = exp(G_C - G)
  dKg_end = cotangent("Kg", j) * x.last * to_end
  # Rows: the earlier sub-chunks, the diagonal block's rows, W and Qg; columns: the later
  # sub-chunks, the diagonal block's columns, Kg.
  dq_rows = dq + dq_d + cotangent("Qg", j) * x.carried * gamma
  dk_rows = dk + dk_row + load_dk_w(j)
  dk_columns = dY * exp(total - local) + dk_qk + dk_kk + dKg_end
  through_end = jnp.sum(dKg_end * x.k, axis=0, keepdims=True) + jnp.where(
      j == num_blocks - 1, cotangent("decay", None) * last_row(x.carried) * exp(G_C), 0.0)
  dq, dk, dG = rows_and_columns_cotangents(x.q, x.k, on_diagonal, dq_rows, dk_rows, dk_columns)
  store("dq", dq * scale)
  store("dk", dk)
  store("dG", dG)
  store("through_end", through_end)


def dg_from_rows(dG, through_end):
  """dg of one or more chunks ([..., C, K]) from ``gradient_rows``' dG ([..., C, K]) and the
  chunk's through_end rows ([..., C/S, K]): the reverse cumulative sum of dG over the chunk,
  plus dG_C (the sum of through_end) at every row (dG_C belongs to the last row, and every
  row's gate enters G at the last row). Written as the chunk's sum less the cumulative sum
  before each row, which Triton lowers (it has no reversal)."""
  reverse = jnp.sum(dG, axis=-2, keepdims=True) - jnp.cumsum(dG, axis=-2) + dG
  return reverse + jnp.sum(through_end, axis=-2, keepdims=True)
