"""Chunkwise RWKV-7 as Pallas TPU (Mosaic) kernels (implementation ``"pallas_tpu"``), SPEC 2.5.

KDA's TPU kernels (``ops.kda.pallas_tpu``) on RWKV-7's chunk mathematics
(``ops.rwkv7._kernel_chunk``): two kernels, each one walk over the chunks with the state in VMEM
scratch.

  forward    grid (B, H, chunks), the chunk axis sequential ("arbitrary"), batch and heads
             "parallel". Per chunk: G, G~, the four pair products A_ab, A_ak, A_rb, A_rk,
             T = (I - A_ab)^-1, W, U, A_rk v (intra_forward), then o and the next state
             (state_forward). The chunk matrices never leave VMEM; for the backward the state
             entering each chunk is written out (one [K, V] per chunk).
  backward   the same grid walking the chunks backwards (the index maps reverse the chunk axis)
             with dS in VMEM scratch: recompute the chunk's matrices, state_backward, then
             intra_backward, writing dr, dw, dk, dv, da, db per chunk and dh0 at the end.

The primitives are KDA's TPU ones (products with a triangular matrix of ones for the cumulative
sums, one-hot selections for the level references, at ``Precision.HIGHEST`` so that the gates
stay exact float32), plus G~ = shift(G) as a one-hot product at HIGHEST: exact, so that
exp(G~_t - G_{t-1}) is exactly 1.

Precision: float32 inputs run every product at HIGHEST; bfloat16 inputs (v's dtype decides) give
the C x K products bfloat16 operands with float32 accumulation and keep HIGHEST for the
triangular inverse and the gate products. In interpret mode everything is exact float32.

VMEM per grid step (C = 64, K = V = 64 as in RWKV-7's heads, bfloat16 inputs). Mosaic pads the
last (lane) dimension to 128, so a [64, 64] tile takes the room of [64, 128]: 16 KiB in bf16,
32 KiB in f32, and a [64, 1] mask column 32 KiB in f32. Forward blocks: r, w, k, a, b, v (6 x 16
KiB), the three packed-row masks (3 x 32 KiB), h0, the final state and the state written for the
backward (3 x 32 KiB), o (16 KiB): 304 KiB, 608 KiB double-buffered, plus the 32 KiB state scratch
and the live chunk values (G, G~, the inputs in f32, one level's three factors, the four pair
products and A's, the masks, T, W, U, Y, r exp(G), b and k times exp(G_C - G), X: at most ~35
f32 tiles, 1.1 MiB): about 1.7 MiB. The backward's blocks are the inputs, the saved state, dO,
dfinal, dr, dw, dk, da, db, dv and dh0: 400 KiB, 800 KiB double-buffered, plus the dS scratch
and about twice the forward's live tiles: about 3 MiB. At K = V = 128 the token tiles fill the
lanes at the same size and only the [K, V] states double (32 to 64 KiB): about 2 MiB forward and
3.3 MiB backward. All far inside the 16 MiB (v5e) / 32 MiB (v5p) scoped VMEM default.

MXU work per chunk and head (C = 64, K = V = 64; a C x K x C product is 0.52 MFLOP). Forward:
6 levels x 4 pair products = 12.6 MFLOP, the inverse's 6 x 2 products = 6.3 MFLOP (at HIGHEST,
six bf16 passes: 38 MFLOP-equivalent), W, A_ak v, T (A_ak v), A_rk v = 2.1 MFLOP, the state
products W S, r exp(G) S, A_rb X, (b exp(G_C - G))^T X, (k exp(G_C - G))^T v = 2.6 MFLOP; and
the gate products at HIGHEST: the cumulative sum, the shift, 2 level references a level and the
same-segment mask, 16 one-hot or triangular products (8.4 MFLOP, 50 MFLOP-equivalent). About
105 MFLOP-equivalent with bf16 inputs (about half of it the gate products), 190 with float32
inputs (everything at HIGHEST). The backward recomputes the forward's chunk matrices and adds
the state cotangents (12 products, 6 MFLOP), the pair products' cotangents (2 per product and
level, 25 MFLOP), the inverse's and its level references again: about 190 MFLOP-equivalent.
HBM per chunk and head: the inputs (48 KiB bf16, the masks negligible), o (8 KiB) and the 16
KiB state for the backward: 72 KiB. Expected bound (estimates, no TPU measured): on a v5e
(197 TFLOP/s bf16, 820 GB/s) the forward's 105 MFLOP take 0.53 us and 72 KiB 0.09 us, so
compute-bound, with the serial state products of each chunk leaving the MXU partly idle at these
small tiles; on a v5p (459 TFLOP/s, 2.76 TB/s) 0.23 us against 0.03 us, the same balance. The
``rwkv7_1b`` preset (18 layers of 32 heads of 64) at B4 T4096 is 147,456 chunk-heads: about
80 ms (v5e) / 35 ms (v5p) forward and twice that backward at the MXU rate, to check on hardware.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops.kda import pallas_tpu as kda_tpu
from ops.kda._kernel_chunk import packed_row_masks
from ops.kda.pallas_tpu import default_interpret, unsupported
from ops.rwkv7 import _kernel_chunk as chunk_math

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST

__all__ = ["default_interpret", "scan", "unsupported"]


def _primitives(dtype, interpret: bool):
  """KDA's TPU primitives with the exact row shift."""
  prims = kda_tpu.primitives(dtype, interpret)
  return prims._replace(shift=lambda x: prims.dot(chunk_math.shift_matrix(x.shape[0]), x,
                                                  precision=HIGHEST))


def _load_chunk(r_ref, w_ref, k_ref, a_ref, b_ref, seg_ref, carried_ref, last_ref, *, scale,
                prims):
  load = lambda ref: ref[...].astype(F32)
  return chunk_math.Chunk(load(r_ref) * scale, load(w_ref), load(k_ref), load(a_ref),
                          load(b_ref), seg_ref[...], carried_ref[...], last_ref[...], prims)


def _forward_kernel(r_ref, w_ref, k_ref, a_ref, b_ref, v_ref, seg_ref, carried_ref, last_ref,
                    h0_ref, o_ref, final_ref, *rest, scale, prims, keep_states):
  states_ref = rest[0] if keep_states else None
  state_ref = rest[-1]
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    state_ref[...] = h0_ref[...]

  chunk = _load_chunk(r_ref, w_ref, k_ref, a_ref, b_ref, seg_ref, carried_ref, last_ref,
                      scale=scale, prims=prims)
  matrices = chunk_math.intra_forward(chunk, v_ref[...].astype(F32))
  S = state_ref[...]
  if keep_states:
    states_ref[...] = S
  o, S = chunk_math.state_forward(S, matrices, prims.dot)
  o_ref[...] = o.astype(o_ref.dtype)
  state_ref[...] = S

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    final_ref[...] = S


def _backward_kernel(r_ref, w_ref, k_ref, a_ref, b_ref, v_ref, seg_ref, carried_ref, last_ref,
                     states_ref, do_ref, dfinal_ref, dr_ref, dw_ref, dk_ref, da_ref, db_ref,
                     dv_ref, dh0_ref, dstate_ref, *, scale, prims):
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    dstate_ref[...] = dfinal_ref[...]

  chunk = _load_chunk(r_ref, w_ref, k_ref, a_ref, b_ref, seg_ref, carried_ref, last_ref,
                      scale=scale, prims=prims)
  v = v_ref[...].astype(F32)
  matrices = chunk_math.intra_forward(chunk, v)
  grads, dS = chunk_math.state_backward(states_ref[...], dstate_ref[...], matrices,
                                        do_ref[...].astype(F32), prims.dot)
  dstate_ref[...] = dS
  dr, dw, dk, dv, da, db = chunk_math.intra_backward(chunk, v, grads)
  for ref, value in ((dr_ref, dr * scale), (dw_ref, dw), (dk_ref, dk), (da_ref, da),
                     (db_ref, db), (dv_ref, dv)):
    ref[...] = value.astype(ref.dtype)

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    dh0_ref[...] = dS


def _chunk_index(num_chunks, reverse):
  return (lambda c: num_chunks - 1 - c) if reverse else (lambda c: c)


def _token_spec(C, last_dim, num_chunks, reverse):
  """Blocks of one chunk of one head of a [B, H, T, last_dim] array."""
  chunk = _chunk_index(num_chunks, reverse)
  return pl.BlockSpec((None, None, C, last_dim), lambda b, h, c: (b, h, chunk(c), 0))


def _input_specs(C, K, V, num_chunks, reverse):
  """Block specs of the per-chunk inputs (r, w, k, a, b, v, segment, carried, last)."""
  chunk = _chunk_index(num_chunks, reverse)
  row_mask = pl.BlockSpec((None, C, 1), lambda b, h, c: (b, chunk(c), 0))
  return ([_token_spec(C, K, num_chunks, reverse)] * 5 + [_token_spec(C, V, num_chunks, reverse)]
          + [row_mask] * 3)


def _state_spec(K, V):
  return pl.BlockSpec((None, None, K, V), lambda b, h, c: (b, h, 0, 0))


def _forward(scale, C, interpret, inputs, h0, *, keep_states):
  r, v = inputs[0], inputs[5]
  B, H, T, K = r.shape
  V = v.shape[-1]
  num_chunks = T // C
  out_shape = [jax.ShapeDtypeStruct((B, H, T, V), v.dtype),
               jax.ShapeDtypeStruct((B, H, K, V), F32)]
  out_specs = [_token_spec(C, V, num_chunks, reverse=False), _state_spec(K, V)]
  if keep_states:
    out_shape.append(jax.ShapeDtypeStruct((B, H, num_chunks, K, V), F32))
    out_specs.append(pl.BlockSpec((None, None, None, K, V), lambda b, h, c: (b, h, c, 0, 0)))
  kernel = functools.partial(_forward_kernel, scale=scale,
                             prims=_primitives(v.dtype, interpret), keep_states=keep_states)
  return pl.pallas_call(
      kernel, grid=(B, H, num_chunks),
      in_specs=_input_specs(C, K, V, num_chunks, reverse=False) + [_state_spec(K, V)],
      out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((K, V), F32)], **kda_tpu.call_params(interpret))(*inputs, h0)


def _backward(scale, C, interpret, inputs, states, dO, dfinal):
  r, v = inputs[0], inputs[5]
  B, H, T, K = r.shape
  V = v.shape[-1]
  num_chunks = T // C
  back = _chunk_index(num_chunks, reverse=True)
  in_specs = _input_specs(C, K, V, num_chunks, reverse=True) + [
      pl.BlockSpec((None, None, None, K, V), lambda b, h, c: (b, h, back(c), 0, 0)),
      _token_spec(C, V, num_chunks, reverse=True), _state_spec(K, V)]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs[:6]] + [
      jax.ShapeDtypeStruct((B, H, K, V), F32)]
  out_specs = _input_specs(C, K, V, num_chunks, reverse=True)[:6] + [_state_spec(K, V)]
  kernel = functools.partial(_backward_kernel, scale=scale,
                             prims=_primitives(v.dtype, interpret))
  return pl.pallas_call(
      kernel, grid=(B, H, num_chunks), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, scratch_shapes=[pltpu.VMEM((K, V), F32)],
      **kda_tpu.call_params(interpret))(*inputs, states, dO, dfinal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _rwkv7(scale, C, interpret, r, w, k, a, b, v, seg, carried, last, h0):
  return _forward(scale, C, interpret, (r, w, k, a, b, v, seg, carried, last), h0,
                  keep_states=False)


def _rwkv7_fwd(scale, C, interpret, r, w, k, a, b, v, seg, carried, last, h0):
  inputs = (r, w, k, a, b, v, seg, carried, last)
  o, final, states = _forward(scale, C, interpret, inputs, h0, keep_states=True)
  return (o, final), (inputs, states)


def _rwkv7_bwd(scale, C, interpret, residuals, cotangents):
  inputs, states = residuals
  dO, dfinal = cotangents
  dr, dw, dk, da, db, dv, dh0 = _backward(scale, C, interpret, inputs, states, dO, dfinal)
  return dr, dw, dk, da, db, dv, None, None, None, dh0


_rwkv7.defvjp(_rwkv7_fwd, _rwkv7_bwd)


def scan(r, w, k, v, a, b, initial_state, segment_index, *, scale: float, chunk_size: int = 64,
         interpret: bool | None = None):
  """RWKV-7 over sequences with the Pallas TPU kernels.

  Args:
    r, w, k, a, b: [B, T, H, K], any float dtype; r unscaled, w the log decay (<= 0).
    v: [B, T, H, V]; its dtype is the output's and decides the products' operand precision.
    initial_state: [B, H, K, V] float32.
    segment_index: None, or [B, T] non-decreasing int32; the state restarts from zero where it
      steps up.
    scale: the receptance scale, applied in the kernels.
    chunk_size: tokens per chunk, a power of two >= 16.
    interpret: TPU interpret mode; None: unless the backend is a TPU.

  Returns:
    o [B, T, H, V] in v's dtype and the final state [B, H, K, V] float32.
  """
  if reason := unsupported(chunk_size):
    raise ValueError(reason)
  interpret = default_interpret() if interpret is None else interpret
  B, T = r.shape[:2]
  C = chunk_size
  padded = -(-T // C) * C
  heads_first = lambda x: jnp.moveaxis(jnp.pad(x, [(0, 0), (0, padded - T), (0, 0), (0, 0)]),
                                       2, 1)
  inputs = map(heads_first, (r, w, k, a, b, v))
  masks = packed_row_masks(segment_index, B, T, C)
  o, final = _rwkv7(float(scale), C, interpret, *inputs, *masks, initial_state)
  return jnp.moveaxis(o, 1, 2)[:, :T], final
