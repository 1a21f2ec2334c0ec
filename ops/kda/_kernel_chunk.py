"""The chunkwise KDA mathematics shared by the Pallas GPU and TPU kernels (SPEC 3.3-3.6).

Every function here works on values already loaded from one chunk of one (batch, value head):
q, k, g [C, K] float32 (q scaled), v [C, V], beta [C, 1], and the packed-row masks. The two
backends differ only in a few primitives, passed in as a ``Primitives``: the matrix product's
operand dtype and precision, the cumulative sums over rows and the reference gates of each level
(Triton has ``cumsum`` and 3-D reshapes; Mosaic takes both as exact matrix products), and how
the same-segment mask is formed.

Stable pair products without a per-token loop (SPEC 3.5). The products
sum_d x_rd y_id exp(G_rd - G_id) (i < r) are split by the highest bit in which r and i differ:
at level s (s = 1, 2, ..., C/2) row r lies in an odd block of s rows and column i in the block
just before it. With m the last row of i's block (i <= m < r),
exp(G_r - G_i) = exp(G_r - G_m) exp(G_m - G_i): both exponents are <= 0 because the cumulative
log decay only falls, so nothing overflows, and each level is one C x K x C matrix product of
gated rows and gated columns, masked to the level's pairs. The unit lower-triangular inverse uses
the same levels: T_2s = T_s - T_s (A masked to level s) T_s is the 2 x 2 block inverse
[[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]] at every scale: two products a level, no power
series.

``LevelSplit`` holds this machinery for any chunk's cumulative gate and also serves RWKV-7's
kernels (``ops.rwkv7._kernel_chunk``), whose strict pair products take their rows' gate one token
early (the exclusive cumulative gate): the row gate is a parameter of the level loop.

Per chunk, with S the state before it (all float32):

  intra_forward     W = carried T (beta k Gamma), U = T (beta v), Q Gamma (carried rows),
                    K exp(G_C - G) (last-segment rows), A_qk, the state decay exp(G_C)
  state_forward     V~ = U - W S, O = (Q Gamma) S + A_qk V~, S' = decay S + Kg^T V~
  state_backward    dS -> dU, dW, dQg, dKg, dA_qk, d decay and the dS before the chunk
                    (``state_step_backward``: the dS before and dV~, for the reverse walk;
                    ``state_cotangents``: the rest, from S, dS, V~ and dV~, chunk by chunk)
  intra_backward    those cotangents -> dq, dk, dv, dg, dbeta
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32
LOG2E = 1.4426950408889634  # log2(e)


def exp(x):
  """e**x as exp2(x log2(e)): a multiply and one special-function instruction on a GPU, where
  ``jnp.exp`` is a libdevice call of about ten instructions (relative error ~1e-7 either way at
  the gates' magnitudes)."""
  return jnp.exp2(x * LOG2E)


class Primitives(NamedTuple):
  """What a backend supplies.

  dot(a, b, *, trans_a, trans_b, inverse) -> float32 a @ b of 2-D tiles (``inverse`` marks the
    triangular inverse's [C, C] products, which may want more precision).
  cumsum(x, reverse) -> inclusive cumulative sum over rows of [C, K] (reverse: from the end).
  level_references(G, g, s) -> (G before each row's block of s rows, G at the end of each row's
    block), both [C, K].
  same_segment(segment) -> [C, C] float 0/1, rows r and i in the same segment, from the
    segment index column [C, 1].
  shift(x) -> [C, N] x moved down one row (the first row zero), exactly: RWKV-7's exclusive
    cumulative gate from the inclusive one. KDA's chunks leave it None.
  """

  dot: Callable
  cumsum: Callable
  level_references: Callable
  same_segment: Callable
  shift: Callable | None = None


def chunk_size_problem(chunk_size: int, implementation: str) -> str | None:
  """The kernels' one limit on a call: the chunk is a power of two >= 16 (the level split halves
  it down to single rows; 16 rows fill the sublanes of a bfloat16 tile)."""
  if chunk_size < 16 or chunk_size & (chunk_size - 1):
    return f"chunk_size must be a power of two >= 16 for {implementation}, got {chunk_size}"
  return None


def iota(shape, axis):
  return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def levels(C: int) -> list[int]:
  return [1 << j for j in range(C.bit_length() - 1)]


def level_mask(C: int, s: int):
  """Pairs (r, i) whose highest differing bit is s: r in an odd block of s rows, i in the block
  before it (shifts and masks only: s is a power of two)."""
  shift = s.bit_length() - 1
  rows, cols = iota((C, C), 0) >> shift, iota((C, C), 1) >> shift
  return ((rows == cols + 1) & ((rows & 1) == 1)).astype(F32)


def last_row(x):
  """The last row of a tile as [1, N]."""
  return jnp.sum(jnp.where(iota(x.shape, 0) == x.shape[0] - 1, x, 0.0), axis=0, keepdims=True)


def eye(C: int):
  return (iota((C, C), 0) == iota((C, C), 1)).astype(F32)


def unit_lower_inverse(A, dot):
  """(I + A)^-1 for a strictly lower-triangular A [C, C] (C a power of two), one 2 x 2 block
  step per level with ``dot`` (a ``Primitives.dot``)."""
  C = A.shape[0]
  T = eye(C)
  for s in levels(C):
    T = T - dot(dot(T, A * level_mask(C, s), inverse=True), T, inverse=True)
  return T


class LevelSplit:
  """The level split of one chunk's cumulative log gate: pair products and the unit
  lower-triangular inverse, level by level; and the chunk's packed-row masks.

  Args:
    G: [C, K] float32, the inclusive cumulative log gate of the chunk (non-increasing down rows).
    steps: [C, K] float32, G's increment at each row (G minus the exclusive cumulative gate),
      which the backends' ``level_references`` may read.
    segment: [C, 1] float32 segment index of each token (non-decreasing).
    carried: [C, 1] float32 0/1, the token continues the segment running before the chunk.
    last: [C, 1] float32 0/1, the token belongs to the chunk's last segment.
    prims: the backend's ``Primitives``.

  Besides those it holds ``carried_last`` ([1, 1], the last token is carried) and ``lower`` and
  ``strict`` ([C, C] 0/1: pairs i <= r, and i < r, of one segment).
  """

  def __init__(self, G, steps, segment, carried, last, prims: Primitives):
    self.C, self.G, self.steps, self.prims = G.shape[0], G, steps, prims
    self.carried, self.last = carried, last
    self.carried_last = last_row(carried)
    rows, cols = iota((self.C, self.C), 0), iota((self.C, self.C), 1)
    same = prims.same_segment(segment)
    self.lower = jnp.where(rows >= cols, same, 0.0)
    self.strict = jnp.where(rows > cols, same, 0.0)

  def levels(self, row_gates=None):
    """Per level: (row factors, column factor, pair mask), formed when the loop reaches it so
    that one level's factors are live at a time.

    The row factors are exp(R - before) [C, K] for each row gate R of ``row_gates`` (default:
    G alone); the column factor is exp(end - G) [C, K]; the mask [C, C] keeps the level's pairs.
    For a level pair (r, i), before_r = end_i = G_m (m the last row of i's block), so the pair's
    weight is exp(R_r - G_i) with both exponents <= 0 for any R_r <= G_m: G itself and the
    exclusive gate G_{r-1} (r - 1 >= m).
    """
    row_gates = (self.G,) if row_gates is None else row_gates
    for s in levels(self.C):
      before, end = self.prims.level_references(self.G, self.steps, s)
      yield ([exp(R - before) for R in row_gates], exp(end - self.G),
             level_mask(self.C, s))

  def products(self, pairs, row_gates=None):
    """sum_d x_rd y_id exp(R_rd - G_id) for i < r (zero elsewhere), [C, C] for each (x, y, j)
    in ``pairs``: x, y [C, K] and R = row_gates[j] (default: G, j = 0)."""
    totals = [0.0] * len(pairs)
    for rows, col, mask in self.levels(row_gates):
      totals = [total + mask * self.prims.dot(x * rows[j], y * col, trans_b=True)
                for total, (x, y, j) in zip(totals, pairs)]
    return totals

  def products_backward(self, pairs, cotangents, row_gates=None):
    """The cotangents of ``products(pairs, row_gates)`` from one [C, C] cotangent per product
    (entries i >= r are not read).

    Returns (dx per pair, dy per pair, dR per row gate, dG through the column factors), each
    [C, K]. The level references need none: a level pair's weight exp(R_r - G_m) exp(G_m - G_i)
    does not depend on G_m. Nor do the gates need sums of their own: a product reads x only as
    x exp(R) and y only as y exp(-G), so dR_j = sum of x dx over the pairs with row gate j and
    dG = -sum of y dy, formed once from dx and dy after the levels.
    """
    row_gates = (self.G,) if row_gates is None else row_gates
    dot = self.prims.dot
    dx, dy = [0.0] * len(pairs), [0.0] * len(pairs)
    for rows, col, mask in self.levels(row_gates):
      for n, ((x, y, j), dP) in enumerate(zip(pairs, cotangents)):
        dP_l = dP * mask
        dx[n] = dx[n] + dot(dP_l, y * col) * rows[j]
        dy[n] = dy[n] + dot(dP_l, x * rows[j], trans_a=True) * col
    dR = [sum(x * dx[n] for n, (x, _, i) in enumerate(pairs) if i == j)
          for j in range(len(row_gates))]
    dG = -sum(y * dy[n] for n, (_, y, _) in enumerate(pairs))
    return dx, dy, dR, dG

  def inverse(self, A):
    """(I + A)^-1 for the strictly lower-triangular A [C, C] (``unit_lower_inverse``)."""
    return unit_lower_inverse(A, self.prims.dot)


class Chunk(LevelSplit):
  """One chunk's gates, masks and the matrices both intra kernels need.

  Args:
    q, k, g: [C, K] float32, q scaled; g the log decay (<= 0).
    beta: [C, 1] float32.
    segment: [C, 1] float32 segment index of each token (non-decreasing).
    carried: [C, 1] float32 0/1, the token continues the segment running before the chunk.
    last: [C, 1] float32 0/1, the token belongs to the chunk's last segment.
    prims: the backend's ``Primitives``.

  The intra backward does not read P_qk; ``pallas_call`` drops the work of values a kernel does
  not use when it traces it (dead-code elimination), so one class serves both kernels.
  """

  def __init__(self, q, k, g, beta, segment, carried, last, prims: Primitives):
    super().__init__(prims.cumsum(g, reverse=False), g, segment, carried, last, prims)
    self.q, self.k, self.g, self.beta = q, k, g, beta
    self.P_qk, self.P_kk = self.products([(q, k, 0), (k, k, 0)])
    self.A_kk = beta * self.P_kk * self.strict
    self.T = self.inverse(self.A_kk)


def load(tokens, segment, carried, last, prims: Primitives, scale: float) -> Chunk:
  """The chunk from its token inputs (q, k, g, v, beta) as float32 [C, width] tiles (q unscaled)
  and the packed-row masks: what the kernels of both backends call."""
  q, k, g, _, beta = tokens
  return Chunk(q * scale, k, g, beta, segment, carried, last, prims)


def token_gradients(c: Chunk, v, cotangents, scale: float):
  """The token inputs' gradients (dq, dk, dg, dv, dbeta: their order, dq for the unscaled q)
  from the cotangents of the chunk's ``ChunkMatrices``."""
  dq, dk, dv, dg, dbeta = intra_backward(c, v, cotangents)
  return dq * scale, dk, dg, dv, dbeta


def packed_row_masks(segment_index, batch: int, time: int, C: int):
  """(segment, carried, last), each [B, T_pad, 1] float32 with T_pad = time rounded up to C.

  ``segment`` is the segment index of each token (zeros without packing), ``carried`` marks the
  tokens that continue the segment running before their chunk (the first token's own segment for
  chunk 0), ``last`` the tokens of their chunk's last segment. Padded tokens extend the last
  segment.
  """
  padded = -(-time // C) * C
  if segment_index is None:
    index = jnp.zeros((batch, padded), jnp.int32)
  else:
    index = jnp.pad(segment_index.astype(jnp.int32), [(0, 0), (0, padded - time)], mode="edge")
  chunks = index.reshape(batch, padded // C, C)
  before = jnp.concatenate([chunks[:, :1, :1], chunks[:, :-1, -1:]], axis=1)
  as_column = lambda x: x.astype(F32).reshape(batch, padded, 1)
  return as_column(index), as_column(chunks == before), as_column(chunks == chunks[:, :, -1:])


class ChunkMatrices(NamedTuple):
  """What the state pass reads per chunk (float32 values)."""

  W: jax.Array  # [C, K]
  U: jax.Array  # [C, V]
  Qg: jax.Array  # [C, K]
  Kg: jax.Array  # [C, K]
  A: jax.Array  # [C, C]
  decay: jax.Array  # [1, K]


def intra_forward(c: Chunk, v) -> ChunkMatrices:
  gamma = exp(c.G)
  G_last = last_row(c.G)
  diagonal = jnp.where(iota((c.C, c.C), 0) == iota((c.C, c.C), 1),
                       jnp.sum(c.q * c.k, axis=1, keepdims=True), 0.0)
  return ChunkMatrices(
      W=c.carried * c.prims.dot(c.T, c.beta * c.k * gamma),
      U=c.prims.dot(c.T, c.beta * v),
      Qg=c.carried * c.q * gamma,
      Kg=c.last * c.k * exp(G_last - c.G),
      A=(c.P_qk + diagonal) * c.lower,
      decay=c.carried_last * exp(G_last))


def _pseudo_values(S, m: ChunkMatrices, dot):
  """V~ = U - W S [C, V]: the values both o and the next state read."""
  return m.U - dot(m.W, S)


def state_forward(S, m: ChunkMatrices, dot):
  """(o [C, V], the state after the chunk, V~ [C, V]) from the state S [K, V] before it."""
  pseudo_values = _pseudo_values(S, m, dot)
  o = dot(m.Qg, S) + dot(m.A, pseudo_values)
  return (o, jnp.transpose(m.decay) * S + dot(m.Kg, pseudo_values, trans_a=True),
          pseudo_values)


def _pseudo_values_cotangent(dS, m, dO, dot):
  """d V~ [C, V], V~ = U - W S feeding both o and the next state."""
  return dot(m.A, dO, trans_a=True) + dot(m.Kg, dS)


def state_cotangents(S, dS, pseudo_values, d_pseudo, m, dO, dot):
  """The chunk matrices' cotangents (a ``ChunkMatrices``) from the state S before the chunk,
  the dS after it, V~ and dV~ (``state_forward``'s and ``state_step_backward``'s): independent
  across chunks once the walk has given every dS and dV~; the entries other than [C, V] are
  sums over this value block only (the caller adds the other value blocks)."""
  return ChunkMatrices(
      W=-dot(d_pseudo, S, trans_b=True), U=d_pseudo, Qg=dot(dO, S, trans_b=True),
      Kg=dot(pseudo_values, dS, trans_b=True), A=dot(dO, pseudo_values, trans_b=True),
      decay=jnp.transpose(jnp.sum(dS * S, axis=1, keepdims=True)))


def _state_before_cotangent(dS, d_pseudo, m, dO, dot):
  return (jnp.transpose(m.decay) * dS + dot(m.Qg, dO, trans_a=True)
          - dot(m.W, d_pseudo, trans_a=True))


def state_backward_forms(shared_values: Callable, shared_cotangent: Callable,
                         cotangents: Callable, before: Callable):
  """An op's chunk of ``state_forward`` differentiated, in the two forms the kernels call, from
  its parts: ``shared_values(S, m, dot)``, the values [C, V] that feed both o and the next
  state (KDA's V~, RWKV-7's X); ``shared_cotangent(dS, m, dO, dot)``, their cotangent;
  ``cotangents(S, dS, shared, d_shared, m, dO, dot)``, the chunk matrices' cotangents (the
  op's ``state_cotangents``); ``before(dS, d_shared, m, dO, dot)``, the dS before the chunk.
  Returns:

  state_backward(S, dS, m, dO, dot): ``(ChunkMatrices of cotangents, dS before the chunk)``
    from dO [C, V] and dS [K, V] after the chunk, all in one (the TPU kernels' walk).
  state_step_backward(dS, m, dO, dot): ``(dS before the chunk, d_shared [C, V])``, what the
    reverse walk over the chunks needs and gives ``cotangents`` (no state S).
  """
  def state_backward(S, dS, m, dO, dot):
    d_shared = shared_cotangent(dS, m, dO, dot)
    return (cotangents(S, dS, shared_values(S, m, dot), d_shared, m, dO, dot),
            before(dS, d_shared, m, dO, dot))

  def state_step_backward(dS, m, dO, dot):
    d_shared = shared_cotangent(dS, m, dO, dot)
    return before(dS, d_shared, m, dO, dot), d_shared

  return state_backward, state_step_backward


state_backward, state_step_backward = state_backward_forms(
    _pseudo_values, _pseudo_values_cotangent, state_cotangents, _state_before_cotangent)


def rows_and_columns_cotangents(q, k, diagonal, dq_rows, dk_rows, dk_columns):
  """(dq, dk, dG) of the intra backward from its sums by kind. Apart from the diagonal of A_qk
  (q . k, no gate; ``diagonal`` its cotangent [.., 1]), every term reads q and k either as rows,
  q exp(G) and k exp(G) (the pair products' rows, W, Q Gamma: ``dq_rows``, ``dk_rows``), or as
  columns, k exp(-G) (the pair products' columns, Kg: ``dk_columns``), so the cotangent of the
  cumulative gate G is q dq_rows + k (dk_rows - dk_columns), formed once."""
  return (dq_rows + diagonal * k, dk_rows + dk_columns + diagonal * q,
          q * dq_rows + k * (dk_rows - dk_columns))


def wy_dT(k, v, beta, gamma, carried, dW, dU, dot):
  """dT [C, C] for W = carried T (beta k Gamma) and U = T (beta v), from k, Gamma = exp(G)
  [C, K], v [C, V], beta, carried [C, 1] and dW, dU; over a block of the K and V columns, that
  block's part of the sum."""
  return (dot(carried * dW, beta * k * gamma, trans_b=True)
          + dot(dU, beta * v, trans_b=True))


def wy_dA_kk(T, dT, strict, dot):
  """dA_kk = -T^T dT T^T on A_kk's support ``strict``, for T = (I + A_kk)^-1."""
  return -dot(dot(T, dT, trans_a=True, inverse=True), T, trans_b=True, inverse=True) * strict


def wy_columns(T, k, v, beta, gamma, carried, dW, dU, dot):
  """(dv [C, V], dk's part through W [C, K] (a row term, exp(G) scaled), dbeta's part through
  W and U [C, 1]) for W and U as ``wy_dT``'s, column-wise in K and V (dbeta a sum over them)."""
  dX_w, dX_u = dot(T, carried * dW, trans_a=True), dot(T, dU, trans_a=True)
  dbeta = (jnp.sum(dX_w * k * gamma, axis=1, keepdims=True)
           + jnp.sum(dX_u * v, axis=1, keepdims=True))
  return dX_u * beta, dX_w * beta * gamma, dbeta


def wy_backward(T, P_kk, k, v, beta, gamma, carried, strict, dW, dU, dot):
  """The cotangents through W = carried T (beta k Gamma) and U = T (beta v), T = (I + A_kk)^-1,
  A_kk = beta P_kk, of one chunk: from T, P_kk [C, C], k, Gamma = exp(G) [C, K], v [C, V],
  beta and carried [C, 1], A_kk's 0/1 support ``strict`` and dW, dU. Returns (dA_kk [C, C],
  dbeta [C, 1] through A_kk, W and U, dv [C, V], dk's part through W [C, K])."""
  dA_kk = wy_dA_kk(T, wy_dT(k, v, beta, gamma, carried, dW, dU, dot), strict, dot)
  dv, dk_w, dbeta = wy_columns(T, k, v, beta, gamma, carried, dW, dU, dot)
  return dA_kk, dbeta + jnp.sum(dA_kk * P_kk, axis=1, keepdims=True), dv, dk_w


def intra_backward(c: Chunk, v, d: ChunkMatrices):
  """(dq, dk, dv, dg, dbeta [C, 1]) of one chunk from the cotangents of its ``ChunkMatrices``;
  dq is for the scaled q."""
  C = c.C
  q, k, beta = c.q, c.k, c.beta
  gamma = exp(c.G)
  G_last = last_row(c.G)
  to_end = exp(G_last - c.G)

  dA_kk, dbeta, dv, dk_w = wy_backward(c.T, c.P_kk, k, v, beta, gamma, c.carried, c.strict,
                                       d.W, d.U, c.prims.dot)
  dA_qk = d.A * c.lower
  (dq_pairs, dk_row), (dk_qk, dk_kk), _, _ = c.products_backward(
      [(q, k, 0), (k, k, 0)], [dA_qk, beta * dA_kk])
  diagonal = jnp.sum(jnp.where(iota((C, C), 0) == iota((C, C), 1), dA_qk, 0.0), axis=1,
                     keepdims=True)
  # Q Gamma (carried rows), K exp(G_C - G) (last-segment rows), exp(G_C) (the state decay).
  dKg_end = d.Kg * c.last * to_end
  dq, dk, dG = rows_and_columns_cotangents(
      q, k, diagonal, dq_rows=dq_pairs + d.Qg * c.carried * gamma,
      dk_rows=dk_row + dk_w, dk_columns=dk_qk + dk_kk + dKg_end)
  dG_last = (jnp.sum(dKg_end * k, axis=0, keepdims=True)
             + d.decay * c.carried_last * exp(G_last))
  dG = dG + jnp.where(iota((C, 1), 0) == C - 1, dG_last, 0.0)
  # G = cumsum(g): dg_r = sum_{j >= r} dG_j.
  dg = c.prims.cumsum(dG, reverse=True)
  return dq, dk, dv, dg, dbeta
