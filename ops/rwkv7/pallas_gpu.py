"""Chunkwise RWKV-7 as Pallas GPU kernels (implementation ``"pallas_gpu"``), SPEC 2.5.

KDA's four-kernel split (``ops.kda.pallas_gpu``) on RWKV-7's chunk mathematics
(``ops.rwkv7._kernel_chunk``): work parallel over chunks, and one walk over the chunks that
carries the state.

  intra forward    grid (B, H, chunks)   per chunk: G, G~, A_ab, A_ak, A_rb, A_rk,
                                         T = (I - A_ab)^-1, W, U = T (A_ak v), Y = A_rk v,
                                         r exp(G), b and k times exp(G_C - G), exp(G_C)
  state forward    grid (B, H, V/BV)     walks the chunks: X = U + W S, o = (r exp(G)) S + A_rb X
                                         + Y, S' = exp(G_C) S + (b exp(G_C - G))^T X
                                         + (k exp(G_C - G))^T v (keeps S per chunk)
  state backward   grid (B, H, V/BV)     walks the chunks backwards with dS: the cotangents of
                                         those matrices (summed over V blocks outside) and dv's
                                         part through the state
  intra backward   grid (B, H, chunks)   recomputes the chunk's matrices and takes those
                                         cotangents (dY is dO itself) to dr, dw, dk, dv, da, db

Why the Triton backend (a plain ``pallas_call`` on GPU would go to Mosaic GPU): as for KDA, every
kernel is a sequence of small matrix products (C = 64 rows, K, V <= 128) and elementwise work on
register-resident tiles whose layouts Triton chooses; ``tl.dot`` maps the products to Hopper's
tensor cores, and none of them needs the explicit warpgroup and TMA control of Mosaic GPU.
Passing ``jax.experimental.pallas.triton.CompilerParams`` selects Triton.

Precision: KDA's (``ops.kda.pallas_gpu.precision_for``): float32 inputs run three TF32 passes,
16-bit inputs bfloat16 operands with a TF32 triangular inverse, and the chunk matrices are stored
in v's dtype (A_rb in float32). G~ = shift(G) is a one-hot product in IEEE float32
(``F32_F32_F32``), exact, so that exp(G~_t - G_{t-1}) is exactly 1. In interpret mode (CPU)
every product is exact float32.

Cost per chunk and head (C = 64, K = V = 64): the intra forward does 6 levels x 4 pair products
(C K C) = 12.6 MFLOP, 6 x 2 inverse products (C C C) = 6.3 MFLOP, W, A_ak v, T (A_ak v) and
A_rk v = 2.1 MFLOP and the shift (C C K, IEEE float32) 0.5 MFLOP; the state forward
W S, r S, A_rb X, b^T X, k^T v = 2.6 MFLOP. Bytes: the inputs once; W, U, r exp(G), Y,
b exp(G_C - G), k exp(G_C - G) (v's dtype) and A_rb (float32) written once and read once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ops.kda import pallas_gpu as kda_gpu
from ops.kda._kernel_chunk import packed_row_masks
from ops.kda._step_common import next_power_of_2
from ops.kda.pallas_gpu import default_interpret, precision_for, unsupported
from ops.rwkv7 import _kernel_chunk as chunk_math

F32 = jnp.float32
LAUNCH = kda_gpu.LAUNCH  # KDA's (num_warps, num_stages); not yet tuned for RWKV-7

__all__ = ["default_interpret", "scan", "unsupported"]


# ------------------------------------------------------------------------------ in-kernel pieces

def _primitives(precision: kda_gpu.Precision):
  """KDA's Triton primitives with the exact row shift."""

  def shift(x):
    return jax.lax.dot_general(chunk_math.shift_matrix(x.shape[0]), x, (((1,), (0,)), ((), ())),
                               precision=jax.lax.DotAlgorithmPreset.F32_F32_F32,
                               preferred_element_type=F32)

  return kda_gpu.primitives(precision)._replace(shift=shift)


def _chunk(r_ref, w_ref, k_ref, a_ref, b_ref, seg_ref, carried_ref, last_ref, *, scale, prims):
  load = lambda ref: ref[...].astype(F32)
  return chunk_math.Chunk(load(r_ref) * scale, load(w_ref), load(k_ref), load(a_ref),
                          load(b_ref), seg_ref[...], carried_ref[...], last_ref[...], prims)


# ------------------------------------------------------------------------------- intra kernels

def _intra_forward_kernel(r_ref, w_ref, k_ref, a_ref, b_ref, v_ref, seg_ref, carried_ref,
                          last_ref, w_out, u_out, rg_out, a_out, y_out, bg_out, kg_out,
                          decay_out, *, scale, precision):
  chunk = _chunk(r_ref, w_ref, k_ref, a_ref, b_ref, seg_ref, carried_ref, last_ref,
                 scale=scale, prims=_primitives(precision))
  m = chunk_math.intra_forward(chunk, v_ref[...].astype(F32))
  for ref, value in ((w_out, m.W), (u_out, m.U), (rg_out, m.Rg), (a_out, m.A), (y_out, m.Y),
                     (bg_out, m.Bg), (kg_out, m.Kg)):
    ref[...] = value.astype(ref.dtype)
  decay_out[...] = m.decay.reshape(decay_out.shape)


def _intra_backward_kernel(r_ref, w_ref, k_ref, a_ref, b_ref, v_ref, seg_ref, carried_ref,
                           last_ref, dw_ref, du_ref, drg_ref, da_ref, dy_ref, dbg_ref, dkg_ref,
                           dvalues_ref, ddecay_ref, dr_out, dw_out, dk_out, da_out, db_out,
                           dv_out, *, scale, precision):
  chunk = _chunk(r_ref, w_ref, k_ref, a_ref, b_ref, seg_ref, carried_ref, last_ref,
                 scale=scale, prims=_primitives(precision))
  load = lambda ref: ref[...].astype(F32)
  cotangents = chunk_math.ChunkMatrices(
      W=load(dw_ref), U=load(du_ref), Rg=load(drg_ref), A=load(da_ref), Y=load(dy_ref),
      Bg=load(dbg_ref), Kg=load(dkg_ref), values=load(dvalues_ref),
      decay=ddecay_ref[...].reshape(1, ddecay_ref.shape[0]))
  dr, dw, dk, dv, da, db = chunk_math.intra_backward(chunk, load(v_ref), cotangents)
  for ref, value in ((dr_out, dr * scale), (dw_out, dw), (dk_out, dk), (da_out, da),
                     (db_out, db), (dv_out, dv)):
    ref[...] = value.astype(ref.dtype)


# ------------------------------------------------------------------------------- state kernels

def _load_matrices(refs, v_ref, b, h, c, rows, values):
  """Chunk c's ``ChunkMatrices`` (float32) for value block ``values``; ``refs`` are those of
  W, U, r exp(G), A_rb, Y, b exp(G_C - G), k exp(G_C - G) and the decay."""
  w_ref, u_ref, rg_ref, a_ref, y_ref, bg_ref, kg_ref, decay_ref = refs
  load = lambda ref, last: ref[b, rows, h, last].astype(F32)
  everything = slice(None)
  K = w_ref.shape[-1]
  return chunk_math.ChunkMatrices(
      W=load(w_ref, everything), U=load(u_ref, values), Rg=load(rg_ref, everything),
      A=load(a_ref, everything), Y=load(y_ref, values), Bg=load(bg_ref, everything),
      Kg=load(kg_ref, everything), values=load(v_ref, values),
      decay=decay_ref[b, c, h, :].reshape(1, K))


def _state_forward_kernel(*refs, C, BV, precision, keep_states):
  matrix_refs, (v_ref, h0_ref, o_ref, final_ref) = refs[:8], refs[8:12]
  b, h, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  num_chunks = matrix_refs[-1].shape[1]
  values = pl.ds(vb * BV, BV)
  dot = _primitives(precision).dot

  def chunk(c, S):
    rows = pl.ds(c * C, C)
    if keep_states:
      refs[12][b, c, h, :, values] = S
    m = _load_matrices(matrix_refs, v_ref, b, h, c, rows, values)
    o, S = chunk_math.state_forward(S, m, dot)
    o_ref[b, rows, h, values] = o.astype(o_ref.dtype)
    return S

  final_ref[b, h, :, values] = jax.lax.fori_loop(0, num_chunks, chunk,
                                                 h0_ref[b, h, :, values].astype(F32))


def _state_backward_kernel(*refs, C, BV, precision):
  matrix_refs, (v_ref, states_ref, do_ref, dfinal_ref) = refs[:8], refs[8:12]
  du_ref, dvalues_ref, dw_ref, drg_ref, da_ref, dbg_ref, dkg_ref, ddecay_ref, dh0_ref = refs[12:]
  b, h, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  num_chunks = matrix_refs[-1].shape[1]
  values = pl.ds(vb * BV, BV)
  dot = _primitives(precision).dot

  def chunk(step, dS):
    c = num_chunks - 1 - step
    rows = pl.ds(c * C, C)
    m = _load_matrices(matrix_refs, v_ref, b, h, c, rows, values)
    grads, dS = chunk_math.state_backward(states_ref[b, c, h, :, values], dS, m,
                                          do_ref[b, rows, h, values].astype(F32), dot)
    du_ref[b, rows, h, values] = grads.U
    dvalues_ref[b, rows, h, values] = grads.values
    for ref, value in ((dw_ref, grads.W), (drg_ref, grads.Rg), (da_ref, grads.A),
                       (dbg_ref, grads.Bg), (dkg_ref, grads.Kg)):
      ref[vb, b, rows, h, :] = value
    ddecay_ref[vb, b, c, h, :] = grads.decay.reshape(grads.decay.shape[1])
    return dS

  dh0_ref[b, h, :, values] = jax.lax.fori_loop(0, num_chunks, chunk,
                                               dfinal_ref[b, h, :, values].astype(F32))


# ------------------------------------------------------------------------------------ wrappers

def _input_specs(C, K, V):
  """Blocks of (r, w, k, a, b, v, segment, carried, last) of one chunk of one head."""
  mask = pl.BlockSpec((None, C, 1), lambda b, h, c: (b, c, 0))
  return [kda_gpu.token_spec(C, K)] * 5 + [kda_gpu.token_spec(C, V)] + [mask] * 3


def _matrix_specs(C, K, V):
  """Blocks of W, U, r exp(G), A_rb, Y, b exp(G_C - G), k exp(G_C - G) and the decay (or of
  their cotangents)."""
  token = kda_gpu.token_spec
  return [token(C, K), token(C, V), token(C, K), token(C, C), token(C, V), token(C, K),
          token(C, K), pl.BlockSpec((None, None, None, K), lambda b, h, c: (b, c, h, 0))]


def _intra_forward(inputs, *, scale, C, interpret, precision):
  r, v = inputs[0], inputs[5]
  B, T, H, K = r.shape
  V = v.shape[-1]
  store = v.dtype
  token = lambda last, dtype=store: jax.ShapeDtypeStruct((B, T, H, last), dtype)
  shapes = [token(K), token(V), token(K), token(C, F32), token(V), token(K), token(K),
            jax.ShapeDtypeStruct((B, T // C, H, K), F32)]
  return kda_gpu.triton_call(_intra_forward_kernel, (B, H, T // C), _input_specs(C, K, V),
                       _matrix_specs(C, K, V), shapes, interpret, LAUNCH["intra_forward"],
                       scale=scale, precision=precision)(*inputs)


def _intra_backward(inputs, cotangents, *, scale, C, interpret, precision):
  r, v = inputs[0], inputs[5]
  B, T, H, K = r.shape
  V = v.shape[-1]
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs[:6]]
  in_specs = (_input_specs(C, K, V) + _matrix_specs(C, K, V)[:7]
              + [kda_gpu.token_spec(C, V)] + _matrix_specs(C, K, V)[7:])
  return kda_gpu.triton_call(_intra_backward_kernel, (B, H, T // C), in_specs,
                       _input_specs(C, K, V)[:6], shapes, interpret, LAUNCH["intra_backward"],
                       scale=scale, precision=precision)(*inputs, *cotangents)


def _state_forward(matrices, v, h0, *, keep_states, C, interpret, precision):
  B, T, H, K = matrices[0].shape
  V = v.shape[-1]
  BV = kda_gpu.value_block(V)
  shapes = [jax.ShapeDtypeStruct((B, T, H, V), v.dtype), jax.ShapeDtypeStruct((B, H, K, V), F32)]
  if keep_states:
    shapes.append(jax.ShapeDtypeStruct((B, T // C, H, K, V), F32))
  whole = pl.no_block_spec
  return kda_gpu.triton_call(_state_forward_kernel, (B, H, V // BV), [whole] * 10,
                       [whole] * len(shapes), shapes, interpret, LAUNCH["state_forward"], C=C,
                       BV=BV, precision=precision, keep_states=keep_states)(*matrices, v, h0)


def _state_backward(matrices, v, states, dO, dfinal, *, C, interpret, precision):
  """The cotangents of the chunk matrices, in ``_intra_backward``'s order, and dh0."""
  B, T, H, K = matrices[0].shape
  V = v.shape[-1]
  BV = kda_gpu.value_block(V)
  NV = V // BV
  per_block = lambda last: jax.ShapeDtypeStruct((NV, B, T, H, last), F32)
  shapes = [jax.ShapeDtypeStruct((B, T, H, V), F32), jax.ShapeDtypeStruct((B, T, H, V), F32),
            per_block(K), per_block(K), per_block(C), per_block(K), per_block(K),
            jax.ShapeDtypeStruct((NV, B, T // C, H, K), F32),
            jax.ShapeDtypeStruct((B, H, K, V), F32)]
  whole = pl.no_block_spec
  dU, dvalues, dW, dRg, dA, dBg, dKg, ddecay, dh0 = kda_gpu.triton_call(
      _state_backward_kernel, (B, H, NV), [whole] * 12, [whole] * len(shapes), shapes,
      interpret, LAUNCH["state_backward"], C=C, BV=BV, precision=precision)(
          *matrices, v, states, dO, dfinal)
  total = lambda x: jnp.sum(x, axis=0)  # over the value blocks
  return (total(dW), dU, total(dRg), total(dA), dO, total(dBg), total(dKg), dvalues,
          total(ddecay)), dh0


def _config(v, interpret, chunk_size):
  """Static settings shared by the four kernels."""
  return dict(interpret=interpret, precision=precision_for(v.dtype, interpret), C=chunk_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _rwkv7(scale, C, interpret, r, w, k, a, b, v, seg, carried, last, h0):
  o, final, _ = _rwkv7_forward(scale, C, interpret, (r, w, k, a, b, v, seg, carried, last), h0,
                               keep_states=False)
  return o, final


def _rwkv7_forward(scale, C, interpret, inputs, h0, *, keep_states):
  v = inputs[5]
  config = _config(v, interpret, C)
  matrices = _intra_forward(inputs, scale=scale, **config)
  o, final, *states = _state_forward(matrices, v, h0, keep_states=keep_states, **config)
  return o, final, (matrices, states[0] if keep_states else None)


def _rwkv7_fwd(scale, C, interpret, r, w, k, a, b, v, seg, carried, last, h0):
  inputs = (r, w, k, a, b, v, seg, carried, last)
  o, final, (matrices, states) = _rwkv7_forward(scale, C, interpret, inputs, h0,
                                                keep_states=True)
  return (o, final), (inputs, matrices, states)


def _rwkv7_bwd(scale, C, interpret, residuals, cotangents):
  inputs, matrices, states = residuals
  dO, dfinal = cotangents
  config = _config(inputs[5], interpret, C)
  matrix_cotangents, dh0 = _state_backward(matrices, inputs[5], states, dO, dfinal, **config)
  dr, dw, dk, da, db, dv = _intra_backward(inputs, matrix_cotangents, scale=scale, **config)
  return dr, dw, dk, da, db, dv, None, None, None, dh0


_rwkv7.defvjp(_rwkv7_fwd, _rwkv7_bwd)


def scan(r, w, k, v, a, b, initial_state, segment_index, *, scale: float, chunk_size: int = 64,
         interpret: bool | None = None):
  """RWKV-7 over sequences with the Pallas Triton kernels.

  Args:
    r, w, k, a, b: [B, T, H, K], any float dtype; r unscaled, w the log decay (<= 0).
    v: [B, T, H, V]; its dtype is the output's, the stored chunk matrices' and decides the
      products' precision.
    initial_state: [B, H, K, V] float32.
    segment_index: None, or [B, T] non-decreasing int32; the state restarts from zero where it
      steps up.
    scale: the receptance scale, applied in the kernels.
    chunk_size: tokens per chunk, a power of two >= 16.
    interpret: run the kernels in Pallas interpret mode; None: unless the backend is a GPU.

  Returns:
    o [B, T, H, V] in v's dtype and the final state [B, H, K, V] float32.
  """
  if reason := unsupported(chunk_size):
    raise ValueError(reason)
  interpret = default_interpret() if interpret is None else interpret
  B, T, H, K = r.shape
  V = v.shape[-1]
  padded = -(-T // chunk_size) * chunk_size
  Kp, Vp = next_power_of_2(K), next_power_of_2(V)
  # Zeros in the padded tokens and channels leave the state unchanged.
  pad = lambda x, last: jnp.pad(x, [(0, 0), (0, padded - T), (0, 0), (0, last - x.shape[-1])])
  inputs = [pad(x, Kp) for x in (r, w, k, a, b)] + [pad(v, Vp)]
  h0 = jnp.pad(initial_state, [(0, 0), (0, 0), (0, Kp - K), (0, Vp - V)])
  masks = packed_row_masks(segment_index, B, T, chunk_size)
  o, final = _rwkv7(float(scale), chunk_size, interpret, *inputs, *masks, h0)
  return o[:, :T, :, :V], final[:, :, :K, :V]
