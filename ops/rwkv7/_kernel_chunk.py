"""The chunkwise RWKV-7 mathematics shared by the Pallas GPU and TPU kernels (SPEC 2.5).

Every function here works on values already loaded from one chunk of C tokens of one (batch,
head): r, w, k, a, b [C, K] float32 (r scaled, w the log decay <= 0), v [C, V], and the
packed-row masks. The backends differ only in KDA's ``Primitives`` (``ops.kda._kernel_chunk``),
of which these chunks also need ``shift``. The level split of the pair products and the
unit lower-triangular inverse are KDA's ``LevelSplit``.

With S [K, V] the state before the chunk, G the inclusive chunk-local cumulative log decay and
G~ the exclusive one (G shifted down one row, first row 0: a shift, not G - w, whose rounding
would put an error of G's spacing, 6e-5 at G = -640, on the neighbours' undecayed weight
exp(G~_t - G_{t-1}) = 1), the pair products are

  A_ab[t, i] = sum_d a_td b_id exp(G~_td - G_id)   (i < t);   A_ak likewise with k,
  A_rb[t, i] = sum_d r_td b_id exp(G_td - G_id)    (i <= t);  A_rk likewise with k,

with the level split's row gate G~ for the strict ones (exp(G~_t - G_m) <= 1 as t - 1 >= m)
and G for the inclusive ones. X_t = a_t^T S_{t-1} (the row token t removes) satisfies
X = A_ab X + (a exp(G~)) S + A_ak v, so with T = (I - A_ab)^-1:

  intra_forward     W = carried T (a exp(G~)), U = T (A_ak v), r exp(G) (carried rows),
                    A_rb, Y = A_rk v, b and k times exp(G_C - G) (last-segment rows), exp(G_C)
  state_forward     X = U + W S, o = (r exp(G)) S + A_rb X + Y,
                    S' = exp(G_C) S + (b exp(G_C - G))^T X + (k exp(G_C - G))^T v
  state_backward    dO, dS' -> the cotangents of those matrices and dS before the chunk
                    (``state_step_backward``: dS before and dX, for the reverse walk;
                    ``state_cotangents``: the rest, from S, dS, X and dX, chunk by chunk)
  intra_backward    those cotangents -> dr, dw, dk, dv, da, db

Packed rows: every pair product is masked to the same segment, the incoming state reaches only
the rows that continue the segment running before the chunk (``carried``), and only the rows
of the chunk's last segment reach the outgoing state (``last``).

The backward by hand: T = (I - A_ab)^-1 gives dA_ab = T^T dT T^T on A_ab's strict support; the
level products' cotangents are ``LevelSplit.products_backward``'s; G~ = shift(G) sends dG~_t to
dG_{t-1}, and G = cumsum(w) gives dw = reverse-cumsum(dG + dG~) - dG~ (no shift needed).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ops.kda._kernel_chunk import (F32, LevelSplit, Primitives, exp, eye, iota, last_row,
                                   state_backward_forms)


def shift_matrix(C: int):
  """[C, C] float32 with ones at (t, t - 1): ``shift_matrix(C) @ x`` moves x down one row."""
  return (iota((C, C), 0) == iota((C, C), 1) + 1).astype(F32)


def _diagonal(A):
  """The diagonal of a [C, C] tile as a [C, 1] column."""
  C = A.shape[0]
  return jnp.sum(jnp.where(iota((C, C), 0) == iota((C, C), 1), A, 0.0), axis=1, keepdims=True)


class Chunk(LevelSplit):
  """One chunk's gates, masks, pair products and T = (I - A_ab)^-1.

  Args:
    r, w, k, a, b: [C, K] float32; r scaled, w the log decay (<= 0).
    segment: [C, 1] float32 segment index of each token (non-decreasing).
    carried: [C, 1] float32 0/1, the token continues the segment running before the chunk.
    last: [C, 1] float32 0/1, the token belongs to the chunk's last segment.
    prims: the backend's ``Primitives``, ``shift`` included.
  """

  def __init__(self, r, w, k, a, b, segment, carried, last, prims: Primitives):
    G = prims.cumsum(w, reverse=False)
    G_before = prims.shift(G)
    # The level references select G at a block's end (TPU: G before a block too); the GPU's take
    # the value before a block as G - steps at its first row: with steps = G - G~ that is G~
    # itself up to the rounding of the step G - G~, not the larger rounding of G - w.
    super().__init__(G, G - G_before, segment, carried, last, prims)
    C = self.C
    self.r, self.k, self.a, self.b = r, k, a, b
    self.G_before = G_before
    P_ab, P_ak, P_rb, P_rk = self.products(self.pairs, self.row_gates)
    self.A_ab, self.A_ak = P_ab * self.strict, P_ak * self.strict
    self.A_rb = (P_rb + eye(C) * jnp.sum(r * b, axis=1, keepdims=True)) * self.lower
    self.A_rk = (P_rk + eye(C) * jnp.sum(r * k, axis=1, keepdims=True)) * self.lower
    self.T = self.inverse(-self.A_ab)

  @property
  def row_gates(self):
    return (self.G_before, self.G)

  @property
  def pairs(self):
    """(rows, columns, row gate) of A_ab, A_ak (gate G~) and A_rb, A_rk (gate G)."""
    return [(self.a, self.b, 0), (self.a, self.k, 0), (self.r, self.b, 1), (self.r, self.k, 1)]


class ChunkMatrices(NamedTuple):
  """What the state pass reads per chunk (float32 values)."""

  W: jax.Array  # [C, K] carried T (a exp(G~))
  U: jax.Array  # [C, V] T (A_ak v)
  Rg: jax.Array  # [C, K] carried r exp(G)
  A: jax.Array  # [C, C] A_rb
  Y: jax.Array  # [C, V] A_rk v
  Bg: jax.Array  # [C, K] last b exp(G_C - G)
  Kg: jax.Array  # [C, K] last k exp(G_C - G)
  values: jax.Array  # [C, V] v
  decay: jax.Array  # [1, K] exp(G_C) where the last segment is carried, else 0


def intra_forward(c: Chunk, v) -> ChunkMatrices:
  dot = c.prims.dot
  G_last = last_row(c.G)
  to_end = c.last * exp(G_last - c.G)
  return ChunkMatrices(
      W=c.carried * dot(c.T, c.a * exp(c.G_before)), U=dot(c.T, dot(c.A_ak, v)),
      Rg=c.carried * c.r * exp(c.G), A=c.A_rb, Y=dot(c.A_rk, v), Bg=c.b * to_end,
      Kg=c.k * to_end, values=v, decay=c.carried_last * exp(G_last))


def _removed_rows(S, m: ChunkMatrices, dot):
  """X = U + W S [C, V]: the rows the tokens remove, read by both o and the next state."""
  return m.U + dot(m.W, S)


def state_forward(S, m: ChunkMatrices, dot):
  """(o [C, V], the state after the chunk, X [C, V]) from the state S [K, V] before it."""
  X = _removed_rows(S, m, dot)
  o = dot(m.Rg, S) + dot(m.A, X) + m.Y
  S = (jnp.transpose(m.decay) * S + dot(m.Bg, X, trans_a=True)
       + dot(m.Kg, m.values, trans_a=True))
  return o, S, X


def _removed_rows_cotangent(dS, m, dO, dot):
  """dX [C, V], X = U + W S feeding both o and the next state."""
  return dot(m.A, dO, trans_a=True) + dot(m.Bg, dS)


def state_cotangents(S, dS, X, dX, m, dO, dot):
  """The chunk matrices' cotangents from S before the chunk, dS after it, X and dX (as KDA's
  ``state_cotangents``)."""
  return ChunkMatrices(
      W=dot(dX, S, trans_b=True), U=dX, Rg=dot(dO, S, trans_b=True),
      A=dot(dO, X, trans_b=True), Y=dO, Bg=dot(X, dS, trans_b=True),
      Kg=dot(m.values, dS, trans_b=True), values=dot(m.Kg, dS),
      decay=jnp.transpose(jnp.sum(dS * S, axis=1, keepdims=True)))


def _state_before_cotangent(dS, dX, m, dO, dot):
  return (jnp.transpose(m.decay) * dS + dot(m.Rg, dO, trans_a=True)
          + dot(m.W, dX, trans_a=True))


state_backward, state_step_backward = state_backward_forms(
    _removed_rows, _removed_rows_cotangent, state_cotangents, _state_before_cotangent)


def intra_backward(c: Chunk, v, d: ChunkMatrices):
  """(dr, dw, dk, dv, da, db) of one chunk, each like its input, from the cotangents of its
  ``ChunkMatrices``; dr is for the scaled r."""
  dot = c.prims.dot
  C = c.C
  gamma, gamma_before = exp(c.G), exp(c.G_before)
  G_last = last_row(c.G)
  to_end = exp(G_last - c.G)

  # W = carried T (a exp(G~)), U = T Z with Z = A_ak v.
  dW = c.carried * d.W
  X_a, Z = c.a * gamma_before, dot(c.A_ak, v)
  dT = dot(dW, X_a, trans_b=True) + dot(d.U, Z, trans_b=True)
  dX_a, dZ = dot(c.T, dW, trans_a=True), dot(c.T, d.U, trans_a=True)
  # T = (I - A_ab)^-1: dA_ab = T^T dT T^T on A_ab's support.
  dA_ab = dot(dot(c.T, dT, trans_a=True, inverse=True), c.T, trans_b=True,
              inverse=True) * c.strict
  dA_ak = dot(dZ, v, trans_b=True) * c.strict
  dA_rb = d.A * c.lower
  dA_rk = dot(d.Y, v, trans_b=True) * c.lower
  dv = d.values + dot(c.A_ak, dZ, trans_a=True) + dot(c.A_rk, d.Y, trans_a=True)

  (da_b, da_k, dr_b, dr_k), (db_a, dk_a, db_r, dk_r), (dG_before, dG_row), dG = (
      c.products_backward(c.pairs, [dA_ab, dA_ak, dA_rb, dA_rk], c.row_gates))
  diagonal_rb, diagonal_rk = _diagonal(dA_rb), _diagonal(dA_rk)
  dr = dr_b + dr_k + diagonal_rb * c.b + diagonal_rk * c.k
  da = da_b + da_k + dX_a * gamma_before
  db = db_a + db_r + diagonal_rb * c.r
  dk = dk_a + dk_r + diagonal_rk * c.r
  dG_before = dG_before + dX_a * X_a
  dG = dG + dG_row

  # r exp(G) (carried rows), b and k times exp(G_C - G) (last-segment rows), exp(G_C).
  dRg = c.carried * d.Rg
  dr = dr + dRg * gamma
  dG = dG + dRg * c.r * gamma
  dBg, dKg = c.last * d.Bg, c.last * d.Kg
  db = db + dBg * to_end
  dk = dk + dKg * to_end
  through_end = (dBg * c.b + dKg * c.k) * to_end
  dG = dG - through_end
  dG_last = (jnp.sum(through_end, axis=0, keepdims=True)
             + d.decay * c.carried_last * exp(G_last))
  dG = dG + jnp.where(iota((C, 1), 0) == C - 1, dG_last, 0.0)
  # G~_t = G_{t-1} and G = cumsum(w): dw_t = sum_{j >= t} dG_j + sum_{j > t} dG~_j.
  dw = c.prims.cumsum(dG + dG_before, reverse=True) - dG_before
  return dr, dw, dk, dv, da, db


def load(tokens, segment, carried, last, prims: Primitives, scale: float) -> Chunk:
  """The chunk from its token inputs (r, w, k, a, b, v) as float32 [C, width] tiles (r unscaled)
  and the packed-row masks: what the kernels of both backends call. (The intra backward does not
  read A_rb; ``pallas_call``'s dead-code elimination drops its work there.)"""
  r, w, k, a, b, _ = tokens
  return Chunk(r * scale, w, k, a, b, segment, carried, last, prims)


def token_gradients(c: Chunk, v, cotangents, scale: float):
  """The token inputs' gradients (dr, dw, dk, da, db, dv: their order, dr for the unscaled r)
  from the cotangents of the chunk's ``ChunkMatrices``."""
  dr, dw, dk, dv, da, db = intra_backward(c, v, cotangents)
  return dr * scale, dw, dk, da, db, dv
