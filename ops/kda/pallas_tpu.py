"""Chunkwise KDA as Pallas TPU (Mosaic) kernels (implementation ``"pallas_tpu"``), SPEC 3.3-3.6.

Two kernels, each one walk over the chunks with the state in VMEM scratch; the mathematics is
``ops.kda._kernel_chunk``'s, shared with the GPU kernels. The walks take the op as a ``ChunkOp``
(its primitives and its chunk module), so RWKV-7's TPU kernels
(``ops.rwkv7.pallas_tpu``) are these same two kernels on its own chunk mathematics:

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
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops.kda import _kernel_chunk as chunk_math
from ops.kda import l2norm

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST
SEMANTICS = ("parallel", "parallel", "arbitrary")


def default_interpret() -> bool:
  """TPU interpret mode (the same kernels on any backend) unless JAX runs on a TPU."""
  return jax.default_backend() != "tpu"


def unsupported(chunk_size: int, key_dim: int, interpret: bool | None = None) -> str | None:
  """Why these kernels cannot run a call, or None (a power of two >= 16 is sublane-aligned); no
  limit on K (``key_dim``) is known on a TPU, so the answer is the same interpreted or not
  (``interpret``: the GPU kernels' signature)."""
  del key_dim, interpret
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


class ChunkOp(NamedTuple):
  """What a chunkwise op gives the chunk walk below (KDA's here, RWKV-7's in
  ``ops.rwkv7.pallas_tpu``), for token inputs in the op's order, each [C, width] per chunk.

  primitives(dtype, interpret) -> the backend ``Primitives`` (dtype: v's).
  math: the op's chunk module: ``load`` (the chunk from the token inputs as float32 tiles and
    the packed-row masks), ``intra_forward``, ``state_forward``, ``state_backward`` and
    ``token_gradients`` (the token inputs' gradients, in their order, from the cotangents of the
    chunk matrices), shared with the GPU kernels.
  value_index: which token input is v.
  """

  primitives: Callable
  math: object
  value_index: int


def _forward_kernel(*refs, op: ChunkOp, num_tokens, scale, prims, keep_states):
  tokens = refs[:num_tokens]
  seg_ref, carried_ref, last_ref, h0_ref, o_ref, final_ref = refs[num_tokens:num_tokens + 6]
  rest = refs[num_tokens + 6:]
  states_ref = rest[0] if keep_states else None
  state_ref = rest[-1]
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    state_ref[...] = h0_ref[...]

  values = [ref[...].astype(F32) for ref in tokens]
  chunk = op.math.load(values, seg_ref[...], carried_ref[...], last_ref[...], prims, scale)
  matrices = op.math.intra_forward(chunk, values[op.value_index])
  S = state_ref[...]
  if keep_states:
    states_ref[...] = S
  o, S, _ = op.math.state_forward(S, matrices, prims.dot)
  o_ref[...] = o.astype(o_ref.dtype)
  state_ref[...] = S

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    final_ref[...] = S


def _backward_kernel(*refs, op: ChunkOp, num_tokens, scale, prims):
  tokens = refs[:num_tokens]
  (seg_ref, carried_ref, last_ref, states_ref, do_ref,
   dfinal_ref) = refs[num_tokens:num_tokens + 6]
  grad_refs = refs[num_tokens + 6:2 * num_tokens + 6]
  dh0_ref, dstate_ref = refs[2 * num_tokens + 6:]
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    dstate_ref[...] = dfinal_ref[...]

  values = [ref[...].astype(F32) for ref in tokens]
  chunk = op.math.load(values, seg_ref[...], carried_ref[...], last_ref[...], prims, scale)
  v = values[op.value_index]
  matrices = op.math.intra_forward(chunk, v)
  cotangents, dS = op.math.state_backward(states_ref[...], dstate_ref[...], matrices,
                                          do_ref[...].astype(F32), prims.dot)
  dstate_ref[...] = dS
  for ref, value in zip(grad_refs, op.math.token_gradients(chunk, v, cotangents, scale)):
    ref[...] = value.astype(ref.dtype)

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    dh0_ref[...] = dS


def _specs(C, tokens, num_chunks, reverse):
  """Block specs of one chunk of each [B, HV, T, width] token input, then of the three
  [B, T, 1] packed-row masks."""
  chunk = (lambda c: num_chunks - 1 - c) if reverse else (lambda c: c)
  token = lambda width: pl.BlockSpec((None, None, C, width), lambda b, h, c: (b, h, chunk(c), 0))
  row_mask = pl.BlockSpec((None, C, 1), lambda b, h, c: (b, chunk(c), 0))
  return [token(x.shape[-1]) for x in tokens] + [row_mask] * 3


def call_params(interpret):
  """``pallas_call``'s interpret and compiler arguments for the chunk walks."""
  return dict(interpret=pltpu.InterpretParams() if interpret else False,
              compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS))


def _state_spec(K, V):
  return pl.BlockSpec((None, None, K, V), lambda b, h, c: (b, h, 0, 0))


def _forward(op, scale, C, interpret, tokens, masks, h0, *, keep_states):
  v = tokens[op.value_index]
  B, HV, T, V = v.shape
  K = h0.shape[-2]
  num_chunks = T // C
  out_shape = [jax.ShapeDtypeStruct((B, HV, T, V), v.dtype),
               jax.ShapeDtypeStruct((B, HV, K, V), F32)]
  out_specs = [_specs(C, [v], num_chunks, reverse=False)[0], _state_spec(K, V)]
  if keep_states:
    out_shape.append(jax.ShapeDtypeStruct((B, HV, num_chunks, K, V), F32))
    out_specs.append(pl.BlockSpec((None, None, None, K, V), lambda b, h, c: (b, h, c, 0, 0)))
  kernel = functools.partial(_forward_kernel, op=op, num_tokens=len(tokens), scale=scale,
                             prims=op.primitives(v.dtype, interpret), keep_states=keep_states)
  return pl.pallas_call(
      kernel, grid=(B, HV, num_chunks),
      in_specs=_specs(C, tokens, num_chunks, reverse=False) + [_state_spec(K, V)],
      out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((K, V), F32)], **call_params(interpret))(*tokens, *masks, h0)


def _backward(op, scale, C, interpret, tokens, masks, states, dO, dfinal):
  v = tokens[op.value_index]
  B, HV, T, V = v.shape
  K = dfinal.shape[-2]
  num_chunks = T // C
  back = lambda c: num_chunks - 1 - c
  specs = _specs(C, tokens, num_chunks, reverse=True)
  in_specs = specs + [
      pl.BlockSpec((None, None, None, K, V), lambda b, h, c: (b, h, back(c), 0, 0)),
      _specs(C, [v], num_chunks, reverse=True)[0], _state_spec(K, V)]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in tokens] + [
      jax.ShapeDtypeStruct((B, HV, K, V), F32)]
  out_specs = specs[:len(tokens)] + [_state_spec(K, V)]
  kernel = functools.partial(_backward_kernel, op=op, num_tokens=len(tokens), scale=scale,
                             prims=op.primitives(v.dtype, interpret))
  return pl.pallas_call(
      kernel, grid=(B, HV, num_chunks), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, scratch_shapes=[pltpu.VMEM((K, V), F32)],
      **call_params(interpret))(*tokens, *masks, states, dO, dfinal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _walk(op, scale, C, interpret, tokens, masks, h0):
  return _forward(op, scale, C, interpret, tokens, masks, h0, keep_states=False)


def _walk_fwd(op, scale, C, interpret, tokens, masks, h0):
  o, final, states = _forward(op, scale, C, interpret, tokens, masks, h0, keep_states=True)
  return (o, final), (tokens, masks, states)


def _walk_bwd(op, scale, C, interpret, residuals, cotangents):
  tokens, masks, states = residuals
  *grads, dh0 = _backward(op, scale, C, interpret, tokens, masks, states, *cotangents)
  return tuple(grads), (None,) * len(masks), dh0


_walk.defvjp(_walk_fwd, _walk_bwd)


def walk(op: ChunkOp, tokens, initial_state, segment_index, *, scale: float, chunk_size: int,
         interpret: bool | None):
  """One op's chunkwise forward (and, through a ``custom_vjp``, backward) as the two TPU chunk
  walks.

  Args:
    op: the op's ``ChunkOp``.
    tokens: the token inputs in the op's order, each [B, T, HV, width] (width 1 for a
      per-token scalar such as beta).
    initial_state: [B, HV, K, V] float32.
    segment_index: None, or [B, T] non-decreasing int32.
    scale, chunk_size, interpret: as ``scan``'s.

  Returns:
    o [B, T, HV, V] in v's dtype and the final state [B, HV, K, V] float32.
  """
  if reason := chunk_math.chunk_size_problem(chunk_size, "pallas_tpu"):
    raise ValueError(reason)
  interpret = default_interpret() if interpret is None else interpret
  B, T = tokens[0].shape[:2]
  C = chunk_size
  padded = -(-T // C) * C
  heads_first = lambda x: jnp.moveaxis(jnp.pad(x, [(0, 0), (0, padded - T), (0, 0), (0, 0)]),
                                       2, 1)
  masks = chunk_math.packed_row_masks(segment_index, B, T, C)
  o, final = _walk(op, float(scale), C, interpret, tuple(map(heads_first, tokens)), masks,
                   initial_state)
  return jnp.moveaxis(o, 1, 2)[:, :T], final


KDA = ChunkOp(primitives=primitives, math=chunk_math, value_index=3)


def scan(q, k, v, g, beta, initial_state, segment_index, *, scale: float, chunk_size: int = 64,
         l2_normalize_qk: bool = False, interpret: bool | None = None):
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
    l2_normalize_qk: L2-normalise q and k over K first (``ops.kda.l2norm``; here in XLA, to
      float32, before the kernels).
    interpret: TPU interpret mode; None: unless the backend is a TPU.

  Returns:
    o [B, T, HV, V] in v's dtype and the final state [B, HV, K, V] float32.
  """
  if l2_normalize_qk:
    q, k = l2norm.normalize(q), l2norm.normalize(k)
  return walk(KDA, (q, k, g, v, beta[..., None]), initial_state, segment_index, scale=scale,
              chunk_size=chunk_size, interpret=interpret)
