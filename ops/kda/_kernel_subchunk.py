"""KDA's intra-chunk forward and backward on 16-row sub-chunks: the GPU kernels' register-sized
form of ``_kernel_chunk.intra_forward`` and ``token_gradients`` (same ``ChunkMatrices``, same
gradients, same mathematics, SPEC 3.4-3.6). Below, the forward; ``intra_backward`` describes its
three passes.

Why: the level split on whole [C, K] and [C, C] tiles holds so many of them that the Triton
kernel runs at 255 registers and spills at C = 64 (docs/kernels.md, register report), and each
of its six levels is a full C x K x C product masked to its pairs. Here the chunk's n = C / 16
sub-chunks are the unit, and the forward is three steps, each a kernel of its own on the GPU
(``ops.kda.pallas_gpu``), so that every program is short and many run at once:

  ``pair_rows``       one program per sub-chunk j: row block j of A_qk and A_kk. The diagonal
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

The pair products cost n (n + 1) / 2 block products instead of log2(C) full ones: 10 against 6
C x K x C at C = 64, i.e. 0.63 M against 6.3 M multiply-adds per pair type and head (K = 128).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from ops.kda._kernel_chunk import (F32, Chunk, LevelSplit, Primitives, eye, iota, last_row,
                                   unit_lower_inverse)

SUB = 16  # rows per sub-chunk: the smallest tile Triton's tensor-core products take
GRADIENTS = ("dq", "dk", "dg", "dv", "dbeta")  # intra_backward's outputs, in the token order


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


def pair_rows(load: Callable, j, num_blocks: int, prims: Primitives, store: Callable) -> None:
  """Row block j of A_qk and of M, the pair kernel's work for sub-chunk j (``j`` may be traced:
  the earlier sub-chunks are a loop), each [S, S] block (j, a) handed to
  ``store(name, value, a)``: "A" for A_qk (zeros above the diagonal), "M" for A_kk (its
  blocks above the diagonal are not stored).

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
  store("M", c.A_kk, j)

  def earlier(step, since):
    a = j - 1 - step
    y = load(a)
    local = prims.cumsum(y.g, reverse=False)
    total = last_row(local)
    columns = y.k * jnp.exp(total - local)
    to_m = jnp.exp(c.G + since)
    mask = same_segment(x.segment, y.segment)
    store("A", dot(x.q * to_m, columns, trans_b=True) * mask, a)
    store("M", x.beta * dot(x.k * to_m, columns, trans_b=True) * mask, a)
    return since + total

  jax.lax.fori_loop(0, j, earlier, jnp.zeros((1, x.g.shape[1]), F32))
  zeros = jnp.zeros((SUB, SUB), F32)

  def later(a, carry):
    store("A", zeros, a)
    return carry

  jax.lax.fori_loop(j + 1, num_blocks, later, 0)


def inverse_blocks(load: Callable, num_blocks: int, prims: Primitives, store: Callable) -> None:
  """T = (I + A_kk)^-1 from A_kk's blocks (``load(b, a)``, a <= b, as ``pair_rows`` stores
  them): each diagonal block's inverse T_bb by the level split, then block forward
  substitution; each [S, S] block of T handed to ``store(value, b, a)``, zeros above the
  diagonal."""
  T = []
  for b in range(num_blocks):
    row = [load(b, a) for a in range(b + 1)]
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
  gamma = jnp.exp(G)
  store("W", x.carried * prims.dot(T, x.beta * x.k * gamma))
  store("U", prims.dot(T, x.beta * x.v))
  store("Qg", x.carried * x.q * gamma)
  G_C = last_row(G)
  store("Kg", x.last * x.k * jnp.exp(G_C - G))
  store("decay", last_row(x.carried) * jnp.exp(G_C))


def intra_backward(load: Callable[[int], Rows], cotangent: Callable, num_blocks: int,
                   prims: Primitives, store: Callable, scale: float) -> None:
  """The token gradients of one chunk from the cotangents of its matrices, by sub-chunks: the
  values of ``_kernel_chunk.token_gradients``, handed to ``store(name, value, b)`` as row block
  b of each of ``GRADIENTS`` ([S, width]; dq for the unscaled q; dbeta [S, 1]).

  ``load(b)`` gives sub-chunk b's ``Rows`` (called twice a sub-chunk, once per pass over the
  rows); ``cotangent(name, b, a=None)`` row block b of a matrix's cotangent ([S, width]; block
  (b, a) of "A", [S, S]; the [1, K] "decay" for b = None).

  Three passes, so that only [S, S] blocks and a few [S, K] tiles stay live:
    1. over the sub-chunks in order: G, the off-diagonal P_kk blocks, T by block substitution
       and dT = dW (beta k Gamma)^T + dU (beta v)^T by blocks (rows b of T and dT need
       sub-chunks <= b only);
    2. [S, S] blocks only: dA_kk = -T^T dT T^T on A_kk's support (``block_inverse_backward``)
       and its part of dbeta;
    3. over the sub-chunks in reverse: sub-chunk j's diagonal block by the level split; each
       block (j, a) with an earlier a once, for both of its factors: the rows of j against a's
       gated columns (kept from pass 1), and a's columns against j's gated rows, summed into
       a's column cotangent until a's turn; the cotangents through W, U, Q Gamma,
       K exp(G_C - G) and exp(G_C); dg as the reverse cumulative sum carried over from the
       later sub-chunks. The reference rows m of the off-diagonal factors need no cotangent: a
       pair's weight exp(G_r - G_m) exp(G_m - G_i) does not depend on G_m.
  """
  dot = prims.dot
  n = num_blocks
  eye_part = lambda x: jnp.sum(jnp.where(iota(x.shape, 0) == iota(x.shape, 1), x, 0.0), axis=1,
                               keepdims=True)

  # Pass 1.
  starts, ends = [], []  # G before and at the end of each sub-chunk, [1, K]
  columns = []  # each sub-chunk's gated columns k exp(G_m - G), m its last row
  segments, carried, betas = [], [], []
  P_kk, T, dT = [], [], []  # blocks [b][a], a <= b; P_kk on A_kk's support
  rhs_k, rhs_v = [], []
  through_end = []  # per sub-chunk: the sum over rows of dKg k exp(G_m - G), [1, K]
  G_start = 0.0
  for b in range(n):
    x = load(b)
    c = Chunk(x.q, x.k, x.g, x.beta, x.segment, x.carried, x.last, prims)
    G = G_start + c.G
    kk_row = [dot(x.k * jnp.exp(G - ends[a]), columns[a], trans_b=True)
              * same_segment(x.segment, segments[a]) for a in range(b)] + [c.P_kk * c.strict]
    T.append(substitution_row(T, [x.beta * P for P in kk_row[:-1]] + [c.A_kk], c.T, dot,
                              sign=1.0))
    gamma = jnp.exp(G)
    rhs_k.append(x.beta * x.k * gamma)
    rhs_v.append(x.beta * x.v)
    dW, dU = x.carried * cotangent("W", b), cotangent("U", b)
    dT.append([dot(dW, rhs_k[a], trans_b=True) + dot(dU, rhs_v[a], trans_b=True)
               for a in range(b + 1)])
    G_end = last_row(G)
    columns.append(x.k * jnp.exp(G_end - G))
    through_end.append(jnp.sum(x.last * cotangent("Kg", b) * columns[b], axis=0,
                               keepdims=True))
    starts.append(G_start)
    ends.append(G_end)
    segments.append(x.segment)
    carried.append(x.carried)
    betas.append(x.beta)
    P_kk.append(kk_row)
    G_start = G_end
  G_C = G_start
  dG_C = (sum(e * jnp.exp(G_C - G_m) for e, G_m in zip(through_end, ends))
          + cotangent("decay", None) * last_row(carried[-1]) * jnp.exp(G_C))

  # Pass 2.
  strictly_lower = iota((SUB, SUB), 0) > iota((SUB, SUB), 1)
  dA_kk = block_inverse_backward(T, dT, dot, sign=1.0, support=lambda b, a: jnp.where(
      strictly_lower | (a < b), same_segment(segments[b], segments[a]), 0.0))
  dbeta_kk = [sum(jnp.sum(d * P, axis=1, keepdims=True) for d, P in zip(dA_kk[b], P_kk[b]))
              for b in range(n)]

  # Pass 3.
  dG_after = 0.0  # the sum of dG over the later sub-chunks
  dY = [0.0] * n  # the cotangent of each sub-chunk's gated columns from the later rows
  for j in reversed(range(n)):
    x = load(j)
    split = LevelSplit(prims.cumsum(x.g, reverse=False), x.g, x.segment, x.carried, x.last,
                       prims)
    G = starts[j] + split.G
    gamma = jnp.exp(G)
    dP_kk = [x.beta * d for d in dA_kk[j]]
    dA_qk_jj = cotangent("A", j, j) * split.lower
    (dq, dk_row), (dk_qk, dk_kk), (dG_row,), dG = split.products_backward(
        [(x.q, x.k, 0), (x.k, x.k, 0)], [dA_qk_jj, dP_kk[j]])
    dk = dk_row + dk_qk + dk_kk
    dG = dG + dG_row
    on_diagonal = eye_part(dA_qk_jj)
    dq = dq + on_diagonal * x.k
    dk = dk + on_diagonal * x.q
    for a in range(j):  # block (j, a): j's gated rows against a's gated columns
      to_m = jnp.exp(G - ends[a])
      q_rows, k_rows = x.q * to_m, x.k * to_m
      dA_qk = cotangent("A", j, a) * same_segment(x.segment, segments[a])
      dX_q, dX_k = dot(dA_qk, columns[a]), dot(dP_kk[a], columns[a])
      dq = dq + dX_q * to_m
      dk = dk + dX_k * to_m
      dG = dG + q_rows * dX_q + k_rows * dX_k
      dY[a] = dY[a] + dot(dA_qk, q_rows, trans_a=True) + dot(dP_kk[a], k_rows, trans_a=True)
    column = x.k * jnp.exp(ends[j] - G)
    dk = dk + dY[j] * jnp.exp(ends[j] - G)
    dG = dG - dY[j] * column

    dX_w = sum(dot(T[b][j], carried[b] * cotangent("W", b), trans_a=True) for b in range(j, n))
    dX_u = sum(dot(T[b][j], cotangent("U", b), trans_a=True) for b in range(j, n))
    dbeta = (dbeta_kk[j] + jnp.sum(dX_w * x.k * gamma, axis=1, keepdims=True)
             + jnp.sum(dX_u * x.v, axis=1, keepdims=True))
    dk = dk + dX_w * x.beta * gamma
    dG = dG + dX_w * x.beta * x.k * gamma
    dQg = cotangent("Qg", j) * x.carried
    dq = dq + dQg * gamma
    dG = dG + dQg * x.q * gamma
    dKg = cotangent("Kg", j) * x.last
    to_end = jnp.exp(G_C - G)
    dk = dk + dKg * to_end
    dG = dG - dKg * x.k * to_end
    if j == n - 1:
      dG = dG + jnp.where(iota(dG.shape, 0) == SUB - 1, dG_C, 0.0)
    store("dq", dq * scale, j)
    store("dk", dk, j)
    store("dg", prims.cumsum(dG, reverse=True) + dG_after, j)
    store("dv", dX_u * x.beta, j)
    store("dbeta", dbeta, j)
    dG_after = dG_after + jnp.sum(dG, axis=0, keepdims=True)
