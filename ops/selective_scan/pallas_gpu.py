"""Fused selective scan (SPEC 1.2) as Pallas GPU kernels on the Triton backend (``"pallas_gpu"``).

One forward kernel does the whole op: the discretisation (``delta_bias``, softplus), the scan,
the C readout, the D skip and the SiLU(z) gate. Each program owns one batch row, a block of
``block_d`` channels and one of ``segments`` equal stretches of time (``default_forward_launch``:
64 channels, one a thread of two warps, or where the segments stay long 128 channels, two a
thread of two warps), keeps its state in float32 registers as ``state`` rows [block_d] (each
thread holds every state entry of its channels, so nothing crosses lanes) and walks its stretch
in order: an outer ``fori_loop`` over chunks of ``chunk`` tokens and, inside it, a Python loop
unrolled over the chunk's tokens. Each chunk's u, delta and z, and B and C of its first
``PREFETCH_STATE_TOKENS`` tokens, are loaded while the chunk before it is computed
(``_prefetching_chunk_loop``); bf16 B and C come as pairs in 32-bit words (``_bf16_pairs``).
The state leaves the chip only as the final state and, when a gradient is wanted, as the state
entering each chunk (``time / chunk`` states per row, the residual).

Segments: the state is linear in the state before a stretch, h_end = carry * h_start + end with
carry = exp(A * sum dt) (zero across a restart) and ``end`` the stretch walked from a zero
state. A first kernel walks every segment but the last from zero for (end, carry), without
readout or outputs; each program of the forward kernel then chains those of the segments before
its own into its entering state (at most ``segments - 1`` steps of h * carry + end) and walks
its segment, all segments at once. That costs
a second pass over most tokens but multiplies the programs in flight by ``segments``
(``default_segments``: to ``FORWARD_PROGRAMS``), where one program per row and channel block
leaves most of the chip idle (B2 D2048: 64 programs).

The backward kernel (``jax.custom_vjp``) has a grid of (batch row, channel block) and walks the
chunks in reverse: it recomputes a chunk's states from the saved entering state (each token's
state a separate value, so no scratch memory and no dynamic register indexing), then runs the
adjoint recurrence ``g_{t-1} = keep_t exp(delta_t A) g_t`` backwards through the chunk. Its
state is a [block_d, state] array (``km.GPU_LAYOUT``): its dB and dC sum over channels each
token, which rows would turn into a cross-lane sum per state entry. Per-token gradients (u,
delta, z) are written directly; dB and dC per token are written per channel block and summed by
XLA; dA, dD and d(delta_bias) accumulate in registers over the whole sequence and are written
once per program (summed over the batch by XLA); d(initial_state) is the last adjoint.

Why Triton and not Mosaic GPU: the work is a latency-bound sequential loop over small per-token
vectors with a register-resident state; there is no matrix product for wgmma and no large tile
for TMA to stream, which is what Mosaic GPU's warpgroup programming model is built around.
Triton lays out the backward's [block_d, state] arrays and their reductions by itself. Where it
needs telling: a chunk's outputs are stored after its last load (the compiler cannot move a load
past a store that may alias); the decay is ``exp2`` of dt times A log2(e) (``km.decay_rate``),
one special-function instruction where ``exp`` is a libdevice call of about ten; softplus has
no branch (``km.softplus``), where libdevice's ``log1pf`` split every token into basic blocks
that ptxas did not move loads across; the activations' ``exp`` and ``1 / x`` are single
special-function instructions (``_arith``), where jnp's are libdevice's ``expf`` and a
range-checked division; and the state update, readout and softplus series are fused
multiply-adds written as PTX (``ops._triton_math.fma``), since XLA's Triton compiles without
contraction.

Cost per token and channel, with state size n (forward): n ``exp2`` (the decay), about 5n FLOPs
(decay product, state update, readout) and a few more for the gate; memory traffic is u, delta,
z and out (2 bytes each in bfloat16) per channel plus B and C (n values each) per group. At
n = 16 that is 16 ``exp2`` and ~80 FLOPs per 8 bytes, so with enough programs in flight the
special-function rate would bound it before HBM bandwidth; in practice the instructions around
it (each thread loads B and C as broadcast scalars shared by its channels, 2n a token, or n
words of bf16 pairs) and the latency of the loads bound it. Measured on an H200 (jax 0.11.2,
D2048 N16, bfloat16, with D, z, delta_bias and softplus; back-to-back calls): forward 0.36 ms
at B2 L4096 and 2.25 ms at B8 L8192 (``"xla"``: 3.80 and 25.9 ms); docs/kernels.md has the
versions.

Padding: time is padded to a multiple of ``chunk * segments`` (padded tokens get a zero step, so
they leave the state unchanged) and the state size to a power of two (A, B, C padded with zeros,
so padded state entries stay zero). ``block_d`` is a power of two dividing ``channels /
groups``, so one channel block reads one group's B and C.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from ops import _triton_math
from ops.selective_scan import _kernel_math as km

# Defaults from H200 sweeps at B2 L4096 and B8 L8192, D2048 N16, bfloat16 (docs/kernels.md,
# "selective scan", versions 4-6); num_stages (1 or 2) made no difference and is left to Triton.
# The forward's launches, widest first, as (the most channels per program, channels per
# thread); default_forward_launch takes the first whose segments keep WIDE_SEGMENT_TOKENS
# tokens. At B8, two channels a thread on two warps in 16 segments (2.22 ms; four a thread on
# one warp in 8 segments 3.28: 255 registers, 8 warps a multiprocessor); at B2 the segments would
# be short, and one channel a thread on two warps in 32 segments was fastest (0.34 ms).
FORWARD_LAUNCHES = ((128, 2), (64, 1))
WIDE_SEGMENT_TOKENS = 512
FORWARD_PROGRAMS = 2048  # the forward's segments fill the grid to this many programs ...
MIN_SEGMENT_TOKENS = 128  # ... but leave each segment at least this many tokens
# The backward: (the most channels per program, the programs wanted in the grid); it was
# fastest with about 512 programs (8 channels at B2, 32 at B8), but not below MIN_BLOCK_D.
BACKWARD_BLOCK_D_RULE = (32, 512)
MIN_BLOCK_D = 4
CHUNK = 8  # tokens per unrolled step of the time loop, and per saved state
# B and C of this many of a chunk's first tokens are loaded a chunk ahead, with its u, delta, z
# (B2 0.44 -> 0.38 ms; all eight: 0.37, at more registers).
PREFETCH_STATE_TOKENS = 2
NUM_WARPS_BACKWARD = 2

_F32 = km.F32
_LAYOUT = km.GPU_LAYOUT  # the backward's state [block_d, state]; token values 1-D


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static settings of one call (hashable: the custom_vjp's non-differentiable argument)."""

  time: int  # tokens before padding; later tokens are padding
  chunk: int
  segments: int  # stretches of time the forward walks in parallel (SPEC 1.2's state is linear)
  block_d: int  # channels per program of the forward kernel
  blocks_per_group: int  # channel blocks per group of B and C
  backward_block_d: int  # channels per program of the backward kernel
  delta_softplus: bool
  prefetch_state_tokens: int  # of each chunk, whose B and C load with its u, delta, z
  num_warps_forward: int
  num_warps_backward: int
  interpret: bool


_STREAMED = ("u", "delta", "z")  # a token's per-channel inputs, read once from HBM


def _load_streamed(ins: dict, t, state_vectors: bool = False) -> dict:
  """Token ``t``'s per-channel inputs (those of ``_STREAMED`` present) as stored, [block_d];
  with ``state_vectors`` also its B and C as stored (``_stored_entries``)."""
  loaded = {name: ins[name][t] for name in _STREAMED if name in ins}
  if state_vectors:
    loaded.update({name: _stored_entries(ins[name], t) for name in ("B", "C") if name in ins})
  return loaded


def _load_token(ins: dict, t, bias, cfg: _Config, offset=0, rows: bool = False,
                streamed: dict | None = None) -> km.Token:
  """Token ``t`` (a traced int32 scalar) of this program's row, channel block and time block,
  which starts at token ``offset`` of the (padded) sequence; ``streamed``: its per-channel
  inputs, loaded already (``_load_streamed``). B and C are [state] vectors, or with ``rows``
  tuples of state scalars (``_widened``; C None when not an input)."""
  if streamed is None:
    streamed = _load_streamed(ins, t)
  raw = streamed["delta"].astype(_F32)
  if bias is not None:
    raw = raw + bias
  if rows:
    vector = lambda name: _widened(streamed[name] if name in streamed
                                   else _stored_entries(ins[name], t))
  else:
    vector = lambda name: ins[name][t].astype(_F32)
  return km.Token(
      u=streamed["u"].astype(_F32), raw=raw,
      dt=km.step_size(raw, cfg.delta_softplus, _valid(offset + t, cfg), _arith(cfg.interpret)),
      B=vector("B"),
      C=vector("C") if "C" in ins else None,
      z=streamed["z"].astype(_F32) if "z" in ins else None,
      keep=ins["keep"][t] if "keep" in ins else None)


def _valid(t, cfg: _Config):
  """1.0 for a real token and 0.0 for a padding one; None when time needs no padding."""
  return (t < cfg.time).astype(_F32) if cfg.time % (cfg.chunk * cfg.segments) else None


def _arith(interpret: bool) -> km.Arith:
  """The per-token math's primitives as PTX instructions (``ops._triton_math``); in the
  interpreter, which cannot run PTX, ``km.EXACT``'s fused multiply-add and reciprocal."""
  if interpret:
    return km.EXACT._replace(exp=_triton_math.exp)
  return km.Arith(fma=_triton_math.fma, exp=_triton_math.exp,
                  reciprocal=_triton_math.reciprocal)


def _stored_entries(ref, t) -> tuple:
  """Token ``t``'s B or C scalars as stored: from a [time, state] ref its entries, from a
  [time, state / 2] uint32 ref of bf16 pairs (``_bf16_pairs``) its words, two entries a load."""
  return tuple(ref[t, m] for m in range(ref.shape[-1]))


def _widened(stored: tuple) -> tuple:
  """``_stored_entries``' scalars as float32 entries; a word of bf16 pairs gives two, each by a
  shift or a mask (a bf16 is a float32's upper half)."""
  if stored[0].dtype != jnp.uint32:
    return tuple(x.astype(_F32) for x in stored)
  entries = []
  for word in stored:
    entries += [jax.lax.bitcast_convert_type(jax.lax.shift_left(word, jnp.uint32(16)), _F32),
                jax.lax.bitcast_convert_type(word & jnp.uint32(0xFFFF0000), _F32)]
  return tuple(entries)


def _bf16_pairs(x):
  """A bf16 [..., state] array as uint32 [..., state / 2], entry 2m the low half of word m, so
  that the forward kernels load B and C two entries a load; other dtypes (and odd sizes) as
  they are."""
  if x is None or x.dtype != jnp.bfloat16 or x.shape[-1] % 2:
    return x
  return jax.lax.bitcast_convert_type(x.reshape(*x.shape[:-1], -1, 2), jnp.uint32)


def _optional(ins: dict, name: str):
  """A whole [block_d] parameter block as float32, or None when the input is absent."""
  return ins[name][...].astype(_F32) if name in ins else None


# --- the forward: the state as rows ---------------------------------------------------------------
# The forward kernels hold the state as a tuple of ``state`` rows [block_d] (rows of a
# [state, block_d] block), the channels spread over the lanes (one to four a thread): each
# thread owns every state entry of its channels, so the readout's sum over the state and every
# per-channel value (dt, u, z, out) stay in the thread, with no layout conversion through shared
# memory per token. (A [state, block_d] array would be laid out by Triton as [4, 8] lanes of
# [1, 4] values, its reductions and broadcasts crossing lanes.) B and C come as state scalars,
# each a broadcast load shared by the thread's channels. The arithmetic is km.advance's and
# km.readout's, with fused multiply-adds.

def _advance_rows(h, tok: km.Token, rate, arith: km.Arith):
  """km.advance on rows: the state rows after the token from those before it."""
  if tok.keep is not None:
    h = tuple(row * tok.keep for row in h)
  x = tok.dt * tok.u
  return tuple(arith.fma(jnp.exp2(tok.dt * r), row, x * b) for row, r, b in zip(h, rate, tok.B))


def _readout_rows(h, tok: km.Token, D, arith: km.Arith):
  """km.readout on rows: C h + D u, [block_d]."""
  terms = zip(h, tok.C)
  if D is None:
    row, c = next(terms)
    y = row * c
  else:
    y = D * tok.u
  for row, c in terms:
    y = arith.fma(row, c, y)
  return y


def _rows(ref):
  """A [state, block_d] block (or ref) as a tuple of float32 rows."""
  return tuple(ref[n].astype(_F32) for n in range(ref.shape[0]))


def _store_rows(ref, rows, *index) -> None:
  """Stores the rows at ``ref[*index, n]``."""
  for n, row in enumerate(rows):
    ref[(*index, n)] = row


def _store_columns(ref, rows, *index) -> None:
  """Stores the rows as the columns of a [block_d, state] block at ``ref[*index]``."""
  for n, row in enumerate(rows):
    ref[(*index, slice(None), n)] = row


def _prefetching_chunk_loop(ins: dict, cfg: _Config, body, init):
  """``fori_loop`` over this program's chunks, ``body(c, carry, streamed) -> carry``, with
  ``streamed[i]`` the streamed inputs of the chunk's token i (and B and C of its first
  ``cfg.prefetch_state_tokens``), loaded while the previous chunk was computed. Without it the
  compiler issued each token's loads just before their use, and every token waited a round
  trip to memory (H200 profiles: 37% of the stall samples sat on the conversion right after the
  u, delta, z loads; with those loaded ahead, 44% of the forward's cycles between instructions
  still waited on memory, the B and C loads, which the compiler does not move across the loop's
  back edge)."""
  n_chunks = ins["u"].shape[0] // cfg.chunk
  load = lambda c: tuple(_load_streamed(ins, c * cfg.chunk + i, i < cfg.prefetch_state_tokens)
                         for i in range(cfg.chunk))

  def step(c, carry_and_streamed):
    carry, streamed = carry_and_streamed
    upcoming = load(jnp.minimum(c + 1, n_chunks - 1))
    return body(c, carry, streamed), upcoming

  return jax.lax.fori_loop(0, n_chunks, step, (init, load(0)))[0]


def _segment_end_kernel(*refs, in_names, out_names, cfg: _Config):
  """One (batch row, channel block, segment): the state at the segment's end from a zero state
  at its start, and the factor [state, block_d] that carries a state across the segment,
  exp(A * sum of dt) times the product of ``keep``."""
  ins = dict(zip(in_names, refs))
  outs = dict(zip(out_names, refs[len(in_names):]))
  rate = _rows(ins["rate"])
  bias = _optional(ins, "delta_bias")
  offset = pl.program_id(2) * ins["u"].shape[0]
  arith = _arith(cfg.interpret)

  def chunk_body(c, carry, streamed):
    h, dt_sum, kept = carry
    for i in range(cfg.chunk):
      tok = _load_token(ins, c * cfg.chunk + i, bias, cfg, offset, rows=True,
                        streamed=streamed[i])
      h = _advance_rows(h, tok, rate, arith)
      dt_sum = dt_sum + tok.dt
      if tok.keep is not None:
        kept = kept * tok.keep
    return h, dt_sum, kept

  zeros = jnp.zeros(rate[0].shape, _F32)
  h, dt_sum, kept = _prefetching_chunk_loop(
      ins, cfg, chunk_body, ((zeros,) * len(rate), zeros, jnp.ones((), _F32)))
  _store_rows(outs["end"], h)
  _store_rows(outs["carry"], tuple(jnp.exp2(dt_sum * r) * kept for r in rate))


def _entering_state(ins: dict, cfg: _Config, rate):
  """The state rows entering this program's segment: ``h0`` (zeros when absent), carried across
  each earlier segment as h * carry + end (the first pass's results)."""
  h = _rows(ins["h0"]) if "h0" in ins else (jnp.zeros(rate[0].shape, _F32),) * len(rate)
  if "ends" not in ins:
    return h

  fma = _arith(cfg.interpret).fma

  def enter_next(i, h):
    return tuple(fma(row, ins["carries"][i, n], ins["ends"][i, n]) for n, row in enumerate(h))
  return jax.lax.fori_loop(0, pl.program_id(2), enter_next, h)


def _forward_kernel(*refs, in_names, out_names, cfg: _Config):
  """One (batch row, channel block, segment): out per token, the state at the segment's end,
  optionally the state entering each chunk."""
  ins = dict(zip(in_names, refs))
  outs = dict(zip(out_names, refs[len(in_names):]))
  rate = _rows(ins["rate"])
  D, bias = _optional(ins, "D"), _optional(ins, "delta_bias")
  offset = pl.program_id(2) * ins["u"].shape[0]
  arith = _arith(cfg.interpret)

  def chunk_body(c, h, streamed):
    if "chunk_states" in outs:
      _store_columns(outs["chunk_states"], h, c)
    # The chunk's outputs are stored after its last load: the compiler cannot move a load past
    # a store to a ref it might alias.
    out = []
    for i in range(cfg.chunk):
      tok = _load_token(ins, c * cfg.chunk + i, bias, cfg, offset, rows=True,
                        streamed=streamed[i])
      h = _advance_rows(h, tok, rate, arith)
      out.append(km.gate(_readout_rows(h, tok, D, arith), tok, arith))
    for i, y in enumerate(out):
      outs["out"][c * cfg.chunk + i] = y.astype(outs["out"].dtype)
    return h

  _store_rows(outs["final_state"],
              _prefetching_chunk_loop(ins, cfg, chunk_body, _entering_state(ins, cfg, rate)))


def _backward_kernel(*refs, in_names, out_names, cfg: _Config):
  """One (batch row, channel block): the adjoint recurrence over the chunks in reverse."""
  ins = dict(zip(in_names, refs))
  outs = dict(zip(out_names, refs[len(in_names):]))
  A = ins["A"][...]
  rate = km.decay_rate(A)
  D, bias = _optional(ins, "D"), _optional(ins, "delta_bias")
  block_d = A.shape[0]
  arith = _arith(cfg.interpret)

  def chunk_body(k, carry):
    g, dA_acc, dD_acc, dbias_acc = carry
    c = ins["u"].shape[0] // cfg.chunk - 1 - k
    t0 = c * cfg.chunk
    toks = [_load_token(ins, t0 + i, bias, cfg) for i in range(cfg.chunk)]
    douts = [ins["dout"][t0 + i].astype(_F32) for i in range(cfg.chunk)]  # loads before stores
    states = [ins["chunk_states"][c]]  # states[i]: before token i; states[i + 1]: after it
    decays = []
    for tok in toks:
      h, decay = km.advance(states[-1], tok, rate, _LAYOUT)
      states.append(h)
      decays.append(decay)
    for i in reversed(range(cfg.chunk)):
      t = t0 + i
      g, d = km.adjoint(g, toks[i], states[i + 1], states[i], decays[i], douts[i], A, D,
                        _LAYOUT, cfg.delta_softplus, _valid(t, cfg), arith)
      if d.dz is not None:
        outs["dz"][t] = d.dz.astype(outs["dz"].dtype)
      outs["dC"][t] = d.dC
      outs["dB"][t] = d.dB
      outs["ddelta"][t] = d.draw.astype(outs["ddelta"].dtype)
      outs["du"][t] = d.du.astype(outs["du"].dtype)
      dA_acc = dA_acc + d.dA
      if d.dD is not None:
        dD_acc = dD_acc + d.dD
      dbias_acc = dbias_acc + d.draw
    return g, dA_acc, dD_acc, dbias_acc

  zeros = jnp.zeros((block_d,), _F32)
  init = (ins["dfinal"][...], jnp.zeros(A.shape, _F32), zeros, zeros)
  n_chunks = ins["u"].shape[0] // cfg.chunk
  g, dA_acc, dD_acc, dbias_acc = jax.lax.fori_loop(0, n_chunks, chunk_body, init)
  outs["dA"][...] = dA_acc
  outs["dh0"][...] = g
  for name, acc in (("dD", dD_acc), ("ddelta_bias", dbias_acc)):
    if name in outs:
      outs[name][...] = acc


# --- block specs: the grid is (batch, channel blocks, segments) ---------------------------------

def _spec(kind: str, x_shape, cfg: _Config, segments: int) -> pl.BlockSpec:
  """The block of one program for an array of the given layout kind, with time (or chunks)
  split into ``segments`` equal blocks."""
  bd, bpg = cfg.block_d, cfg.blocks_per_group
  if kind == "token":  # [batch, time, channels]
    return pl.BlockSpec((None, x_shape[1] // segments, bd), lambda b, j, s: (b, s, j))
  if kind == "group":  # [batch, time, groups, state]: this block's group
    return pl.BlockSpec((None, x_shape[1] // segments, None, x_shape[3]),
                        lambda b, j, s: (b, s, j // bpg, 0))
  if kind == "block_partial":  # [batch, time, channel blocks, state]: this block's row
    return pl.BlockSpec((None, x_shape[1] // segments, None, x_shape[3]),
                        lambda b, j, s: (b, s, j, 0))
  if kind == "param_state":  # [channels, state]
    return pl.BlockSpec((bd, x_shape[1]), lambda b, j, s: (j, 0))
  if kind == "param_rows":  # [state, channels]
    return pl.BlockSpec((x_shape[0], bd), lambda b, j, s: (0, j))
  if kind == "param":  # [channels]
    return pl.BlockSpec((bd,), lambda b, j, s: (j,))
  if kind == "row":  # [batch, time]
    return pl.BlockSpec((None, x_shape[1] // segments), lambda b, j, s: (b, s))
  if kind == "state":  # [batch, channels, state]
    return pl.BlockSpec((None, bd, x_shape[2]), lambda b, j, s: (b, j, 0))
  if kind == "segment_state":  # [batch, segments, state, channels]: this segment's
    return pl.BlockSpec((None, None, x_shape[2], bd), lambda b, j, s: (b, s, 0, j))
  if kind == "segment_states":  # [batch, segments, state, channels]: every segment's
    return pl.BlockSpec((None, x_shape[1], x_shape[2], bd), lambda b, j, s: (b, 0, 0, j))
  if kind == "state_rows":  # [batch, state, channels]
    return pl.BlockSpec((None, x_shape[1], bd), lambda b, j, s: (b, 0, j))
  if kind == "channel_partial":  # [batch, channels]
    return pl.BlockSpec((None, bd), lambda b, j, s: (b, j))
  if kind == "chunk_states":  # [batch, chunks, channels, state]
    return pl.BlockSpec((None, x_shape[1] // segments, bd, x_shape[3]),
                        lambda b, j, s: (b, s, j, 0))
  raise ValueError(kind)


_KINDS = dict(u="token", delta="token", z="token", dout="token", du="token", ddelta="token",
              dz="token", out="token", B="group", C="group", dB="block_partial",
              dC="block_partial", A="param_state", rate="param_rows", D="param",
              delta_bias="param", keep="row", h0="state_rows", final_state="segment_state",
              end="segment_state", carry="segment_state", ends="segment_states",
              carries="segment_states", dfinal="state", dh0="state", dA="state",
              dD="channel_partial", ddelta_bias="channel_partial", chunk_states="chunk_states")


def _call(kernel, ins: dict, out_shapes: dict, cfg: _Config, num_warps: int, segments: int = 1,
          grid_segments: int | None = None) -> dict:
  """Runs ``kernel`` on the arrays present in ``ins`` over the grid (batch, channel blocks,
  ``grid_segments``), time split into ``segments`` blocks (``grid_segments``: all of them)."""
  ins = {k: v for k, v in ins.items() if v is not None}
  batch, _, channels = ins["u"].shape
  in_names, out_names = tuple(ins), tuple(out_shapes)
  if cfg.interpret:
    backend_args = dict(interpret=True)
  else:
    backend_args = dict(compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps))
  spec = lambda k, v: _spec(_KINDS[k], v.shape, cfg, segments)
  outs = pl.pallas_call(
      functools.partial(kernel, in_names=in_names, out_names=out_names, cfg=cfg),
      grid=(batch, channels // cfg.block_d, segments if grid_segments is None else grid_segments),
      in_specs=[spec(k, v) for k, v in ins.items()],
      out_specs=[spec(k, v) for k, v in out_shapes.items()],
      out_shape=list(out_shapes.values()),
      **backend_args,
  )(*ins.values())
  return dict(zip(out_names, outs))


# --- the differentiable scan over padded arrays --------------------------------------------------

def _segment_ends(cfg: _Config, ins: dict) -> dict:
  """The first pass: every segment but the last walked from a zero state, as ``ends`` (the state
  at its end) and ``carries`` (the factor that carries a state across it), each [batch,
  segments - 1, state, channels] float32; empty with one segment."""
  if cfg.segments == 1:
    return {}
  batch, _, channels = ins["u"].shape
  shape = jax.ShapeDtypeStruct((batch, cfg.segments - 1, ins["rate"].shape[0], channels), _F32)
  names = ("u", "delta", "rate", "B", "delta_bias", "keep")
  first = _call(_segment_end_kernel, {k: ins[k] for k in names}, dict(end=shape, carry=shape),
                cfg, cfg.num_warps_forward, cfg.segments, cfg.segments - 1)
  return dict(ends=first["end"], carries=first["carry"])


def _forward(cfg: _Config, u, delta, A, B, C, D, z, delta_bias, keep, h0, *, save_states: bool):
  """The forward kernels on padded arrays (A [channels, state], h0 [batch, channels, state] or
  None); chunk states [batch, chunks, channels, state] when ``save_states``."""
  batch, time, channels = u.shape
  state = A.shape[1]
  out_shapes = dict(out=jax.ShapeDtypeStruct(u.shape, u.dtype),
                    final_state=jax.ShapeDtypeStruct((batch, cfg.segments, state, channels),
                                                     _F32))
  if save_states:
    out_shapes["chunk_states"] = jax.ShapeDtypeStruct(
        (batch, time // cfg.chunk, channels, state), _F32)
  ins = dict(u=u, delta=delta, rate=km.decay_rate(A).T, B=_bf16_pairs(B), C=_bf16_pairs(C), D=D,
             z=z, delta_bias=delta_bias, keep=keep,
             h0=None if h0 is None else jnp.swapaxes(h0, 1, 2))
  ins.update(_segment_ends(cfg, ins))
  outs = _call(_forward_kernel, ins, out_shapes, cfg, cfg.num_warps_forward, cfg.segments)
  return dict(outs, final_state=jnp.swapaxes(outs["final_state"][:, -1], 1, 2))


def _scan_bwd(cfg, residuals, cotangents):
  cfg = dataclasses.replace(cfg, block_d=cfg.backward_block_d,
                            blocks_per_group=cfg.blocks_per_group * cfg.block_d
                            // cfg.backward_block_d)
  u, delta, A, B, C, D, z, delta_bias, keep, h0, chunk_states = residuals
  dout, dfinal = cotangents
  batch, time, channels = u.shape
  state = A.shape[1]
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, _F32)
  out_shapes = dict(
      du=jax.ShapeDtypeStruct(u.shape, u.dtype), ddelta=jax.ShapeDtypeStruct(delta.shape,
                                                                             delta.dtype),
      dB=f32((batch, time, channels // cfg.block_d, state)),
      dC=f32((batch, time, channels // cfg.block_d, state)),
      dA=f32((batch, channels, state)), dh0=f32((batch, channels, state)))
  if z is not None:
    out_shapes["dz"] = jax.ShapeDtypeStruct(z.shape, z.dtype)
  if D is not None:
    out_shapes["dD"] = f32((batch, channels))
  if delta_bias is not None:
    out_shapes["ddelta_bias"] = f32((batch, channels))
  ins = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, keep=keep,
             chunk_states=chunk_states, dout=dout, dfinal=dfinal.astype(_F32))
  g = _call(_backward_kernel, ins, out_shapes, cfg, cfg.num_warps_backward)

  def per_group(x, like):
    """[batch, time, channel blocks, state] -> B's [batch, time, groups, state]."""
    groups = like.shape[2]
    return x.reshape(batch, time, groups, -1, state).sum(3).astype(like.dtype)

  batch_sum = lambda name: None if name not in g else g[name].sum(0)
  return (g["du"], g["ddelta"], g["dA"].sum(0), per_group(g["dB"], B), per_group(g["dC"], C),
          batch_sum("dD"), g.get("dz"), batch_sum("ddelta_bias"), None,
          None if h0 is None else g["dh0"])


_scan = km.recomputing_vjp(_forward, _scan_bwd)


# --- the entry point -----------------------------------------------------------------------------

def _largest_power_of_two_divisor(n: int, cap: int) -> int:
  block = 1
  while block * 2 <= cap and n % (block * 2) == 0:
    block *= 2
  return block


def default_backward_block_d(batch: int, channels: int, groups: int = 1) -> int:
  """Channels per program of the backward (``BACKWARD_BLOCK_D_RULE``) for ``batch`` rows of
  ``channels`` in ``groups`` groups of B and C.

  The largest power of two up to the rule's most that divides ``channels / groups`` and whose
  grid of ``batch * channels / block_d`` programs reaches the rule's target, but not below
  ``MIN_BLOCK_D`` (nor above the largest power-of-two divisor of ``channels / groups``).
  """
  most, target = BACKWARD_BLOCK_D_RULE
  block_d = _largest_power_of_two_divisor(channels // groups, most)
  while block_d > MIN_BLOCK_D and batch * (channels // block_d) < target:
    block_d //= 2
  return block_d


def default_segments(batch: int, time: int, blocks: int, chunk: int = CHUNK) -> int:
  """Segments of the forward for ``batch`` rows of ``time`` tokens in ``blocks`` channel blocks:
  the fewest (a power of two) that give the grid ``FORWARD_PROGRAMS`` programs, but no more
  than leave each segment ``MIN_SEGMENT_TOKENS`` tokens (and at least one chunk)."""
  segments = 1
  while (batch * blocks * segments < FORWARD_PROGRAMS
         and time // (2 * segments) >= max(MIN_SEGMENT_TOKENS, chunk)):
    segments *= 2
  return segments


def _warps(block_d: int, channels_per_thread: int) -> int:
  """Warps for ``block_d`` channels at ``channels_per_thread`` a thread (at least one)."""
  return max(1, block_d // (32 * channels_per_thread))


def default_forward_launch(batch: int, time: int, channels: int, groups: int = 1,
                           chunk: int = CHUNK) -> tuple[int, int, int]:
  """(block_d, num_warps, segments) of the forward for ``batch`` rows of ``time`` tokens of
  ``channels`` in ``groups`` groups: the first of ``FORWARD_LAUNCHES`` (the last regardless)
  whose ``default_segments`` keep at least ``WIDE_SEGMENT_TOKENS`` tokens each, with block_d
  the largest power of two up to the launch's most dividing ``channels / groups``, on
  block_d / (channels per thread) threads (at least one warp)."""
  for most, per_thread in FORWARD_LAUNCHES:
    block_d = _largest_power_of_two_divisor(channels // groups, most)
    segments = default_segments(batch, time, channels // block_d, chunk)
    if time // segments >= WIDE_SEGMENT_TOKENS:
      break
  return block_d, _warps(block_d, per_thread), segments


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, keep, initial_state, *,
                   block_d: int | None = None, segments: int | None = None, chunk: int = CHUNK,
                   prefetch_state_tokens: int | None = None,
                   num_warps_forward: int | None = None,
                   num_warps_backward: int = NUM_WARPS_BACKWARD, interpret: bool | None = None):
  """The fused selective scan, differentiable in every float input.

  Args:
    u, delta: [batch, time, channels], any float dtype (delta before bias and softplus).
    A: [channels, state].
    B, C: [batch, time, groups, state]; channel d reads group d // (channels // groups).
    D, delta_bias: [channels] or None.
    z: [batch, time, channels] gate or None.
    delta_softplus: apply softplus to delta + delta_bias.
    keep: [batch, time] float32, 0 where the state restarts before the token, or None.
    initial_state: [batch, channels, state] or None (zeros).
    block_d: the most channels per program of both kernels (a power of two; the largest one
      <= this dividing channels / groups is used); None: ``default_forward_launch``'s and
      ``default_backward_block_d``.
    segments: the stretches of time the forward walks in parallel (a power of two), each from
      the state entering it, found first by a pass that walks all but the last from a zero
      state; None: ``default_forward_launch``'s (given ``block_d``: ``default_segments``).
    chunk: tokens per unrolled time step and per saved state of the backward.
    prefetch_state_tokens: of each chunk's tokens, how many first ones have B and C loaded a
      chunk ahead in the forward (0 to ``chunk``; more take more registers); None:
      ``PREFETCH_STATE_TOKENS``, at most ``chunk``.
    num_warps_forward, num_warps_backward: Triton's warps per program of each kernel; None
      (forward): ``default_forward_launch``'s (given ``block_d``: one channel a thread).
    interpret: run the kernels in the Pallas interpreter; None: only on CPU.

  Returns:
    out [batch, time, channels] in u's dtype and the final state [batch, channels, state]
    float32.
  """
  batch, time, channels = u.shape
  groups, state = B.shape[2], A.shape[1]
  if block_d is None:
    block_d, launch_warps, launch_segments = default_forward_launch(batch, time, channels,
                                                                    groups, chunk)
    backward_block_d = default_backward_block_d(batch, channels, groups)
  else:
    block_d = backward_block_d = _largest_power_of_two_divisor(channels // groups, block_d)
    launch_warps = _warps(block_d, channels_per_thread=1)
    launch_segments = default_segments(batch, time, channels // block_d, chunk)
  if segments is None:
    segments = launch_segments
  elif segments < 1 or segments & (segments - 1):
    raise ValueError(f"segments must be a power of two, got {segments}")
  if prefetch_state_tokens is None:
    prefetch_state_tokens = min(PREFETCH_STATE_TOKENS, chunk)
  elif not 0 <= prefetch_state_tokens <= chunk:
    raise ValueError(f"prefetch_state_tokens must be in [0, chunk={chunk}], got "
                     f"{prefetch_state_tokens}")
  if num_warps_forward is None:
    num_warps_forward = launch_warps
  cfg = _Config(time=time, chunk=chunk, segments=segments, block_d=block_d,
                blocks_per_group=channels // groups // block_d,
                backward_block_d=backward_block_d, delta_softplus=delta_softplus,
                prefetch_state_tokens=prefetch_state_tokens, num_warps_forward=num_warps_forward,
                num_warps_backward=num_warps_backward,
                interpret=jax.default_backend() == "cpu" if interpret is None else interpret)
  pad_t = -time % (chunk * segments)
  pad_n = (1 << (state - 1).bit_length()) - state
  pad_time = lambda x, value=0: None if x is None else jnp.pad(
      x, [(0, 0), (0, pad_t)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
  pad_state = lambda x: None if x is None else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad_n)])
  f32 = lambda x: None if x is None else x.astype(_F32)
  out, final_state = _scan(
      cfg, pad_time(u), pad_time(delta), pad_state(f32(A)), pad_time(pad_state(B)),
      pad_time(pad_state(C)), f32(D), pad_time(z), f32(delta_bias), pad_time(keep, 1),
      pad_state(f32(initial_state)))
  return out[:, :time], final_state[:, :, :state]
