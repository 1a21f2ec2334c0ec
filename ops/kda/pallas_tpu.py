"""Chunkwise KDA as Pallas TPU (Mosaic) kernels (implementation ``"pallas_tpu"``), SPEC 3.3-3.6.

Two kernels, each one walk over the chunks with the state in VMEM scratch; the mathematics is
``ops.kda._kernel_chunk``'s, shared with the GPU kernels:

  forward    grid (B, HV, chunks), the chunk axis sequential ("arbitrary"), batch and heads
             "parallel". Per chunk: G, the pair products, T = (I + A_kk)^-1, W, U, Q Gamma,
             K exp(G_C - G) (intra_forward), then O and the next state (state_forward). The
             chunk matrices never leave VMEM; for the backward the state entering each chunk is
             written out (one [K, V] per chunk).
  backward   the same grid walking the chunks backwards (the index maps reverse the chunk axis)
             with dS in VMEM scratch: recompute the chunk's matrices, state_backward, then
             intra_backward, writing dq, dk, dv, dg, dbeta per chunk and dh0 at the end.

Unlike the GPU split, one TPU core runs the grid in order, so fusing the intra-chunk work into
the walk costs no parallelism (the "parallel" axes are what a multi-core chip splits) and saves
the chunk matrices' round trip through HBM.

Layout and tiling: the wrapper moves heads before time ([B, HV, T, K]), so a chunk block is
[C, K] with C a multiple of 16 (C = 64) and K, V the full head dims (128 in the Kimi models:
full lanes); beta and the packed-row masks arrive as [C, 1] columns. Mosaic has no cumulative
sum: the chunk-local cumsum (and the reverse one of the backward) is a product with a triangular
matrix of ones, and each level's reference gates (the gate just before a block, the gate at its
end) are products with one-hot selection matrices, all at ``Precision.HIGHEST`` so the gates stay
exact float32 (a one-hot product reproduces each value; the triangular product sums in float32).

Precision: float32 inputs run every product at HIGHEST (float32 via multi-pass bf16 on the MXU);
bfloat16 inputs give the C x K products bfloat16 operands (float32 accumulation) and keep HIGHEST
for the triangular inverse. In interpret mode everything is exact float32.

VMEM per grid step (C = 64, K = V = 128, bfloat16 inputs). Forward blocks: q, k, v [64, 128]
bf16 (16 KiB each), g [64, 128] f32 (32 KiB), beta and the three packed-row masks as [64, 1]
columns (lane-padded to [64, 128]: 16 KiB bf16, 32 KiB f32 each), h0, the final state and the
state written for the backward [128, 128] f32 (64 KiB each), o [64, 128] bf16 (16 KiB): 400 KiB,
800 KiB double-buffered, plus the 64 KiB state scratch and the live chunk values (G, one level's
factors, T, W, U, A: about ten [64, 128] / [64, 64] f32 tiles, ~0.3 MiB): about 1.2 MiB. The
backward adds the saved state, dO and dh0 and writes dq, dk, dv, dg, dbeta: about 500 KiB of
blocks, 1 MiB double-buffered, ~1.4 MiB in all. Far inside the 16 MiB (v5e) / 32 MiB (v5p)
scoped VMEM default, so C = 128 would also fit.

MXU per chunk (one head): 6 levels x 2 pair products (64 x 128 x 64), 6 x 2 inverse products
(64^3), W and U, then the state products W S, Q Gamma S, Kg^T V~ (64 x 128 x 128) and A V~:
about 28 MFLOP of bf16 work, plus the selection and triangular products at HIGHEST (about 13
one-hot / triangular 64 x 64 x 128 products, six passes each: ~40 MFLOP-equivalent). Per head
and chunk the HBM traffic is the inputs (~80 KiB) and o (16 KiB) plus the 64 KiB state written
for the backward. Expected bound (estimates, no TPU measured): on a v5e (197 TFLOP/s bf16,
820 GB/s) ~70 MFLOP take ~0.35 us and ~160 KiB take ~0.2 us, so compute-bound near the MXU's
rate, and the serial dependency of the state products inside each chunk keeps the MXU partly
idle; on a v5p (459 TFLOP/s, 2.76 TB/s) the same holds with both times about 2.5x smaller.
B4 T8192 H16 (8192 chunk-heads) would take roughly 3 ms (v5e) / 1.2 ms (v5p) forward at the MXU
rate: estimates to check on hardware.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops.kda import _kernel_chunk as chunk_math

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
SEMANTICS = ("parallel", "parallel", "arbitrary")


def default_interpret() -> bool:
  """TPU interpret mode (the same kernels on any backend) unless JAX runs on a TPU."""
  return jax.default_backend() != "tpu"


def unsupported(chunk_size: int) -> str | None:
  """Why these kernels cannot run a call, or None (a power of two >= 16 is sublane-aligned)."""
  return chunk_math.chunk_size_problem(chunk_size, "pallas_tpu")


def primitives(dtype, interpret: bool) -> chunk_math.Primitives:
  """Mosaic's: cumulative sums and level references as exact HIGHEST products (RWKV-7's kernels
  use them too)."""
  narrow = not interpret and jnp.dtype(dtype) != jnp.float32

  def dot(a, b, *, trans_a=False, trans_b=False, inverse=False, precision=None):
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    operands = jnp.bfloat16 if narrow and not inverse and precision is None else F32
    return jax.lax.dot_general(
        a.astype(operands), b.astype(operands), dims, preferred_element_type=F32,
        precision=None if operands == jnp.bfloat16 else HIGHEST)

  def exact(a, b):
    return dot(a, b, precision=HIGHEST)

  def cumsum(x, *, reverse):
    C = x.shape[0]
    rows, cols = chunk_math.iota((C, C), 0), chunk_math.iota((C, C), 1)
    ones = ((rows <= cols) if reverse else (rows >= cols)).astype(F32)
    return exact(ones, x)

  def level_references(G, g, s):
    del g
    C = G.shape[0]
    shift = s.bit_length() - 1
    start = (chunk_math.iota((C, C), 0) >> shift) << shift
    cols = chunk_math.iota((C, C), 1)
    before = exact((cols == start - 1).astype(F32), G)
    end = exact((cols == start + s - 1).astype(F32), G)
    return before, end

  def same_segment(segment):
    C = segment.shape[0]
    as_rows = exact(jnp.ones((C, C), F32), chunk_math.eye(C) * segment)  # [r, i] = segment_i
    return (segment == as_rows).astype(F32)

  return chunk_math.Primitives(dot=dot, cumsum=cumsum, level_references=level_references,
                               same_segment=same_segment)


def _load_chunk(q_ref, k_ref, g_ref, beta_ref, seg_ref, carried_ref, last_ref, *, scale, prims,
                with_queries):
  return chunk_math.Chunk(
      q_ref[...].astype(F32) * scale, k_ref[...].astype(F32), g_ref[...].astype(F32),
      beta_ref[...].astype(F32), seg_ref[...], carried_ref[...], last_ref[...], prims,
      with_queries=with_queries)


def _forward_kernel(q_ref, k_ref, g_ref, v_ref, beta_ref, seg_ref, carried_ref, last_ref, h0_ref,
                    o_ref, final_ref, *rest, scale, prims, keep_states):
  states_ref = rest[0] if keep_states else None
  state_ref = rest[-1]
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    state_ref[...] = h0_ref[...]

  chunk = _load_chunk(q_ref, k_ref, g_ref, beta_ref, seg_ref, carried_ref, last_ref,
                      scale=scale, prims=prims, with_queries=True)
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


def _backward_kernel(q_ref, k_ref, g_ref, v_ref, beta_ref, seg_ref, carried_ref, last_ref,
                     states_ref, do_ref, dfinal_ref, dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref,
                     dh0_ref, dstate_ref, *, scale, prims):
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    dstate_ref[...] = dfinal_ref[...]

  chunk = _load_chunk(q_ref, k_ref, g_ref, beta_ref, seg_ref, carried_ref, last_ref,
                      scale=scale, prims=prims, with_queries=True)
  v = v_ref[...].astype(F32)
  matrices = chunk_math.intra_forward(chunk, v)
  grads, dS = chunk_math.state_backward(states_ref[...], dstate_ref[...], matrices,
                                        do_ref[...].astype(F32), prims.dot)
  dstate_ref[...] = dS
  dq, dk, dv, dg, dbeta = chunk_math.intra_backward(chunk, v, grads)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  dg_ref[...] = dg.astype(dg_ref.dtype)
  dbeta_ref[...] = dbeta.astype(dbeta_ref.dtype)

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    dh0_ref[...] = dS


def _specs(C, K, V, num_chunks, reverse):
  """Block specs of the per-chunk inputs (q, k, g, v, beta, segment, carried, last)."""
  chunk = (lambda c: num_chunks - 1 - c) if reverse else (lambda c: c)
  token = lambda last: pl.BlockSpec((None, None, C, last), lambda b, h, c: (b, h, chunk(c), 0))
  row_mask = pl.BlockSpec((None, C, 1), lambda b, h, c: (b, chunk(c), 0))
  return [token(K), token(K), token(K), token(V), token(1), row_mask, row_mask, row_mask]


def call_params(interpret):
  """``pallas_call``'s interpret and compiler arguments for the chunk walks (RWKV-7's too)."""
  return dict(interpret=pltpu.InterpretParams() if interpret else False,
              compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS))


def _forward(scale, C, interpret, inputs, h0, *, keep_states):
  q, k, g, v, beta, seg, carried, last = inputs
  B, HV, T, K = k.shape
  V = v.shape[-1]
  num_chunks = T // C
  state = pl.BlockSpec((None, None, K, V), lambda b, h, c: (b, h, 0, 0))
  out_shape = [jax.ShapeDtypeStruct((B, HV, T, V), v.dtype),
               jax.ShapeDtypeStruct((B, HV, K, V), F32)]
  out_specs = [pl.BlockSpec((None, None, C, V), lambda b, h, c: (b, h, c, 0)), state]
  if keep_states:
    out_shape.append(jax.ShapeDtypeStruct((B, HV, num_chunks, K, V), F32))
    out_specs.append(pl.BlockSpec((None, None, None, K, V), lambda b, h, c: (b, h, c, 0, 0)))
  kernel = functools.partial(_forward_kernel, scale=scale,
                             prims=primitives(v.dtype, interpret), keep_states=keep_states)
  return pl.pallas_call(
      kernel, grid=(B, HV, num_chunks),
      in_specs=_specs(C, K, V, num_chunks, reverse=False) + [state],
      out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((K, V), F32)], **call_params(interpret))(*inputs, h0)


def _backward(scale, C, interpret, inputs, states, dO, dfinal):
  q, k, g, v, beta, seg, carried, last = inputs
  B, HV, T, K = k.shape
  V = v.shape[-1]
  num_chunks = T // C
  back = lambda c: num_chunks - 1 - c
  token = lambda last_dim: pl.BlockSpec((None, None, C, last_dim),
                                        lambda b, h, c: (b, h, back(c), 0))
  state = pl.BlockSpec((None, None, K, V), lambda b, h, c: (b, h, 0, 0))
  in_specs = _specs(C, K, V, num_chunks, reverse=True) + [
      pl.BlockSpec((None, None, None, K, V), lambda b, h, c: (b, h, back(c), 0, 0)),
      token(V), state]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, g, beta)] + [
      jax.ShapeDtypeStruct((B, HV, K, V), F32)]
  out_specs = [token(K), token(K), token(V), token(K), token(1), state]
  kernel = functools.partial(_backward_kernel, scale=scale,
                             prims=primitives(v.dtype, interpret))
  return pl.pallas_call(
      kernel, grid=(B, HV, num_chunks), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, scratch_shapes=[pltpu.VMEM((K, V), F32)],
      **call_params(interpret))(*inputs, states, dO, dfinal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _kda(scale, C, interpret, q, k, g, v, beta, seg, carried, last, h0):
  o, final = _forward(scale, C, interpret, (q, k, g, v, beta, seg, carried, last), h0,
                      keep_states=False)
  return o, final


def _kda_fwd(scale, C, interpret, q, k, g, v, beta, seg, carried, last, h0):
  inputs = (q, k, g, v, beta, seg, carried, last)
  o, final, states = _forward(scale, C, interpret, inputs, h0, keep_states=True)
  return (o, final), (inputs, states)


def _kda_bwd(scale, C, interpret, residuals, cotangents):
  inputs, states = residuals
  dO, dfinal = cotangents
  dq, dk, dv, dg, dbeta, dh0 = _backward(scale, C, interpret, inputs, states, dO, dfinal)
  return dq, dk, dg, dv, dbeta, None, None, None, dh0


_kda.defvjp(_kda_fwd, _kda_bwd)


def scan(q, k, v, g, beta, initial_state, segment_index, *, scale: float, chunk_size: int = 64,
         interpret: bool | None = None):
  """KDA over sequences with the Pallas TPU kernels; the contract of ``pallas_gpu.scan``.

  Args:
    q, k, g: [B, T, HV, K] (q unscaled; q and k already repeated to the value heads); g a log
      decay <= 0.
    v: [B, T, HV, V]; its dtype is the output's.
    beta: [B, T, HV].
    initial_state: [B, HV, K, V] float32.
    segment_index: None, or [B, T] non-decreasing int32; the state restarts from zero where it
      steps up.
    scale: the query scale, applied in the kernels.
    chunk_size: tokens per chunk, a power of two >= 16.
    interpret: TPU interpret mode; None: unless the backend is a TPU.

  Returns:
    o [B, T, HV, V] in v's dtype and the final state [B, HV, K, V] float32.
  """
  if reason := unsupported(chunk_size):
    raise ValueError(reason)
  interpret = default_interpret() if interpret is None else interpret
  B, T = q.shape[:2]
  C = chunk_size
  Tp = -(-T // C) * C
  heads_first = lambda x: jnp.moveaxis(jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2)),
                                       2, 1)
  q, k, g, v = map(heads_first, (q, k, g, v))
  beta = heads_first(beta)[..., None]
  masks = chunk_math.packed_row_masks(segment_index, B, T, C)
  o, final = _kda(float(scale), C, interpret, q, k, g, v, beta, *masks, initial_state)
  return jnp.moveaxis(o, 1, 2)[:, :T], final
