"""Chunkwise KDA as Pallas GPU kernels (implementation ``"pallas_gpu"``), SPEC 3.3-3.6.

Four kernels, in fla's split (SPEC 3.4, 3.6) between work that is parallel over chunks and the
one walk over the chunks that carries the state:

  intra forward    grid (B, HV, chunks)   per chunk: G = cumsum(g), A_qk, A_kk, T = (I + A_kk)^-1,
                                          W, U, Q*Gamma, K*exp(G_C - G), exp(G_C)
  state forward    grid (B, HV, V/BV)     walks the chunks: V~ = U - W S, O = (Q Gamma) S + A_qk V~,
                                          S' = diag(exp G_C) S + Kg^T V~ (keeps S per chunk)
  state backward   grid (B, HV, V/BV)     walks the chunks backwards with dS: dU, dW, dQg, dKg,
                                          dA_qk, d exp(G_C) (summed over V blocks outside)
  intra backward   grid (B, HV, chunks)   recomputes the chunk's matrices and takes those
                                          cotangents to dq, dk, dv, dg, dbeta

Stable pair products without a secondary loop (SPEC 3.5). The pair products
sum_d x_rd y_id exp(G_rd - G_id) (i < r) are split by the highest bit in which r and i differ:
at level s (s = 1, 2, ..., C/2) row r lies in an odd block of s rows and column i in the block
just before it. With m the last row of i's block (so i <= m < r),
exp(G_r - G_i) = exp(G_r - G_m) exp(G_m - G_i): both exponents are <= 0 because the cumulative
log decay only falls, so nothing overflows, and at each level the product is one C x K x C
matrix product of gated rows and gated columns, masked to the level's pairs. The unit
lower-triangular inverse uses the same levels: T_2s = T_s - T_s (A masked to level s) T_s is the
2 x 2 block inverse [[L11^-1, 0], [-L22^-1 L21 L11^-1, L22^-1]] at every scale, two matrix
products a level, no power series.

Why the Triton backend (a plain ``pallas_call`` on GPU would go to Mosaic GPU): every kernel here
is a sequence of small matrix products (C = 64 rows, K, V <= 128) and elementwise work on
register-resident tiles, with reductions and masks whose layouts Triton chooses; Triton's
``tl.dot`` already maps these products to Hopper's tensor cores, and none of them needs the
explicit warpgroup and TMA control that Mosaic GPU offers. Passing
``jax.experimental.pallas.triton.CompilerParams`` selects Triton.

Precision: with float32 inputs the products run as three TF32 passes (``TF32_TF32_F32_X3``, about
float32 accuracy); with 16-bit inputs as one TF32 pass (errors near 3e-4 relative, far under
bf16's rounding). In interpret mode (CPU) they are exact float32 products.

Cost per chunk and head (C = 64, K = V = 128): the intra forward does 6 levels x 2 products
(C K C) plus 6 x 2 inverse products (C C C) plus W and U (C C K, C C V): about 11 MFLOP; the
state forward 3 C K V + C C V products: about 7 MFLOP. Bytes: inputs once, the chunk matrices
(W, U, Q Gamma, K exp(G_C - G) in the input dtype, A_qk float32) written once and read once.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ops.kda import _kernel_chunk as chunk_math
from ops.kda._step_common import next_power_of_2

F32 = jnp.float32
VALUE_BLOCK = 64
LAUNCH = {"intra_forward": (8, 1), "intra_backward": (8, 1), "state_forward": (4, 2),
          "state_backward": (4, 2)}  # (num_warps, num_stages), measured in docs/kernels.md


def default_interpret() -> bool:
  """Interpret mode (the same kernels on any backend) unless JAX runs on a GPU."""
  return jax.default_backend() != "gpu"


def unsupported(chunk_size: int) -> str | None:
  """Why these kernels cannot run a call, or None."""
  return chunk_math.chunk_size_problem(chunk_size, "pallas_gpu")


# ------------------------------------------------------------------------------ in-kernel pieces

class Precision(NamedTuple):
  """How the kernels' matrix products run: operand dtype and ``lax.dot_general`` precision, for
  the [C, K]-sized products and for the [C, C] triangular-inverse products."""

  operands: object
  products: object
  inverse: object


def precision_for(dtype, interpret: bool) -> Precision:
  """Exact float32 in interpret mode; on the GPU three TF32 passes for float32 inputs, and for
  16-bit inputs bfloat16 operands (float32 accumulation) with a TF32 triangular inverse."""
  if interpret:
    highest = jax.lax.Precision.HIGHEST
    return Precision(F32, highest, highest)
  if jnp.dtype(dtype) == jnp.float32:
    x3 = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    return Precision(F32, x3, x3)
  return Precision(jnp.bfloat16, None, jax.lax.DotAlgorithmPreset.TF32_TF32_F32)


def primitives(precision: Precision) -> chunk_math.Primitives:
  """Triton's: ``cumsum`` and 3-D reshapes are native."""

  def dot(a, b, *, trans_a=False, trans_b=False, inverse=False):
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    operands = F32 if inverse else precision.operands
    return jax.lax.dot_general(a.astype(operands), b.astype(operands), dims,
                               precision=precision.inverse if inverse else precision.products,
                               preferred_element_type=F32)

  def cumsum(x, *, reverse):
    forward = jnp.cumsum(x, axis=0)
    return jnp.sum(x, axis=0, keepdims=True) - forward + x if reverse else forward

  def level_references(G, g, s):
    C, K = G.shape
    G3, g3 = G.reshape(C // s, s, K), g.reshape(C // s, s, K)
    position = chunk_math.iota((C // s, s, K), 1)
    before = jnp.sum(jnp.where(position == 0, G3 - g3, 0.0), axis=1, keepdims=True)
    end = jnp.sum(jnp.where(position == s - 1, G3, 0.0), axis=1, keepdims=True)
    expand = lambda x: jnp.broadcast_to(x, (C // s, s, K)).reshape(C, K)
    return expand(before), expand(end)

  def same_segment(segment):
    return (segment == segment.reshape(1, segment.shape[0])).astype(F32)

  return chunk_math.Primitives(dot=dot, cumsum=cumsum, level_references=level_references,
                               same_segment=same_segment)


def _chunk(q_ref, k_ref, g_ref, beta_ref, seg_ref, carried_ref, last_ref, *, scale, prims,
           with_queries):
  return chunk_math.Chunk(
      q_ref[...].astype(F32) * scale, k_ref[...].astype(F32), g_ref[...].astype(F32),
      beta_ref[...].astype(F32)[:, None], seg_ref[...], carried_ref[...], last_ref[...], prims,
      with_queries=with_queries)


# ------------------------------------------------------------------------------- intra kernels

def _intra_forward_kernel(q_ref, k_ref, g_ref, v_ref, beta_ref, seg_ref, carried_ref, last_ref,
                          w_ref, u_ref, qg_ref, kg_ref, a_ref, decay_ref, *, scale, precision):
  chunk = _chunk(q_ref, k_ref, g_ref, beta_ref, seg_ref, carried_ref, last_ref, scale=scale,
                 prims=primitives(precision), with_queries=True)
  m = chunk_math.intra_forward(chunk, v_ref[...].astype(F32))
  for ref, value in ((w_ref, m.W), (u_ref, m.U), (qg_ref, m.Qg), (kg_ref, m.Kg), (a_ref, m.A)):
    ref[...] = value.astype(ref.dtype)
  decay_ref[...] = m.decay.reshape(decay_ref.shape)


def _intra_backward_kernel(q_ref, k_ref, g_ref, v_ref, beta_ref, seg_ref, carried_ref, last_ref,
                           dw_ref, du_ref, dqg_ref, dkg_ref, da_ref, ddecay_ref,
                           dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, *, scale, precision):
  chunk = _chunk(q_ref, k_ref, g_ref, beta_ref, seg_ref, carried_ref, last_ref, scale=scale,
                 prims=primitives(precision), with_queries=False)
  cotangents = chunk_math.ChunkMatrices(
      W=dw_ref[...], U=du_ref[...], Qg=dqg_ref[...], Kg=dkg_ref[...], A=da_ref[...],
      decay=ddecay_ref[...].reshape(1, ddecay_ref.shape[0]))
  dq, dk, dv, dg, dbeta = chunk_math.intra_backward(chunk, v_ref[...].astype(F32), cotangents)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  dg_ref[...] = dg.astype(dg_ref.dtype)
  dbeta_ref[...] = dbeta.reshape(dbeta_ref.shape).astype(dbeta_ref.dtype)


# ------------------------------------------------------------------------------- state kernels

def _state_forward_kernel(w_ref, u_ref, qg_ref, kg_ref, a_ref, decay_ref, h0_ref,
                          o_ref, final_ref, *maybe_states_ref, C, BV, precision):
  b, h, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  num_chunks = decay_ref.shape[1]
  values = pl.ds(vb * BV, BV)
  dot = primitives(precision).dot

  def chunk(c, S):
    rows = pl.ds(c * C, C)
    if maybe_states_ref:
      maybe_states_ref[0][b, c, h, :, values] = S
    m = _load_matrices(w_ref, u_ref, qg_ref, kg_ref, a_ref, decay_ref, b, h, c, rows, values)
    o, S = chunk_math.state_forward(S, m, dot)
    o_ref[b, rows, h, values] = o.astype(o_ref.dtype)
    return S

  final_ref[b, h, :, values] = jax.lax.fori_loop(0, num_chunks, chunk,
                                                 h0_ref[b, h, :, values].astype(F32))


def _load_matrices(w_ref, u_ref, qg_ref, kg_ref, a_ref, decay_ref, b, h, c, rows, values):
  """Chunk c's ``ChunkMatrices`` (float32) for value block ``values``."""
  load = lambda ref, last: ref[b, rows, h, last].astype(F32)
  everything = slice(None)
  K = w_ref.shape[-1]
  return chunk_math.ChunkMatrices(
      W=load(w_ref, everything), U=load(u_ref, values), Qg=load(qg_ref, everything),
      Kg=load(kg_ref, everything), A=load(a_ref, everything),
      decay=decay_ref[b, c, h, :].reshape(1, K))


def _state_backward_kernel(w_ref, u_ref, qg_ref, kg_ref, a_ref, decay_ref, states_ref, do_ref,
                           dfinal_ref, du_ref, dw_ref, dqg_ref, dkg_ref, da_ref, ddecay_ref,
                           dh0_ref, *, C, BV, precision):
  b, h, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  num_chunks = decay_ref.shape[1]
  values = pl.ds(vb * BV, BV)
  dot = primitives(precision).dot

  def chunk(step, dS):
    c = num_chunks - 1 - step
    rows = pl.ds(c * C, C)
    m = _load_matrices(w_ref, u_ref, qg_ref, kg_ref, a_ref, decay_ref, b, h, c, rows, values)
    grads, dS = chunk_math.state_backward(states_ref[b, c, h, :, values], dS, m,
                                          do_ref[b, rows, h, values].astype(F32), dot)
    du_ref[b, rows, h, values] = grads.U.astype(du_ref.dtype)
    for ref, value in ((dw_ref, grads.W), (dqg_ref, grads.Qg), (dkg_ref, grads.Kg),
                       (da_ref, grads.A)):
      ref[vb, b, rows, h, :] = value
    ddecay_ref[vb, b, c, h, :] = grads.decay.reshape(grads.decay.shape[1])
    return dS

  dh0_ref[b, h, :, values] = jax.lax.fori_loop(0, num_chunks, chunk,
                                               dfinal_ref[b, h, :, values].astype(F32))


# ------------------------------------------------------------------------------------ wrappers

def _config(v, interpret, chunk_size):
  """Static settings shared by the four kernels."""
  return dict(interpret=interpret, precision=precision_for(v.dtype, interpret), C=chunk_size)


def triton_call(kernel, grid, in_specs, out_specs, out_shape, interpret, launch, **params):
  """``pallas_call`` on the Triton backend; ``launch`` is (num_warps, num_stages)."""
  num_warps, num_stages = launch
  return pl.pallas_call(
      functools.partial(kernel, **params), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=interpret,
      compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps,
                                                                  num_stages=num_stages))


def token_spec(C, last):
  """Blocks of one chunk of one head of a [B, T, HV, last] array."""
  return pl.BlockSpec((None, C, None, last), lambda b, h, c: (b, c, h, 0))


def _intra_specs(C, K, V):
  mask = pl.BlockSpec((None, C, 1), lambda b, h, c: (b, c, 0))
  return [token_spec(C, K), token_spec(C, K), token_spec(C, K), token_spec(C, V),
          pl.BlockSpec((None, C, None), lambda b, h, c: (b, c, h)), mask, mask, mask]


def _matrix_specs(C, K, V):
  """Blocks of W, U, Q Gamma, K exp(G_C - G), A_qk and the decay (or their cotangents)."""
  return [token_spec(C, K), token_spec(C, V), token_spec(C, K), token_spec(C, K),
          token_spec(C, C), pl.BlockSpec((None, None, None, K), lambda b, h, c: (b, c, h, 0))]


def _intra_forward(inputs, *, scale, C, interpret, precision):
  q, k, g, v = inputs[:4]
  B, T, HV, K = k.shape
  V = v.shape[-1]
  store = v.dtype
  shapes = [jax.ShapeDtypeStruct((B, T, HV, K), store), jax.ShapeDtypeStruct((B, T, HV, V), store),
            jax.ShapeDtypeStruct((B, T, HV, K), store), jax.ShapeDtypeStruct((B, T, HV, K), store),
            jax.ShapeDtypeStruct((B, T, HV, C), F32),
            jax.ShapeDtypeStruct((B, T // C, HV, K), F32)]
  return triton_call(_intra_forward_kernel, (B, HV, T // C), _intra_specs(C, K, V),
               _matrix_specs(C, K, V), shapes, interpret, LAUNCH["intra_forward"], scale=scale,
               precision=precision)(*inputs)


def _intra_backward(inputs, cotangents, *, scale, C, interpret, precision):
  q, k, g, v, beta = inputs[:5]
  B, T, HV, K = k.shape
  V = v.shape[-1]
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, g, beta)]
  out_specs = [token_spec(C, K), token_spec(C, K), token_spec(C, V), token_spec(C, K),
               pl.BlockSpec((None, C, None), lambda b, h, c: (b, c, h))]
  return triton_call(_intra_backward_kernel, (B, HV, T // C),
               _intra_specs(C, K, V) + _matrix_specs(C, K, V), out_specs, shapes, interpret,
               LAUNCH["intra_backward"], scale=scale, precision=precision)(
                   *inputs, *cotangents)


def value_block(V):
  """Value channels per program of the state kernels (RWKV-7's too)."""
  return min(V, VALUE_BLOCK)


def _state_forward(matrices, h0, out_dtype, *, keep_states, C, interpret, precision):
  W, U = matrices[:2]
  B, T, HV, K = W.shape
  V = U.shape[-1]
  BV = value_block(V)
  shapes = [jax.ShapeDtypeStruct((B, T, HV, V), out_dtype),
            jax.ShapeDtypeStruct((B, HV, K, V), F32)]
  if keep_states:
    shapes.append(jax.ShapeDtypeStruct((B, T // C, HV, K, V), F32))
  whole = pl.no_block_spec
  return triton_call(_state_forward_kernel, (B, HV, V // BV), [whole] * 7, [whole] * len(shapes),
               shapes, interpret, LAUNCH["state_forward"], C=C, BV=BV, precision=precision)(
                   *matrices, h0)


def _state_backward(matrices, states, dO, dfinal, *, C, interpret, precision):
  W, U = matrices[:2]
  B, T, HV, K = W.shape
  V = U.shape[-1]
  BV = value_block(V)
  NV = V // BV
  shapes = [jax.ShapeDtypeStruct((B, T, HV, V), F32),
            jax.ShapeDtypeStruct((NV, B, T, HV, K), F32),
            jax.ShapeDtypeStruct((NV, B, T, HV, K), F32),
            jax.ShapeDtypeStruct((NV, B, T, HV, K), F32),
            jax.ShapeDtypeStruct((NV, B, T, HV, C), F32),
            jax.ShapeDtypeStruct((NV, B, T // C, HV, K), F32),
            jax.ShapeDtypeStruct((B, HV, K, V), F32)]
  whole = pl.no_block_spec
  dU, dW, dQg, dKg, dA, ddecay, dh0 = triton_call(
      _state_backward_kernel, (B, HV, NV), [whole] * 9, [whole] * 7, shapes, interpret,
      LAUNCH["state_backward"], C=C, BV=BV, precision=precision)(
          *matrices, states, dO, dfinal)
  total = lambda x: jnp.sum(x, axis=0)  # over the value blocks
  return (total(dW), dU, total(dQg), total(dKg), total(dA), total(ddecay)), dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _kda(scale, C, interpret, q, k, g, v, beta, seg, carried, last, h0):
  o, final, _ = _kda_forward(scale, C, interpret, (q, k, g, v, beta, seg, carried, last), h0,
                             keep_states=False)
  return o, final


def _kda_forward(scale, C, interpret, inputs, h0, *, keep_states):
  v = inputs[3]
  config = _config(v, interpret, C)
  matrices = _intra_forward(inputs, scale=scale, **config)
  o, final, *states = _state_forward(matrices, h0, v.dtype, keep_states=keep_states, **config)
  return o, final, (matrices, states[0] if keep_states else None)


def _kda_fwd(scale, C, interpret, q, k, g, v, beta, seg, carried, last, h0):
  inputs = (q, k, g, v, beta, seg, carried, last)
  o, final, (matrices, states) = _kda_forward(scale, C, interpret, inputs, h0, keep_states=True)
  return (o, final), (inputs, matrices, states)


def _kda_bwd(scale, C, interpret, residuals, cotangents):
  inputs, matrices, states = residuals
  dO, dfinal = cotangents
  config = _config(inputs[3], interpret, C)
  matrix_cotangents, dh0 = _state_backward(matrices, states, dO, dfinal, **config)
  dq, dk, dv, dg, dbeta = _intra_backward(inputs, matrix_cotangents, scale=scale, **config)
  return dq, dk, dg, dv, dbeta, None, None, None, dh0


_kda.defvjp(_kda_fwd, _kda_bwd)


def scan(q, k, v, g, beta, initial_state, segment_index, *, scale: float, chunk_size: int = 64,
         interpret: bool | None = None):
  """KDA over sequences with the Pallas kernels.

  Args:
    q, k, g: [B, T, HV, K] (q unscaled; q and k already repeated to the value heads); any float
      dtype, g a log decay <= 0.
    v: [B, T, HV, V]; its dtype is the output's and the stored chunk matrices'.
    beta: [B, T, HV].
    initial_state: [B, HV, K, V] float32.
    segment_index: None, or [B, T] non-decreasing int32; the state restarts from zero where it
      steps up.
    scale: the query scale, applied in the kernels.
    chunk_size: tokens per chunk, a power of two >= 16.
    interpret: run the kernels in Pallas interpret mode; None: unless the backend is a GPU.

  Returns:
    o [B, T, HV, V] in v's dtype and the final state [B, HV, K, V] float32.
  """
  interpret = default_interpret() if interpret is None else interpret
  inputs, h0 = _kernel_inputs(q, k, v, g, beta, initial_state, segment_index, chunk_size)
  o, final = _kda(float(scale), chunk_size, interpret, *inputs, h0)
  T, K, V = q.shape[1], k.shape[-1], v.shape[-1]
  return o[:, :T, :, :V], final[:, :, :K, :V]


def _kernel_inputs(q, k, v, g, beta, initial_state, segment_index, chunk_size):
  """The kernels' inputs (q, k, g, v, beta, segment, carried, last) and h0: time padded to
  whole chunks, K and V to powers of two (zeros leave the state unchanged)."""
  if reason := unsupported(chunk_size):
    raise ValueError(reason)
  B, T, HV, K = k.shape
  V = v.shape[-1]
  Tp = -(-T // chunk_size) * chunk_size
  Kp, Vp = next_power_of_2(K), next_power_of_2(V)
  pad = lambda x, last: jnp.pad(x, [(0, 0), (0, Tp - T), (0, 0), (0, last - x.shape[-1])])
  q, k, g = (pad(x, Kp) for x in (q, k, g))
  v = pad(v, Vp)
  beta = jnp.pad(beta, [(0, 0), (0, Tp - T), (0, 0)])
  h0 = jnp.pad(initial_state, [(0, 0), (0, 0), (0, Kp - K), (0, Vp - V)])
  masks = chunk_math.packed_row_masks(segment_index, B, T, chunk_size)
  return (q, k, g, v, beta, *masks), h0


def stages(q, k, v, g, beta, initial_state, *, scale: float, chunk_size: int = 64,
           interpret: bool | None = None):
  """The four kernels of one forward and backward as separate jitted calls, for timing each.

  Takes ``scan``'s arguments (no packing) and returns ``[(name, function, args)]`` in the order
  they run: intra_forward, state_forward, state_backward, intra_backward. Each stage's arguments
  are the earlier stages' real outputs (the output cotangent is o itself, nonzero data).
  """
  interpret = default_interpret() if interpret is None else interpret
  inputs, h0 = _kernel_inputs(q, k, v, g, beta, initial_state, None, chunk_size)
  config = _config(v, interpret, chunk_size)
  intra_forward = jax.jit(lambda *x: _intra_forward(x, scale=scale, **config))
  state_forward = jax.jit(lambda m, h: _state_forward(m, h, v.dtype, keep_states=True,
                                                      **config))
  state_backward = jax.jit(lambda m, s, dO, df: _state_backward(m, s, dO, df, **config))
  intra_backward = jax.jit(lambda x, d: _intra_backward(x, d, scale=scale, **config))
  matrices = intra_forward(*inputs)
  o, final, states = state_forward(matrices, h0)
  matrix_cotangents, _ = state_backward(matrices, states, o, final)
  return [("intra_forward", intra_forward, inputs),
          ("state_forward", state_forward, (matrices, h0)),
          ("state_backward", state_backward, (matrices, states, o, final)),
          ("intra_backward", intra_backward, (inputs, matrix_cotangents))]
