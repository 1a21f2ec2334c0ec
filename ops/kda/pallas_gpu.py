"""Chunkwise KDA as Pallas GPU kernels (implementation ``"pallas_gpu"``), SPEC 3.3-3.6.

Four stages, in fla's split (SPEC 3.4, 3.6) between work that is parallel over chunks and the
one walk over the chunks that carries the state. The kernels take the op as a ``TritonOp`` (its
chunk module, how to load a chunk, its gradients, and how each of its chunk matrices is kept
between the kernels), so RWKV-7's GPU kernels (``ops.rwkv7.pallas_gpu``) are these same stages on
its own chunk mathematics. For KDA (``ops.kda._kernel_subchunk`` has the sub-chunk details):

  intra forward    three kernels:
    pair rows      grid (B, HV, chunks, C/16 x 2)  one 16-row sub-chunk and key block each:
                                               its rows of A_qk and P_kk, partial sums,
                                               and for the backward its gated operands
    block inverse  grid (B, HV, chunks)        A_qk and P_kk summed, T = (I + A_kk)^-1 on
                                               [16, 16] blocks (P_kk and T kept for the
                                               backward, P_kk written only then)
    chunk outputs  grid (B, HV, chunks, K/64)  W = T (beta k Gamma), U = T (beta v), Q*Gamma,
                                               K*exp(G_C - G), exp(G_C), by 64-column blocks
  state forward    grid (B, HV, V/BV)     walks the chunks: V~ = U - W S, O = (Q Gamma) S + A_qk V~,
                                          S' = diag(exp G_C) S + Kg^T V~ (keeps S and V~
                                          per chunk)
  state backward   two kernels:
    reverse walk   grid (B, HV, V/BV)          walks the chunks backwards with dS only,
                                               keeping the dS after each chunk and dV~ (dU)
    cotangents     grid (B, HV, chunks)        each chunk's dW, dQg, dKg, dA_qk, d exp(G_C)
                                               from its S, dS, V~ and dV~, summed over the
                                               value blocks in a loop; one call per group of
                                               fields whose sums fit the registers
  intra backward   four kernels, on the saved P_kk, T and gated operands:
    WY dA_kk       grid (B, HV, chunks)        dT summed over column blocks, dA_kk and dbeta's
                                               part through A_kk
    WY columns     grid (B, HV, chunks, K/64)  the rest of the cotangents through W and U: dv,
                                               dk's part through W, dbeta's parts
    gradient rows  grid (B, HV, chunks,        one sub-chunk's dq, dk and dG on 32 key
                        C/16 x K/32)           columns
    dg             grid (B, HV, chunks)        the reverse cumulative sum of dG over the chunk
  and, for l2-normalised q and k, the normalisation's backward (grid (B, HV, chunks)).

RWKV-7's intra forward and backward are one kernel per chunk each (``_intra_forward``,
``_intra_backward``) that go through the chunk by sub-chunks in order; KDA's were too, until
splitting them let many short programs share each multiprocessor (docs/kernels.md, versions 5
and 6).

Stable pair products without a secondary loop (SPEC 3.5), by sub-chunks
(``ops.kda._kernel_subchunk`` has the details). The pair products
sum_d x_rd y_id exp(G_rd - G_id) (i < r) of two 16-row sub-chunks are one [16, K] x [K, 16]
product of gated rows and gated columns, both referenced at m, the last row of the earlier
sub-chunk: exp(G_r - G_i) = exp(G_r - G_m) exp(G_m - G_i), both exponents <= 0 because the
cumulative log decay only falls, so nothing overflows. Within a sub-chunk the same holds level
by level (``_kernel_chunk.LevelSplit``: at level s row r lies in an odd block of s rows and
column i in the block just before it), and the unit lower-triangular inverse of each diagonal
block uses the same levels (T_2s = T_s - T_s (A masked to level s) T_s, the 2 x 2 block inverse
at every scale); across sub-chunks T follows by block forward substitution. (The TPU kernels,
``ops.kda.pallas_tpu``, take the level split on the whole chunk, which suits the MXU; at C = 64
it held too many tiles for a Triton program's registers.)

Why the Triton backend (a plain ``pallas_call`` on GPU would go to Mosaic GPU): every kernel here,
KDA's and RWKV-7's alike, is a sequence of small matrix products (C = 64 rows, K, V <= 128) and
elementwise work on register-resident tiles, with reductions and masks whose layouts Triton
chooses; Triton's ``tl.dot`` already maps these products to Hopper's tensor cores, and none of
them needs the explicit warpgroup and TMA control that Mosaic GPU offers. Passing
``jax.experimental.pallas.triton.CompilerParams`` selects Triton.

Precision: with float32 inputs the products run as three TF32 passes (``TF32_TF32_F32_X3``, about
float32 accuracy); with 16-bit inputs as one TF32 pass (errors near 3e-4 relative, far under
bf16's rounding). In interpret mode (CPU) they are exact float32 products.

Cost per chunk and head (C = 64, K = V = 128; counts and measurements in docs/kernels.md): the
intra forward does 10 block products of 16 x K x 16 per pair type, 4 level-split 16 x 16
inverses with 16 block products of 16 x 16 x 16, and W and U (C C K, C C V): about 5 MFLOP; the
state forward 3 C K V + C C V products: about 7 MFLOP; the intra backward takes about three
times the intra forward's products. Bytes: inputs once (beta as a [C, 1] column; the intra
forward's kernels read them twice), P_kk and T ([C, C] in v's dtype; a differentiated call
alone writes P_kk) written once and read in both directions, the chunk matrices (W, Q Gamma,
K exp(G_C - G), A_qk and U in v's dtype, exp(G_C) float32) written once and read once per
value block; the arrays in v's dtype enter only products, whose operands on the GPU are v's
dtype, or sums whose result the products round so (docs/kernels.md, versions 11-13 and 19).
Until version 19 a differentiated call kept U float32, because the state backward formed
dA_qk = dO V~^T from V~ = U - W S, a sum that can cancel; since version 18 it reads the V~
that the state forward kept in v's dtype, so U's rounding reaches the backward only through
that V~, as it reaches o in every call. Tokens that the op
L2-normalises (``walk``'s ``normalized``: KDA's q and k under ``l2_normalize_qk``) arrive in their
own dtype with a float32 inverse norm per token, multiplied in as each kernel loads them, so the
normalised values are float32 without a float32 copy in memory (docs/kernels.md, version 8).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ops.kda import _kernel_chunk as chunk_math
from ops.kda import _kernel_subchunk, l2norm
from ops.kda._step_common import next_power_of_2

F32 = jnp.float32
# Value channels a state-kernel program takes (the cotangents': a step of its loop over them);
# "state_cotangents[<fields>]" sets one group's. The cotangents take V = 128 whole, one call for
# every field, each formed where it is stored (docs/kernels.md, version 21); wider values loop
# over blocks in groups (version 18: KDA's second group then ran faster on 32).
VALUE_BLOCK = {"state_forward": 64, "state_walk_backward": 64, "state_cotangents": 128,
               "state_cotangents[Kg,A,decay]": 32}
MAX_KEY_DIM = 128  # the widest K the state kernels fit in shared memory (``unsupported``)
PAIR_KEY_BLOCKS = 2  # key blocks of the pair rows' grid (docs/kernels.md, version 6)
OUTPUT_COLUMNS = 64  # key and value columns a chunk-outputs program takes
OUTPUT_CHUNKS = 32  # most consecutive chunks a chunk-outputs program takes (docs/kernels.md, v15)
OUTPUT_PROGRAMS = 512  # fewest programs of the chunk outputs' grid, where the chunks allow
GRADIENT_COLUMNS = 32  # key columns a gradient-rows program takes (docs/kernels.md, v9)
WY_COLUMNS = 64  # K and V columns the WY-backward program takes at a time
COTANGENT_SUMS = 2 * 64 * 128  # floats one state-cotangents program sums (docs/kernels.md, v7)
LAUNCH = {"intra_forward": (8, 1), "intra_backward": (8, 1), "state_forward": (8, 3),
          "state_backward": (8, 3), "pair_rows": (1, 1), "inverse_blocks": (1, 1),
          "chunk_outputs": (4, 3), "wy_dA_kk": (4, 1), "wy_columns": (4, 1),
          "gradient_rows": (4, 3), "dg": (4, 1), "normalize_backward": (4, 1),
          "state_cotangents": (8, 3),
          # "<op>.<kernel>": one op's own setting. RWKV-7's state forward loads four [C, K]
          # fields a chunk to KDA's three, and its loop's buffers for 3 stages would pass the
          # H200's shared memory at K = 128 (docs/kernels.md, version 7). Its state backward
          # kernels keep the stages they had before KDA's gained one each (version 11), as
          # RWKV-7 was not timed with more.
          "rwkv7.state_forward": (8, 2), "rwkv7.state_backward": (8, 2),
          "rwkv7.state_cotangents": (8, 1)}  # (num_warps, num_stages), measured in docs/kernels.md


def _launch(op, kernel: str) -> tuple[int, int]:
  """``op``'s (num_warps, num_stages) for ``kernel``: its own ``LAUNCH`` entry, else the shared."""
  return LAUNCH.get(f"{op.name}.{kernel}", LAUNCH[kernel])


def default_interpret() -> bool:
  """Interpret mode (the same kernels on any backend) unless JAX runs on a GPU."""
  return jax.default_backend() != "gpu"


def unsupported(chunk_size: int, key_dim: int, interpret: bool | None = None) -> str | None:
  """Why these kernels cannot run a call with this chunk and K, or None. Compiled for a GPU
  (``interpret`` False, or None off a CPU), K padded to a power of two must be at most
  ``MAX_KEY_DIM``: the state kernels keep the [K, 64] state block and every chunk's [C, K]
  tiles in shared memory, which at K = 256 passes the H200's 227 KB (docs/kernels.md,
  version 7)."""
  if reason := chunk_math.chunk_size_problem(chunk_size, "pallas_gpu"):
    return reason
  compiled = not (default_interpret() if interpret is None else interpret)
  if compiled and next_power_of_2(key_dim) > MAX_KEY_DIM:
    return (f"K must be at most {MAX_KEY_DIM} for pallas_gpu on a GPU (its state kernels keep "
            f"K-wide tiles in shared memory), got K = {key_dim}")
  return None


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


# ---------------------------------------------------------------------------- the op description

class Field(NamedTuple):
  """How the kernels keep one of an op's chunk matrices between the intra and state kernels.

  width: "K" or "C" ([C, K] or [C, C] per chunk, read whole by every state-kernel program), "V"
    ([C, V], one value block per program), or "chunk" (a [1, K] row per chunk, kept as
    [B, T/C, HV, K]). The state backward writes a "V" field's cotangent per value block and
    sums the others' over the value blocks in the kernel.
  dtype: the stored dtype; None: v's.
  token: None, or the token input the field is (the intra forward stores nothing for it).
  cotangent_is: None, or what the field's cotangent is and the state backward does not write
    again: "dO" (dO itself) or "d_shared" (the cotangent of the values both o and the next
    state read, KDA's V~ and RWKV-7's X, which the reverse walk writes).
  cotangent_dtype: the dtype the state backward writes the field's cotangent in; None: v's
    (fla keeps its du in v's dtype between kernels).
  """

  width: str
  dtype: object = None
  token: int | None = None
  cotangent_is: str | None = None
  cotangent_dtype: object = F32


class TritonOp(NamedTuple):
  """What a chunkwise op gives the four stages below (KDA's here, RWKV-7's in
  ``ops.rwkv7.pallas_gpu``), for token inputs in the op's order, each [B, T, HV, width].

  name: the op's name, for its own ``LAUNCH`` entries ("<name>.<kernel>").
  primitives(precision) -> the chunk module's ``Primitives``.
  math: the op's chunk module, shared with the TPU kernels; the state kernels take its
    ``ChunkMatrices``, ``state_forward``, ``state_step_backward`` and ``state_cotangents``
    (``_kernel_chunk.state_backward_forms``).
  value_index: which token input is v.
  fields: a ``math.ChunkMatrices`` of ``Field``s.
  sub_chunks: the module forming the chunk matrices and the token gradients from 16-row
    sub-chunks, for the intra kernels (``SUB``, ``GRADIENTS``: the gradients' names in the
    token order, ``load_rows`` and, unless the op brings its own (below), ``intra_forward``
    and ``intra_backward``; ``ops.kda._kernel_subchunk``, ``ops.rwkv7._kernel_subchunk``).
  intra_forward: None, or the op's own intra forward in place of the one kernel over
    ``sub_chunks.intra_forward``: called as ``_intra_forward`` is, it returns the
    ``ChunkMatrices`` of arrays and a tuple of arrays saved for the intra backward, empty
    unless its keyword ``for_backward`` (KDA's: ``_kda_intra_forward``, three kernels, saving
    P_kk and T).
  intra_backward: None, or the op's own intra backward in place of the one kernel over
    ``sub_chunks.intra_backward``: called as ``_intra_backward`` is (KDA's:
    ``_kda_intra_backward``, three kernels).
  """

  name: str
  primitives: Callable
  math: object
  value_index: int
  fields: tuple
  sub_chunks: object
  intra_forward: Callable | None = None
  intra_backward: Callable | None = None


class Sizes(NamedTuple):
  """A call's static sizes: batch, time (whole chunks), value heads, K, V (powers of two) and the
  chunk; a "K", "V" or "C" field is that wide."""

  B: int
  T: int
  HV: int
  K: int
  V: int
  C: int


def _sizes(op: TritonOp, tokens, state, C) -> Sizes:
  B, T, HV, V = tokens[op.value_index].shape
  return Sizes(B, T, HV, state.shape[-2], V, C)


def _block(width, b, h, c, rows, values):
  """Where chunk c of head h of batch row b of a chunk matrix lies (value block ``values`` of a
  "V" one); its [B, T, HV, width] rows, or its [B, T/C, HV, K] row for "chunk"."""
  if width == "chunk":
    return b, c, h, slice(None)
  return b, rows, h, values if width == "V" else slice(None)


def _as_tile(x, width):
  """A loaded block as the chunk module's 2-D tile ([1, K] for a "chunk" field)."""
  return x.reshape(1, x.shape[0]) if width == "chunk" else x


def _load_matrices(op, refs, b, h, c, rows, values):
  """Chunk c's ``ChunkMatrices`` (float32) for value block ``values``, one ref per field."""
  return op.math.ChunkMatrices(*(
      _as_tile(ref[_block(f.width, b, h, c, rows, values)].astype(F32), f.width)
      for ref, f in zip(refs, op.fields)))


# ------------------------------------------------------------------------------------ kernels

def _split_inverse_norms(tokens, normalized):
  """(the op's tokens, their inverse norms) from the kernels' tokens: the op's tokens followed
  by the inverse norm of each whose index is in ``normalized`` (``_with_inverse_norms``)."""
  count = len(tokens) - len(normalized)
  return list(tokens[:count]), tokens[count:]


def _load_tokens(token_refs, where, normalized):
  """The op's token inputs at ``where`` (an index, or a function of the ref giving its index)
  as float32 tiles, from the kernel's token refs (laid out as ``_split_inverse_norms`` reads
  them): each token in ``normalized`` multiplied by its inverse norm [.., 1], as it is loaded."""
  at = where if callable(where) else lambda ref: where
  tokens, inverse_norms = _split_inverse_norms([ref[at(ref)].astype(F32) for ref in token_refs],
                                               normalized)
  for i, inverse in zip(normalized, inverse_norms):
    tokens[i] = tokens[i] * inverse
  return tokens


def _chunk_rows(token_refs, mask_refs, normalized, scale, where=Ellipsis):
  """A whole chunk's ``_kernel_subchunk.Rows`` from its token refs at ``where`` (as
  ``_load_tokens`` takes it) and its three packed-row mask refs."""
  return _kernel_subchunk.load_rows(_load_tokens(token_refs, where, normalized),
                                    *(ref[...] for ref in mask_refs), scale)


def _sub_chunk_rows(op, refs, num_tokens, scale, normalized, size: int | None = None):
  """(S, rows(b): block b's slice, load(b): its ``Rows``) of a block's token and mask refs, by
  blocks of S = ``size`` rows (default: the op's sub-chunks, ``op.sub_chunks.SUB``)."""
  token_refs, mask_refs = refs[:num_tokens], refs[num_tokens:num_tokens + 3]
  S = size or op.sub_chunks.SUB
  rows = lambda b: pl.ds(b * S, S)

  def load(b):
    tokens = _load_tokens(token_refs, (rows(b), slice(None)), normalized)
    return op.sub_chunks.load_rows(tokens, *(ref[rows(b), :] for ref in mask_refs), scale)

  return S, rows, load


def _intra_forward_kernel(*refs, op, num_tokens, scale, normalized, precision):
  """Each sub-chunk's rows loaded once, each chunk matrix written by [S, width] row blocks
  ([S, S] blocks for a "C" field) as soon as it is known."""
  S, rows, load = _sub_chunk_rows(op, refs, num_tokens, scale, normalized)
  out_refs = dict(zip([name for name, f in zip(op.fields._fields, op.fields) if f.token is None],
                      refs[num_tokens + 3:]))

  def store(name, value, b, a=None):
    ref = out_refs[name]
    where = (Ellipsis,) if b is None else (rows(b), slice(None) if a is None else rows(a))
    ref[where] = value.reshape(ref.shape if b is None else value.shape).astype(ref.dtype)

  op.sub_chunks.intra_forward(load, refs[0].shape[0] // S, op.primitives(precision), store)


def _cotangent_loader(op, refs, rows):
  """``cotangent(name, b, a=None)``: row block b of a chunk matrix's cotangent ([S, width]; block
  (b, a) of a "C" field; the whole [1, K] row of a "chunk" field for b = None), float32, from
  one ref per field of ``op.fields``."""
  cotangent_refs = dict(zip(op.fields._fields, zip(refs, op.fields)))

  def cotangent(name, b, a=None):
    ref, field = cotangent_refs[name]
    if b is None:
      return _as_tile(ref[...].astype(F32), field.width)
    return ref[rows(b), rows(a) if a is not None else slice(None)].astype(F32)

  return cotangent


def _intra_backward_kernel(*refs, op, num_tokens, scale, normalized, precision):
  """The rows and the cotangents read by [S, width] row blocks ([S, S] blocks of a "C" field),
  each gradient written by row blocks."""
  S, rows, load = _sub_chunk_rows(op, refs, num_tokens, scale, normalized)
  num_fields = len(op.fields)
  cotangent = _cotangent_loader(op, refs[num_tokens + 3:][:num_fields], rows)
  grad_refs = dict(zip(op.sub_chunks.GRADIENTS, refs[num_tokens + 3 + num_fields:]))

  def store(name, value, b):
    grad_refs[name][rows(b), :] = value.astype(grad_refs[name].dtype)

  op.sub_chunks.intra_backward(load, cotangent, refs[0].shape[0] // S, op.primitives(precision),
                               store, scale)


def _pair_rows_kernel(*refs, num_tokens, scale, normalized, precision, key_blocks):
  """KDA's sub-chunk j of a chunk (``_kernel_subchunk.pair_rows``) on key block kb, with
  program_id(3) = j key_blocks + kb: its [S, S] blocks on and below the diagonal of A_qk's and
  of M's partial sums over that block's key columns (every entry is a sum over the key
  columns) and, given their refs (after those two), j's gated operands on that block."""
  S, rows, load = _sub_chunk_rows(KDA, refs, num_tokens, scale, normalized)
  outs = dict(zip(("A", "M"), refs[num_tokens + 3:num_tokens + 5]))
  gated_refs = dict(zip(_kernel_subchunk.GATED, refs[num_tokens + 5:]))

  def store(name, value, a):
    outs[name][:, rows(a)] = value

  def store_gated(name, value):
    ref = gated_refs[name]
    ref[...] = value.reshape(ref.shape).astype(ref.dtype)

  _kernel_subchunk.pair_rows(load, pl.program_id(3) // key_blocks, primitives(precision), store,
                             store_gated if gated_refs else None)


def _inverse_blocks_kernel(a_parts_ref, m_parts_ref, beta_ref, a_ref, t_ref, *maybe_m_ref,
                           precision):
  """A chunk's A_qk and T [C, C] from the key blocks' partial sums of A_qk and M = P_kk and
  from beta (``_kernel_subchunk.inverse_blocks``); given its ref, M's blocks on and below the
  diagonal too (the backward reads no others), each written as the inverse sums it; each
  output in its ref's dtype. The partial sums are read by [S, S] blocks on and below the
  diagonal only (``pair_rows`` stores no others); A_qk's blocks above it are written as zeros."""
  S = _kernel_subchunk.SUB
  rows = lambda b: pl.ds(b * S, S)
  key_blocks, n = m_parts_ref.shape[0], t_ref.shape[0] // S
  summed = lambda parts_ref, b, a: sum(parts_ref[kb, rows(b), rows(a)] for kb in range(key_blocks))
  for b in range(n):
    for a in range(n):
      A_ba = summed(a_parts_ref, b, a) if a <= b else jnp.zeros((S, S), F32)
      a_ref[rows(b), rows(a)] = A_ba.astype(a_ref.dtype)

  def load(b, a):
    value = summed(m_parts_ref, b, a)
    for m_ref in maybe_m_ref:
      m_ref[rows(b), rows(a)] = value.astype(m_ref.dtype)
    return value

  def store(value, b, a):
    t_ref[rows(b), rows(a)] = value.astype(t_ref.dtype)

  _kernel_subchunk.inverse_blocks(load, lambda b: beta_ref[rows(b), :].astype(F32), n,
                                  primitives(precision), store)


def _chunk_outputs_kernel(*refs, num_tokens, scale, normalized, precision):
  """W, U, Qg, Kg and decay (``_kernel_subchunk.chunk_outputs``) of the block's consecutive
  chunks, from their rows and T, in a loop: with ``num_stages`` > 1 Triton's pipeliner loads a
  chunk's inputs while the chunk before it is being formed."""
  t_ref, out_refs = refs[num_tokens + 3], dict(zip(_CHUNK_OUTPUTS, refs[num_tokens + 4:]))
  _, rows, load = _sub_chunk_rows(KDA, refs, num_tokens, scale, normalized, size=t_ref.shape[1])

  def chunk(i, carry):
    def store(name, value):
      ref = out_refs[name]
      ref[pl.ds(i, 1) if name == "decay" else rows(i), :] = value.astype(ref.dtype)

    _kernel_subchunk.chunk_outputs(load(i), t_ref[rows(i), :], primitives(precision), store)
    return carry

  jax.lax.fori_loop(0, out_refs["decay"].shape[0], chunk, 0)


def _wy_dA_kk_kernel(*refs, num_tokens, scale, normalized, precision, column_blocks):
  """A chunk's dA_kk and dbeta's part through A_kk (``_kernel_subchunk.wy_dA_kk_chunk``) from
  its rows, T, P_kk, dW and dU, dT summed over ``column_blocks`` blocks of the K and V columns."""
  token_refs, mask_refs = refs[:num_tokens], refs[num_tokens:num_tokens + 3]
  t_ref, p_ref, dw_ref, du_ref = refs[num_tokens + 3:num_tokens + 7]
  outs = dict(zip(("dA_kk", "dbeta"), refs[num_tokens + 7:]))
  block = lambda ref, cb: (slice(None), pl.ds(cb * (ref.shape[-1] // column_blocks),
                                              ref.shape[-1] // column_blocks))

  def load(cb):
    x = _chunk_rows(token_refs, mask_refs, normalized, scale,
                    lambda ref: block(ref, cb) if ref.shape[-1] > 1 else Ellipsis)
    return x, dw_ref[block(dw_ref, cb)].astype(F32), du_ref[block(du_ref, cb)].astype(F32)

  def store(name, value):
    outs[name][...] = value.astype(outs[name].dtype)

  _kernel_subchunk.wy_dA_kk_chunk(load, column_blocks, t_ref[...], p_ref[...].astype(F32),
                                  primitives(precision), store)


def _wy_columns_kernel(*refs, num_tokens, scale, normalized, precision):
  """One column block of a chunk's dv, dk's part through W and dbeta's part through W and U
  (``_kernel_subchunk.wy_column_block``) from its rows, T, dW and dU on that block."""
  token_refs, mask_refs = refs[:num_tokens], refs[num_tokens:num_tokens + 3]
  t_ref, dw_ref, du_ref = refs[num_tokens + 3:num_tokens + 6]
  x = _chunk_rows(token_refs, mask_refs, normalized, scale)
  outputs = _kernel_subchunk.wy_column_block(x, dw_ref[...].astype(F32),
                                             du_ref[...].astype(F32), t_ref[...],
                                             primitives(precision))
  for ref, value in zip(refs[num_tokens + 6:], outputs):
    ref[...] = value.astype(ref.dtype)


def _gradient_rows_kernel(*refs, num_tokens, scale, normalized, precision, column_blocks):
  """Sub-chunk j's token gradients on column block cb (``_kernel_subchunk.gradient_rows``),
  with program_id(3) = j column_blocks + cb."""
  S, rows, load = _sub_chunk_rows(KDA, refs, num_tokens, scale, normalized)
  num_fields = len(KDA.fields)
  rest = refs[num_tokens + 3:]
  cotangent = _cotangent_loader(KDA, rest[:num_fields], rows)
  dA_ref, dk_w_ref = rest[num_fields:num_fields + 2]
  num_gated = len(_kernel_subchunk.GATED)
  gated_refs = dict(zip(_kernel_subchunk.GATED, rest[num_fields + 2:num_fields + 2 + num_gated]))
  outs = dict(zip(_GRADIENT_ROWS, rest[num_fields + 2 + num_gated:]))

  def store(name, value):
    ref = outs[name]
    ref[...] = value.reshape(ref.shape).astype(ref.dtype)

  def gated(name, b):
    return gated_refs[name][pl.ds(b, 1) if name == "total" else rows(b), :].astype(F32)

  _kernel_subchunk.gradient_rows(
      load, gated, cotangent, lambda b, a: dA_ref[rows(b), rows(a)],
      lambda b: dk_w_ref[rows(b), :], pl.program_id(3) // column_blocks,
      refs[0].shape[0] // S, primitives(precision), store, scale)


def _state_forward_kernel(*refs, op, sizes, BV, precision, keep_states):
  num_fields = len(op.fields)
  matrix_refs = refs[:num_fields]
  h0_ref, o_ref, final_ref, *kept_refs = refs[num_fields:]
  b, h, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  values = pl.ds(vb * BV, BV)
  dot = op.primitives(precision).dot

  def chunk(c, S):
    rows = pl.ds(c * sizes.C, sizes.C)
    o, S_after, shared = op.math.state_forward(
        S, _load_matrices(op, matrix_refs, b, h, c, rows, values), dot)
    if keep_states:
      states_ref, shared_ref = kept_refs
      states_ref[b, c, h, :, values] = S.astype(states_ref.dtype)
      shared_ref[b, rows, h, values] = shared.astype(shared_ref.dtype)
    o_ref[b, rows, h, values] = o.astype(o_ref.dtype)
    return S_after

  final_ref[b, h, :, values] = jax.lax.fori_loop(0, sizes.T // sizes.C, chunk,
                                                 h0_ref[b, h, :, values].astype(F32))


def _state_walk_backward_kernel(*refs, op, sizes, BV, precision):
  """The reverse walk over the chunks (``math.state_step_backward``): the dS after each chunk
  to ``dstates`` [B, T/C, HV, K, V], each chunk's d_shared to [B, T, HV, V] and dh0, value
  block program_id(2)."""
  num_fields = len(op.fields)
  matrix_refs = refs[:num_fields]
  do_ref, dfinal_ref, dstates_ref, dh0_ref, d_shared_ref = refs[num_fields:]
  b, h, vb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  num_chunks = sizes.T // sizes.C
  values = pl.ds(vb * BV, BV)
  dot = op.primitives(precision).dot

  def chunk(step, dS):
    c = num_chunks - 1 - step
    rows = pl.ds(c * sizes.C, sizes.C)
    dstates_ref[b, c, h, :, values] = dS.astype(dstates_ref.dtype)
    m = _load_matrices(op, matrix_refs, b, h, c, rows, values)
    dS, d_shared = op.math.state_step_backward(dS, m, do_ref[b, rows, h, values].astype(F32),
                                               dot)
    d_shared_ref[b, rows, h, values] = d_shared.astype(d_shared_ref.dtype)
    return dS

  dh0_ref[b, h, :, values] = jax.lax.fori_loop(0, num_chunks, chunk,
                                               dfinal_ref[b, h, :, values].astype(F32))


def _state_cotangents_kernel(*refs, op, sizes, BV, precision, names):
  """Chunk program_id(2)'s cotangents of the chunk matrices ``names`` (``math.state_cotangents``)
  from the state before it, the dS after it and the shared values and their cotangent. With one
  value block each field is formed and stored in turn, so that one product's result is live at
  a time (KDA at K = V = 128: 156 registers at 8 warps, where the five sums of the loop below
  take 173). Otherwise value block by value block: a "V" field's block written in place, the
  others summed over the blocks in the loop and written once. What a group's fields do not read
  is not loaded:
  ``pallas_call`` removes unused reads when it traces the kernel (``pe.dce_jaxpr``; reads are
  a dead-code-eliminable effect)."""
  num_fields = len(op.fields)
  matrix_refs = refs[:num_fields]
  states_ref, dstates_ref, shared_ref, d_shared_ref, do_ref = refs[num_fields:num_fields + 5]
  written = [(name, getattr(op.fields, name).width, ref)
             for name, ref in zip(names, refs[num_fields + 5:])]
  per_block = [(name, width, ref) for name, width, ref in written if width == "V"]
  summed = [(name, width, ref) for name, width, ref in written if width != "V"]
  b, h, c = (pl.program_id(axis) for axis in range(3))
  rows = pl.ds(c * sizes.C, sizes.C)
  dot = op.primitives(precision).dot

  def cotangents(vb):
    """Value block vb's cotangent of one field, by name: each formed where it is stored."""
    values = pl.ds(vb * BV, BV)
    inputs = (states_ref[b, c, h, :, values].astype(F32),
              dstates_ref[b, c, h, :, values].astype(F32),
              shared_ref[b, rows, h, values].astype(F32),
              d_shared_ref[b, rows, h, values].astype(F32),
              _load_matrices(op, matrix_refs, b, h, c, rows, values),
              do_ref[b, rows, h, values].astype(F32))
    return values, lambda name: getattr(op.math.state_cotangents(*inputs, dot), name)

  def store(ref, width, value, values):
    ref[_block(width, b, h, c, rows, values)] = (
        value.reshape(ref.shape[-1]) if width == "chunk" else value).astype(ref.dtype)

  if sizes.V == BV:
    values, grad = cotangents(0)
    for name, width, ref in written:
      store(ref, width, grad(name), values)
    return

  def value_block(vb, sums):
    values, grad = cotangents(vb)
    for name, width, ref in per_block:
      store(ref, width, grad(name), values)
    return tuple(s + grad(name) for s, (name, _, _) in zip(sums, summed))

  sums = jax.lax.fori_loop(0, sizes.V // BV, value_block,
                           tuple(jnp.zeros(_tile(width, sizes), F32) for _, width, _ in summed))
  for (_, width, ref), value in zip(summed, sums):
    store(ref, width, value, None)


# ------------------------------------------------------------------------------------ wrappers

_kernel_calls: contextvars.ContextVar[list | None] = contextvars.ContextVar("kernel_calls",
                                                                            default=None)


def _triton_call(kernel, grid, in_specs, out_specs, out_shape, interpret, launch, *,
                 label: str = "", **params):
  """``pallas_call`` on the Triton backend; ``launch`` is (num_warps, num_stages). Inside
  ``_recording_kernel_calls`` each call is also recorded, named after the kernel and
  ``label``."""
  num_warps, num_stages = launch
  call = pl.pallas_call(
      functools.partial(kernel, **params), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, interpret=interpret,
      compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps,
                                                                  num_stages=num_stages))
  recorded = _kernel_calls.get()
  if recorded is None:
    return call

  def call_and_record(*args):
    name = kernel.__name__.strip("_").removesuffix("_kernel") + label
    recorded.append((name, jax.jit(call), args))
    return call(*args)

  return call_and_record


@contextlib.contextmanager
def _recording_kernel_calls():
  """Collects ``(name, jitted kernel, args)`` for every kernel called (eagerly) inside."""
  recorded = []
  token = _kernel_calls.set(recorded)
  try:
    yield recorded
  finally:
    _kernel_calls.reset(token)


def _config(op, tokens, state, C, interpret):
  """Static settings shared by the kernels (``state``: h0 or dfinal, for K)."""
  return dict(sizes=_sizes(op, tokens, state, C), interpret=interpret,
              precision=precision_for(tokens[op.value_index].dtype, interpret))


def _token_spec(C, width):
  """Blocks of one chunk of one head of a [B, T, HV, width] array."""
  return pl.BlockSpec((None, C, None, width), lambda b, h, c: (b, c, h, 0))


def _input_specs(tokens, C):
  """Blocks of the token inputs, then of the three [B, T, 1] packed-row masks."""
  mask = pl.BlockSpec((None, C, 1), lambda b, h, c: (b, c, 0))
  return [_token_spec(C, x.shape[-1]) for x in tokens] + [mask] * 3


def _layout(width, sizes: Sizes):
  """(shape, block spec of one chunk of one head) of a chunk matrix of ``width``."""
  B, T, HV, K, _, C = sizes
  if width == "chunk":
    return (B, T // C, HV, K), pl.BlockSpec((None, None, None, K), lambda b, h, c: (b, c, h, 0))
  return (B, T, HV, getattr(sizes, width)), _token_spec(C, getattr(sizes, width))


def _intra_forward(op, tokens, masks, *, scale, normalized, for_backward, sizes, interpret,
                   precision):
  """The chunk matrices as a ``ChunkMatrices`` of arrays (stored, or the token inputs they are)
  and nothing saved for the backward (``for_backward`` changes nothing)."""
  del for_backward
  store = tokens[op.value_index].dtype
  names, fields = zip(*[(name, f) for name, f in zip(op.fields._fields, op.fields)
                        if f.token is None])
  layouts = [_layout(f.width, sizes) for f in fields]
  shapes = [jax.ShapeDtypeStruct(shape, store if f.dtype is None else f.dtype)
            for (shape, _), f in zip(layouts, fields)]
  stored = _triton_call(
      _intra_forward_kernel, (sizes.B, sizes.HV, sizes.T // sizes.C),
      _input_specs(tokens, sizes.C), [spec for _, spec in layouts], shapes, interpret,
      _launch(op, "intra_forward"), op=op, num_tokens=len(tokens), scale=scale,
      normalized=normalized, precision=precision)(*tokens, *masks)
  stored = dict(zip(names, stored))
  return op.math.ChunkMatrices(*(stored[name] if f.token is None else tokens[f.token]
                                 for name, f in zip(op.fields._fields, op.fields))), ()


_CHUNK_OUTPUTS = ("W", "U", "Qg", "Kg", "decay")


def _column_block(spec, blocks: int, split: bool):
  """A per-chunk block spec (grid B x HV x chunks) for a grid with a fourth index p whose
  column block is p % ``blocks`` (p = the block itself, or sub-chunk x blocks + block): with
  ``split`` the spec takes that block, 1 / ``blocks`` of its last axis, else the whole axis
  (``blocks`` = 1: the spec as it is, the same for every p)."""
  width = spec.block_shape[-1]
  return pl.BlockSpec((*spec.block_shape[:-1], width // blocks if split else width),
                      lambda b, h, c, p: (*spec.index_map(b, h, c)[:-1],
                                          p % blocks if split else 0))


def _column_block_inputs(tokens, C, blocks: int, split: Callable = lambda i, x: x.shape[-1] > 1):
  """Block specs of the token inputs and the three packed-row masks (``_input_specs``) for a
  grid whose fourth index picks a column block (``_column_block``): token i by column block
  where ``split(i, x)`` (default: every token wider than one column), the rest whole."""
  specs = _input_specs(tokens, C)
  return ([_column_block(spec, blocks, split(i, x))
           for i, (spec, x) in enumerate(zip(specs, tokens))]
          + [_column_block(spec, blocks, False) for spec in specs[len(tokens):]])


def _key_wide(op):
  """``_column_block_inputs``' split for a grid over blocks of the key columns: the tokens K
  wide (q, k, g) by block; v, beta and the inverse norms whole."""
  return lambda i, x: i != op.value_index and x.shape[-1] > 1


def _sub_chunk_rows_spec(width, n: int, blocks: int, *, one_row: bool = False):
  """Output block of a [B, T, HV, width] array for a grid B x HV x chunks x (n x ``blocks``):
  program p writes sub-chunk p // ``blocks``'s rows of column block p % ``blocks``. With
  ``one_row``, of a [B, T/16, HV, width] array of one row a sub-chunk."""
  rows = None if one_row else _kernel_subchunk.SUB
  return pl.BlockSpec((None, rows, None, width // blocks),
                      lambda b, h, c, p: (b, c * n + p // blocks, h, p % blocks))


def _key_blocks(sizes) -> int:
  """Key blocks of the pair rows' grid: ``PAIR_KEY_BLOCKS``, each at least 16 columns wide."""
  return max(1, min(PAIR_KEY_BLOCKS, sizes.K // 16))


def _pair_rows(tokens, masks, *, keep_gated: bool, scale, normalized, sizes, interpret,
               precision):
  """The key blocks' partial sums of A_qk and of M = P_kk, each float32
  [key blocks, B, T, HV, C], grid B x HV x chunks x (C/16 x key blocks); each chunk's [16, 16]
  blocks above its diagonal are not written (``_kernel_subchunk.pair_rows``). With
  ``keep_gated`` (for the backward) the sub-chunks' gated operands (``_gated_shapes``) follow,
  which the pair rows have all they need for (docs/kernels.md, version 19)."""
  B, T, HV, K, _, C = sizes
  n, n_kb = C // _kernel_subchunk.SUB, _key_blocks(sizes)
  in_specs = _column_block_inputs(tokens, C, n_kb, _key_wide(KDA))
  row_block = pl.BlockSpec((None, None, _kernel_subchunk.SUB, None, C),
                           lambda b, h, c, p: (p % n_kb, b, c * n + p // n_kb, h, 0))
  out_specs = [row_block] * 2
  out_shapes = [jax.ShapeDtypeStruct((n_kb, B, T, HV, C), F32)] * 2
  if keep_gated:
    out_specs += [_sub_chunk_rows_spec(K, n, n_kb, one_row=name == "total")
                  for name in _kernel_subchunk.GATED]
    out_shapes += _gated_shapes(tokens, sizes)
  A_parts, M_parts, *gated = _triton_call(
      _pair_rows_kernel, (B, HV, T // C, n * n_kb), in_specs, out_specs, out_shapes, interpret,
      LAUNCH["pair_rows"], num_tokens=len(tokens), scale=scale, normalized=normalized,
      precision=precision, key_blocks=n_kb)(*tokens, *masks)
  return A_parts, M_parts, gated


def _inverse_blocks(A_parts, M_parts, beta, *, dtype, with_M: bool, sizes, interpret,
                    precision):
  """(A_qk, T = (I + A_kk)^-1 and, ``with_M`` (for the backward), M = P_kk), each
  [B, T, HV, C] in ``dtype``, from the pair rows' partial sums and beta [B, T, HV, 1]; grid
  B x HV x chunks."""
  outputs = 3 if with_M else 2
  parts = pl.BlockSpec((A_parts.shape[0], None, sizes.C, None, sizes.C),
                       lambda b, h, c: (0, b, c, h, 0))
  return _triton_call(
      _inverse_blocks_kernel, (sizes.B, sizes.HV, sizes.T // sizes.C),
      [parts, parts, _token_spec(sizes.C, 1)], [_token_spec(sizes.C, sizes.C)] * outputs,
      [jax.ShapeDtypeStruct(A_parts.shape[1:], dtype)] * outputs, interpret,
      LAUNCH["inverse_blocks"], precision=precision)(A_parts, M_parts, beta)


def _column_blocks(sizes, width: int) -> int:
  """Column blocks of a grid that splits the K and V columns alike (each program takes its K
  block and its V block): ``width`` wide where K and V allow."""
  return max(1, min(sizes.K, sizes.V) // width)


def _output_chunks(sizes, column_blocks: int) -> int:
  """Consecutive chunks a chunk-outputs program takes: ``OUTPUT_CHUNKS``, or the largest power of
  two below it that divides the chunks, halved while the grid would have fewer than
  ``OUTPUT_PROGRAMS`` programs (a small call keeps every multiprocessor busy)."""
  chunks = sizes.T // sizes.C
  P = math.gcd(OUTPUT_CHUNKS, chunks)
  while P > 1 and sizes.B * sizes.HV * column_blocks * chunks // P < OUTPUT_PROGRAMS:
    P //= 2
  return P


def _chunk_outputs(op, tokens, masks, T_inverse, *, scale, normalized, sizes, interpret,
                   precision):
  """W, U, Qg, Kg and decay (``_CHUNK_OUTPUTS``) stored as ``op.fields`` asks; grid
  B x HV x (chunks / P) x column blocks, each program P consecutive chunks (``_output_chunks``):
  every output is a column-wise function of its inputs and T, so each program takes
  1 / ``_column_blocks`` of the K and V columns."""
  n = _column_blocks(sizes, OUTPUT_COLUMNS)
  P = _output_chunks(sizes, n)
  rows = P * sizes.C
  in_specs = (_column_block_inputs(tokens, rows, n)  # beta, the inverse norms and masks whole
              + [_column_block(_token_spec(rows, sizes.C), n, False)])
  fields = [getattr(op.fields, name) for name in _CHUNK_OUTPUTS]
  decay = pl.BlockSpec((None, P, None, sizes.K), lambda b, h, c: (b, c, h, 0))
  out_specs = [_column_block(decay if f.width == "chunk" else
                             _token_spec(rows, getattr(sizes, f.width)), n, True) for f in fields]
  store = tokens[op.value_index].dtype
  return _triton_call(
      _chunk_outputs_kernel, (sizes.B, sizes.HV, sizes.T // rows, n), in_specs, out_specs,
      [jax.ShapeDtypeStruct(_layout(f.width, sizes)[0], store if f.dtype is None else f.dtype)
       for f in fields], interpret, LAUNCH["chunk_outputs"], num_tokens=len(tokens),
      scale=scale, normalized=normalized, precision=precision)(*tokens, *masks, T_inverse)


def _kda_intra_forward(op, tokens, masks, *, scale, normalized, for_backward, sizes, interpret,
                       precision):
  """KDA's chunk matrices (a ``ChunkMatrices`` of arrays) from three kernels: the pair rows
  (partial sums of A_qk and M = P_kk by key blocks), the block inverse (their sums, and T from
  M and beta) and the chunk outputs (W, U, Qg, Kg, decay from T); T [B, T, HV, C] passes
  through memory and, ``for_backward``, is saved with M and the pair rows' gated operands (both
  written only then) for the intra backward. A_qk, T and M are stored in v's dtype: the chunk
  outputs, the state kernels and the backward take A_qk and T only into products, whose
  operands on the GPU are v's dtype or (dA_kk = -T^T dT T^T) TF32, and M only into dbeta's
  sums, sum(dA_kk * M) over each row. U is stored in v's dtype too: it enters only
  V~ = U - W S in the state forward, and the backward reads the V~ kept there
  (docs/kernels.md, version 19)."""
  config = dict(sizes=sizes, interpret=interpret, precision=precision)
  reading = dict(scale=scale, normalized=normalized)
  A_parts, M_parts, gated = _pair_rows(tokens, masks, keep_gated=for_backward, **reading,
                                       **config)
  A, T_inverse, *M = _inverse_blocks(A_parts, M_parts, tokens[4],
                                     dtype=tokens[op.value_index].dtype, with_M=for_backward,
                                     **config)
  outputs = _chunk_outputs(op, tokens, masks, T_inverse, **reading, **config)
  return (op.math.ChunkMatrices(A=A, **dict(zip(_CHUNK_OUTPUTS, outputs))),
          (*M, T_inverse, *gated) if for_backward else ())


def _gradient_shapes(tokens, normalized):
  """The op's token gradients' shapes and dtypes, from the kernels' tokens
  (``_split_inverse_norms``): a normalised token's gradient float32 (the normalisation's
  backward follows, ``_normalize_backward``), each other's in its token's dtype."""
  return [jax.ShapeDtypeStruct(x.shape, F32 if i in normalized else x.dtype)
          for i, x in enumerate(_split_inverse_norms(tokens, normalized)[0])]


def _intra_backward(op, tokens, masks, cotangents, saved, *, scale, normalized, sizes, interpret,
                    precision):
  """The gradients of the op's token inputs (float32 for those in ``normalized``, of the
  normalised token) from the chunk matrices' cotangents (``saved``: empty, what
  ``_intra_forward`` saved)."""
  specs = _input_specs(tokens, sizes.C)
  shapes = _gradient_shapes(tokens, normalized)
  return _triton_call(
      _intra_backward_kernel, (sizes.B, sizes.HV, sizes.T // sizes.C),
      specs + [_layout(f.width, sizes)[1] for f in op.fields], specs[:len(shapes)], shapes,
      interpret, _launch(op, "intra_backward"), op=op, num_tokens=len(tokens), scale=scale,
      normalized=normalized, precision=precision)(*tokens, *masks, *cotangents)


_GRADIENT_ROWS = ("dq", "dk", "dG", "through_end")


def _kda_intra_backward(op, tokens, masks, cotangents, saved, *, scale, normalized, sizes,
                        interpret, precision):
  """KDA's token gradients from its chunk matrices' cotangents and the forward's saved P_kk, T
  and gated operands, by four kernels: dA_kk and dbeta's part through A_kk (grid B x HV x
  chunks), the rest of the cotangents through W and U (grid B x HV x chunks x column blocks:
  dv, dk's part through W, dbeta's parts, summed after), the gradient rows (grid B x HV x
  chunks x (C/16 x column blocks), ``_column_blocks`` of the K columns) and dg, the reverse
  cumulative sum of dG over each chunk (grid B x HV x chunks)."""
  B, T, HV, K, V, C = sizes
  M, T_inverse, *gated = saved
  inputs, square = _input_specs(tokens, C), _token_spec(C, C)
  params = dict(num_tokens=len(tokens), scale=scale, normalized=normalized, precision=precision)
  column_blocks = _column_blocks(sizes, WY_COLUMNS)
  dA_kk, dbeta_pairs = _triton_call(
      _wy_dA_kk_kernel, (B, HV, T // C),
      inputs + [square] * 2 + [_token_spec(C, K), _token_spec(C, V)],
      [square, _token_spec(C, 1)],
      [jax.ShapeDtypeStruct((B, T, HV, C), F32), jax.ShapeDtypeStruct((B, T, HV, 1), F32)],
      interpret, LAUNCH["wy_dA_kk"], column_blocks=column_blocks, **params)(
          *tokens, *masks, T_inverse, M, cotangents.W, cotangents.U)
  by_block = lambda spec: _column_block(spec, column_blocks, True)
  dv, dk_w, dbeta_columns = _triton_call(
      _wy_columns_kernel, (B, HV, T // C, column_blocks),
      _column_block_inputs(tokens, C, column_blocks)
      + [_column_block(square, column_blocks, False), by_block(_token_spec(C, K)),
         by_block(_token_spec(C, V))],
      [by_block(_token_spec(C, V)), by_block(_token_spec(C, K)),
       by_block(_token_spec(C, column_blocks))],
      [_gradient_shapes(tokens, normalized)[op.value_index],
       jax.ShapeDtypeStruct((B, T, HV, K), F32),
       jax.ShapeDtypeStruct((B, T, HV, column_blocks), F32)],
      interpret, LAUNCH["wy_columns"], **params)(
          *tokens, *masks, T_inverse, cotangents.W, cotangents.U)
  dbeta = dbeta_pairs + jnp.sum(dbeta_columns, axis=-1, keepdims=True)
  dq, dk, dG, through_end = _gradient_rows(
      op, tokens, masks, cotangents, dA_kk, dk_w, gated, scale=scale, normalized=normalized,
      sizes=sizes, interpret=interpret, precision=precision)
  g, beta = tokens[2], tokens[4]
  dg = _triton_call(
      _dg_kernel, (B, HV, T // C),
      [_token_spec(C, K), _token_spec(C // _kernel_subchunk.SUB, K)], _token_spec(C, K),
      jax.ShapeDtypeStruct(g.shape, g.dtype), interpret, LAUNCH["dg"])(dG, through_end)
  return dq, dk, dg, dv, dbeta.astype(beta.dtype)


def _dg_kernel(dG_ref, through_end_ref, out_ref):
  """A chunk's dg (``_kernel_subchunk.dg_from_rows``) from the gradient rows' dG [C, K] and
  through_end [C/16, K]: one pass, where XLA's reversed cumulative sum took 2.5x the bytes'
  time (docs/kernels.md, version 10)."""
  out_ref[...] = _kernel_subchunk.dg_from_rows(dG_ref[...], through_end_ref[...]).astype(
      out_ref.dtype)


def _normalize_backward_kernel(x_ref, inverse_ref, dy_ref, out_ref):
  """One chunk of one head of ``l2norm.normalize_backward``, in the token's dtype."""
  out_ref[...] = l2norm.normalize_backward(x_ref[...], inverse_ref[...], dy_ref[...]).astype(
      out_ref.dtype)


def _normalize_backward(x, inverse, dy, *, C, interpret):
  """The cotangent of a normalised token x [B, T, HV, K] (its dtype) from its inverse norms
  [B, T, HV, 1] and the normalised token's cotangent dy (float32), one pass over chunks of C
  rows (XLA's reduction and elementwise pass read dy twice)."""
  B, T, HV, K = x.shape
  return _triton_call(
      _normalize_backward_kernel, (B, HV, T // C),
      [_token_spec(C, K), _token_spec(C, 1), _token_spec(C, K)], _token_spec(C, K),
      jax.ShapeDtypeStruct(x.shape, x.dtype), interpret, LAUNCH["normalize_backward"])(
          x, inverse, dy)


def _gated_shapes(tokens, sizes):
  """``_kernel_subchunk.gated_operands``' arrays: [B, T, HV, K] in v's dtype (the products'
  operands: the same products as from float32), "total" [B, T/16, HV, K] float32."""
  B, T, HV, K, _, _ = sizes
  operand = jax.ShapeDtypeStruct((B, T, HV, K), tokens[KDA.value_index].dtype)
  total = jax.ShapeDtypeStruct((B, T // _kernel_subchunk.SUB, HV, K), F32)
  return [total if name == "total" else operand for name in _kernel_subchunk.GATED]


def _gated_specs(C, K, blocks: int):
  """Block specs of ``_gated_shapes``' arrays, C rows a block (a multiple of the sub-chunk), for
  a grid whose fourth index picks one of ``blocks`` blocks of the K columns
  (``_column_block``)."""
  S = _kernel_subchunk.SUB
  return [_column_block(_token_spec(C // S if name == "total" else C, K), blocks, True)
          for name in _kernel_subchunk.GATED]


def _gradient_rows(op, tokens, masks, cotangents, dA_kk, dk_w, gated, *, scale, normalized,
                   sizes, interpret, precision):
  """dq, dk, dG [B, T, HV, K] and through_end [B, T/16, HV, K], float32, from the token inputs,
  the chunk matrices' cotangents, dA_kk, dk's part through W and the sub-chunks' gated operands
  (``_gated_shapes``); grid B x HV x chunks x (C/16 x column blocks of the K columns)."""
  B, T, HV, K, V, C = sizes
  S = _kernel_subchunk.SUB
  n, n_cb = C // S, max(1, K // GRADIENT_COLUMNS)
  inputs = _column_block_inputs(tokens, C, n_cb, _key_wide(op))
  cotangent_specs = [_column_block(_layout(f.width, sizes)[1], n_cb, f.width in ("K", "chunk"))
                     for f in op.fields]
  square = _column_block(_token_spec(C, C), n_cb, False)
  rows = lambda width: _sub_chunk_rows_spec(width, n, n_cb)
  out_specs = [rows(K), rows(K), rows(K), _sub_chunk_rows_spec(K, n, n_cb, one_row=True)]
  dq, dk = _gradient_shapes(tokens, normalized)[:2]
  out_shapes = [dq, dk, jax.ShapeDtypeStruct((B, T, HV, K), F32),
                jax.ShapeDtypeStruct((B, T // S, HV, K), F32)]
  return _triton_call(
      _gradient_rows_kernel, (B, HV, T // C, n * n_cb),
      inputs + cotangent_specs + [square, _column_block(_token_spec(C, K), n_cb, True)]
      + _gated_specs(C, K, n_cb),
      out_specs, out_shapes, interpret, LAUNCH["gradient_rows"], num_tokens=len(tokens),
      scale=scale, normalized=normalized, precision=precision, column_blocks=n_cb)(
          *tokens, *masks, *cotangents, dA_kk, dk_w, *gated)


def _value_block(V, kernel: str, label: str = ""):
  """Value channels per program (or loop step) of the state kernel ``kernel`` (for the
  cotangents, of the group ``label``, "[<fields>]", where it has an entry of its own)."""
  return min(V, VALUE_BLOCK.get(kernel + label, VALUE_BLOCK[kernel]))


def _state_forward(op, matrices, h0, out_dtype, *, keep_states, sizes, interpret, precision):
  """(o [B, T, HV, V] in ``out_dtype``, the final state [B, HV, K, V] float32 and, with
  ``keep_states``, the state before each chunk [B, T/C, HV, K, V] and each chunk's shared
  values [B, T, HV, V] (``math.state_forward``'s third), both in ``out_dtype``, v's: the walk
  carries them in float32, and every use in the backward but the decay's cotangent rounds them
  to the products' operand dtype anyway, as fla keeps its h and v_new; docs/kernels.md,
  versions 11 and 18)."""
  B, T, HV, K, V, C = sizes
  BV = _value_block(V, "state_forward")
  shapes = [jax.ShapeDtypeStruct((B, T, HV, V), out_dtype),
            jax.ShapeDtypeStruct((B, HV, K, V), F32)]
  if keep_states:
    shapes += [jax.ShapeDtypeStruct((B, T // C, HV, K, V), out_dtype),
               jax.ShapeDtypeStruct((B, T, HV, V), out_dtype)]
  whole = pl.no_block_spec
  return _triton_call(_state_forward_kernel, (B, HV, V // BV), [whole] * (len(matrices) + 1),
                      [whole] * len(shapes), shapes, interpret, _launch(op, "state_forward"), op=op,
                      sizes=sizes, BV=BV, precision=precision, keep_states=keep_states)(
                          *matrices, h0)


def _tile(width, sizes: Sizes):
  """One chunk's tile of a chunk matrix of ``width`` other than "V", as the chunk math has it."""
  return {"K": (sizes.C, sizes.K), "C": (sizes.C, sizes.C), "chunk": (1, sizes.K)}[width]


def _cotangent_groups(op, sizes) -> list[tuple[str, ...]]:
  """The fields whose cotangents the state backward writes, in groups of one kernel call each.

  With one value block (V <= 64) one call writes them all. Otherwise each program sums its
  chunk's [C, K], [C, C] and [1, K] cotangents over the value blocks in a loop, and all of them
  at once would not fit its registers (KDA at K = V = 128, 8 warps: 912 bytes of spills a
  thread), so the fields are taken in order, a new group started where the sums would pass
  ``COTANGENT_SUMS`` floats; each call loads only what its fields read (KDA's first group S,
  dV~ and dO; its second dS, V~, dO and S for the decay)."""
  names = [n for n, f in zip(op.fields._fields, op.fields) if f.cotangent_is is None]
  if sizes.V <= _value_block(sizes.V, "state_cotangents"):
    return [tuple(names)]
  groups, floats = [[]], 0
  for name in names:
    width = getattr(op.fields, name).width
    size = 0 if width == "V" else math.prod(_tile(width, sizes))
    if groups[-1] and floats + size > COTANGENT_SUMS:
      groups.append([])
      floats = 0
    groups[-1].append(name)
    floats += size
  return [tuple(g) for g in groups]


def _cotangent_dtype(field: Field, dO):
  return field.cotangent_dtype or dO.dtype


def _state_backward(op, matrices, states, shared, dO, dfinal, *, sizes, interpret, precision):
  """The cotangents of the chunk matrices (a ``ChunkMatrices``) and dh0, by two kernels: the
  reverse walk (grid B x HV x V/BV) gives dh0, the dS after every chunk ([B, T/C, HV, K, V]
  in the dtype the states are stored in) and the shared values' cotangent d_shared, then every
  chunk's cotangents at once (grid B x HV x chunks, the value blocks a loop in each program)
  from S, dS, the shared values and d_shared, as fla's backward does with its h, dh, v_new and
  dv, so that the walk carries only what dS needs."""
  B, T, HV, K, V, C = sizes
  BV = _value_block(V, "state_walk_backward")
  whole = pl.no_block_spec
  params = dict(op=op, sizes=sizes, precision=precision)
  (d_shared_field,) = [f for f in op.fields if f.cotangent_is == "d_shared"]
  dstates, dh0, d_shared = _triton_call(
      _state_walk_backward_kernel, (B, HV, V // BV), [whole] * (len(matrices) + 2), [whole] * 3,
      [jax.ShapeDtypeStruct(states.shape, states.dtype),
       jax.ShapeDtypeStruct((B, HV, K, V), F32),
       jax.ShapeDtypeStruct(dO.shape, _cotangent_dtype(d_shared_field, dO))],
      interpret, _launch(op, "state_backward"), BV=BV, **params)(*matrices, dO, dfinal)

  cotangents = {}
  for names in _cotangent_groups(op, sizes):
    fields = [getattr(op.fields, name) for name in names]
    shapes = [jax.ShapeDtypeStruct(_layout(f.width, sizes)[0], _cotangent_dtype(f, dO))
              for f in fields]
    label = f"[{','.join(names)}]"
    cotangents.update(zip(names, _triton_call(
        _state_cotangents_kernel, (B, HV, T // C), [whole] * (len(matrices) + 5),
        [whole] * len(shapes), shapes, interpret, _launch(op, "state_cotangents"), names=names,
        label=label, BV=_value_block(V, "state_cotangents", label), **params)(
            *matrices, states, dstates, shared, d_shared, dO)))
  cotangents.update(dO=dO, d_shared=d_shared)
  return op.math.ChunkMatrices(*(cotangents[f.cotangent_is or name]
                                 for name, f in zip(op.fields._fields, op.fields))), dh0


def _with_inverse_norms(tokens, normalized):
  """The kernels' token inputs: the op's, then the inverse L2 norm [B, T, HV, 1] float32 of
  each whose index is in ``normalized`` (the kernels normalise those as they load them)."""
  return tuple(tokens) + tuple(l2norm.inverse_norm(tokens[i]) for i in normalized)


def _forward(op, scale, normalized, C, interpret, tokens, masks, h0, *, keep_states):
  tokens = _with_inverse_norms(tokens, normalized)
  config = _config(op, tokens, h0, C, interpret)
  matrices, saved = (op.intra_forward or _intra_forward)(
      op, tokens, masks, scale=scale, normalized=normalized, for_backward=keep_states, **config)
  o, final, *kept = _state_forward(op, matrices, h0, tokens[op.value_index].dtype,
                                   keep_states=keep_states, **config)
  return o, final, (tokens, matrices, saved, tuple(kept))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _walk(op, scale, normalized, C, interpret, tokens, masks, h0):
  o, final, _ = _forward(op, scale, normalized, C, interpret, tokens, masks, h0,
                         keep_states=False)
  return o, final


def _walk_fwd(op, scale, normalized, C, interpret, tokens, masks, h0):
  o, final, residuals = _forward(op, scale, normalized, C, interpret, tokens, masks, h0,
                                 keep_states=True)
  return (o, final), (masks, *residuals)


def _walk_bwd(op, scale, normalized, C, interpret, residuals, cotangents):
  masks, tokens, matrices, saved, (states, shared) = residuals
  dO, dfinal = cotangents
  config = _config(op, tokens, dfinal, C, interpret)
  matrix_cotangents, dh0 = _state_backward(op, matrices, states, shared, dO, dfinal, **config)
  grads = list((op.intra_backward or _intra_backward)(
      op, tokens, masks, matrix_cotangents, saved, scale=scale, normalized=normalized, **config))
  for i, inverse in zip(normalized, _split_inverse_norms(tokens, normalized)[1]):
    grads[i] = _normalize_backward(tokens[i], inverse, grads[i], C=C,
                                   interpret=config["interpret"])
  return tuple(grads), (None,) * len(masks), dh0


_walk.defvjp(_walk_fwd, _walk_bwd)


def _kernel_inputs(tokens, initial_state, segment_index, chunk_size, interpret):
  """The padded token inputs, the packed-row masks (segment, carried, last) and h0: time padded
  to whole chunks, every width and h0's K and V to powers of two (zeros leave the state
  unchanged)."""
  if reason := unsupported(chunk_size, initial_state.shape[-2], interpret):
    raise ValueError(reason)
  B, T = tokens[0].shape[:2]
  Tp = -(-T // chunk_size) * chunk_size
  pad = lambda x: jnp.pad(x, [(0, 0), (0, Tp - T), (0, 0),
                              (0, next_power_of_2(x.shape[-1]) - x.shape[-1])])
  K, V = initial_state.shape[-2:]
  h0 = jnp.pad(initial_state, [(0, 0), (0, 0), (0, next_power_of_2(K) - K),
                               (0, next_power_of_2(V) - V)])
  masks = chunk_math.packed_row_masks(segment_index, B, T, chunk_size)
  return tuple(map(pad, tokens)), masks, h0


def walk(op: TritonOp, tokens, initial_state, segment_index, *, scale: float, chunk_size: int,
         interpret: bool | None, normalized: tuple[int, ...] = ()):
  """One op's chunkwise forward (and, through a ``custom_vjp``, backward) as the four stages.

  Args:
    op: the op's ``TritonOp``.
    tokens: the token inputs in the op's order, each [B, T, HV, width] (width 1 for a
      per-token scalar such as beta).
    initial_state: [B, HV, K, V] float32.
    segment_index: None, or [B, T] non-decreasing int32.
    scale, chunk_size, interpret: as ``scan``'s.
    normalized: the indices of the tokens that the op L2-normalises over their last axis
      (``ops.kda.l2norm``): the kernels read them as they are and multiply in their inverse
      norms, computed once per token.

  Returns:
    o [B, T, HV, V] in v's dtype and the final state [B, HV, K, V] float32.
  """
  interpret = default_interpret() if interpret is None else interpret
  padded, masks, h0 = _kernel_inputs(tokens, initial_state, segment_index, chunk_size,
                                     interpret)
  o, final = _walk(op, float(scale), tuple(normalized), chunk_size, interpret, padded, masks, h0)
  T, (K, V) = tokens[0].shape[1], initial_state.shape[-2:]
  return o[:, :T, :, :V], final[:, :, :K, :V]


def walk_stages(op: TritonOp, tokens, initial_state, *, scale: float, chunk_size: int,
                interpret: bool | None, normalized: tuple[int, ...] = ()):
  """The four stages of one forward and backward as separate jitted calls, for timing each,
  and, after a stage of several kernels, each of its kernels alone.

  Takes ``walk``'s arguments (no packing) and returns ``[(name, function, args)]`` in the order
  they run: intra_forward, state_forward, state_backward, intra_backward, each followed by
  "<stage>.<kernel>" rows when the stage runs more than one kernel (KDA's intra stages: pair
  rows, block inverse, chunk outputs; dT rows, dA_kk, gradient rows). Every call's arguments
  are the real outputs of what runs before it (the output cotangent is o itself, nonzero data).
  """
  interpret = default_interpret() if interpret is None else interpret
  tokens, masks, h0 = _kernel_inputs(tokens, initial_state, None, chunk_size, interpret)
  tokens = _with_inverse_norms(tokens, normalized)
  config = _config(op, tokens, h0, chunk_size, interpret)
  out_dtype = tokens[op.value_index].dtype
  reading = dict(scale=scale, normalized=normalized)
  stage_functions = {
      "intra_forward": lambda x, m: (op.intra_forward or _intra_forward)(
          op, x, m, **reading, for_backward=True, **config),
      "state_forward": lambda m, h: _state_forward(op, m, h, out_dtype, keep_states=True,
                                                   **config),
      "state_backward": lambda m, s, x, dO, df: _state_backward(op, m, s, x, dO, df,
                                                                **config),
      "intra_backward": lambda x, m, d, saved: (op.intra_backward or _intra_backward)(
          op, x, m, d, saved, **reading, **config)}
  rows = []

  def run(name, *args):  # eagerly, so each kernel's arguments are real arrays
    with _recording_kernel_calls() as kernels:
      out = stage_functions[name](*args)
    rows.append((name, jax.jit(stage_functions[name]), args))
    if len(kernels) > 1:
      rows.extend((f"{name}.{kernel}", call, kernel_args) for kernel, call, kernel_args in kernels)
    return out

  matrices, saved = run("intra_forward", tokens, masks)
  o, final, states, shared = run("state_forward", matrices, h0)
  matrix_cotangents, _ = run("state_backward", matrices, states, shared, o, final)
  run("intra_backward", tokens, masks, matrix_cotangents, saved)
  return rows


# ------------------------------------------------------------------------------------------ KDA

KDA = TritonOp(name="kda", primitives=primitives, math=chunk_math, value_index=3,
               fields=chunk_math.ChunkMatrices(W=Field("K", cotangent_dtype=None),
                                               U=Field("V", cotangent_is="d_shared",
                                                       cotangent_dtype=None),
                                               Qg=Field("K"),
                                               Kg=Field("K"), A=Field("C"),
                                               decay=Field("chunk", F32)),
               sub_chunks=_kernel_subchunk, intra_forward=_kda_intra_forward,
               intra_backward=_kda_intra_backward)


def scan(q, k, v, g, beta, initial_state, segment_index, *, scale: float, chunk_size: int = 64,
         l2_normalize_qk: bool = False, interpret: bool | None = None):
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
    l2_normalize_qk: L2-normalise q and k over K first (``ops.kda.l2norm``), in the kernels:
      they read q and k in their own dtype and multiply in each token's float32 inverse norm,
      so the normalised values are float32 without a float32 copy in memory.
    interpret: run the kernels in Pallas interpret mode; None: unless the backend is a GPU.

  Returns:
    o [B, T, HV, V] in v's dtype and the final state [B, HV, K, V] float32.
  """
  return walk(KDA, (q, k, g, v, beta[..., None]), initial_state, segment_index, scale=scale,
              chunk_size=chunk_size, interpret=interpret,
              normalized=(0, 1) if l2_normalize_qk else ())


def stages(q, k, v, g, beta, initial_state, *, scale: float, chunk_size: int = 64,
           l2_normalize_qk: bool = False, interpret: bool | None = None):
  """KDA's four stages as separate jitted calls, each of the intra stages' kernels too
  (``walk_stages``): takes ``scan``'s arguments (no packing), returns
  ``[(name, function, args)]``."""
  return walk_stages(KDA, (q, k, g, v, beta[..., None]), initial_state, scale=scale,
                     chunk_size=chunk_size, interpret=interpret,
                     normalized=(0, 1) if l2_normalize_qk else ())
