"""Fused selective scan (SPEC 1.2) as Pallas TPU (Mosaic) kernels (``"pallas_tpu"``).

The same contract as ``pallas_gpu`` (one fused forward kernel: discretisation, scan, C readout,
D skip, SiLU(z) gate; one backward kernel recomputing each chunk from its saved entering state),
laid out for the TPU's [8 sublanes, 128 lanes] vector registers:

* Grid (batch, channel blocks, time chunks) with dimension semantics ("parallel", "parallel",
  "arbitrary"): the chunk axis runs in order on one core and the state lives across it in a
  VMEM scratch buffer [state, block_d] float32 (state on sublanes, channels on lanes), set from
  the initial state at chunk 0 and written out as the final state at the last chunk.
* u, delta, z and out are [chunk, block_d] blocks of the [batch, time, channels] arrays
  (block_d = 128, or all channels when there are fewer, in one group); a token is a [1, block_d]
  row, ``ref[pl.ds(i, 1), :]`` with a static i. A is passed as [state, channels] and B, C as
  [batch, groups, time / chunk, state, chunk] float32, so a block is one group's [state, chunk]
  (both dims full: legal for any chunk) and a token's B is a [state, 1] column,
  ``ref[:, pl.ds(i, 1)]``. The state size is padded to a multiple of 8 (zeros in A, B, C: the
  padded entries stay zero), time to a multiple of ``chunk`` (padding tokens get a zero step).
* Inside a chunk a Python loop unrolled over its ``chunk`` tokens does, per token: the decay
  exp(dt A) ([state, block_d] on the EUP), the update h = decay h + (dt u) B and the readout
  y = sum over the state of h C (a sublane reduction), on the VPU; the token's output rows are
  collected in a [chunk, block_d] float32 scratch and written as one block.
* Backward: the grid walks the chunks in reverse. Each step recomputes its chunk's states and
  decays from the saved entering state into VMEM scratch ([chunk + 1] and [chunk] x [state,
  block_d]), then runs the adjoint (``_kernel_math.adjoint``, shared with the GPU kernel) over
  the tokens in reverse, the adjoint state carried in VMEM scratch across chunks. du, d delta,
  dz per token are rows; dB and dC per token are [state, 1] columns (lane reductions over the
  block's channels) written per channel block and summed over blocks by XLA; dA, dD and
  d delta_bias accumulate in their output blocks (resident across the chunk axis) and are summed
  over the batch by XLA.
* No matrix products: the scan is elementwise in (state, channel) with reductions over one
  axis, so nothing runs on the MXU.

VMEM per grid step (``vmem_bytes``; tiles padded to [8, 128] float32 / [16, 128] bfloat16, every
pipelined block double-buffered), for block_d 128, state 16, chunk 32, bfloat16 u/delta/z:
  forward: u, delta, z, out 4 x [32, 128] bf16 = 4 x 8 KiB; B, C 2 x [16, 32 -> 128] f32 =
  2 x 8 KiB; keep [1 -> 8, 32 -> 128] f32 4 KiB; A [16, 128] f32 8 KiB; D, delta_bias
  2 x [1 -> 8, 128] f32 = 2 x 4 KiB; h0, final state, chunk state 3 x 8 KiB: 92 KiB, x2 buffers
  = 184 KiB; scratch: state 8 KiB, output rows [32, 128] f32 16 KiB. Total 208 KiB.
  backward: u, delta, z, dout, du, d delta, dz 7 x 8 KiB; B, C, dB, dC 4 x 8 KiB; keep 4 KiB;
  A, chunk state, d final, dA, dh0 5 x 8 KiB; D, delta_bias, dD, d delta_bias 4 x 4 KiB:
  148 KiB, x2 = 296 KiB; scratch: adjoint 8 KiB, states 33 x 8 KiB, decays 32 x 8 KiB, three
  row buffers 3 x 16 KiB = 576 KiB. Total 872 KiB (state 64: 2.8 MiB), far below the default
  scoped VMEM limit (16 MiB on v5e, 32 MiB on v5p); ``unsupported`` refuses shapes over
  ``VMEM_BUDGET`` (a state size over 280 at chunk 32).

Per chunk: VPU, the decay argument dt A, the update's two products and sum, the readout's
product and sublane sum (the adjoint adds about as much again, and lane sums for dB and dC on
the XLU); EUP, the exp of the decay ([state, block_d] per token) and the exps of softplus
and the gate's sigmoid (per [1, block_d] row); MXU, nothing.

Expected bound on TPU v5e and v5p: an ESTIMATE, not measured (no TPU was available). Per token
and channel, with state size n = 16: n exp for the decay on full vregs, ~6n = 96 VPU operations
on full vregs, and ~15 operations on [1, block_d] rows (delta + bias, softplus, the step mask,
dt u, D u, the gate) that fill one of a vreg's 8 sublanes, so cost like ~120 full-vreg
operations, plus ~3 row transcendentals (worth ~24); HBM traffic is 8 bytes in bfloat16 (u,
delta, z read, out written; B and C are per group and negligible). Assumed rates (not from
public docs): one EUP push and 4 VALU operations per cycle, each on a full [8, 128] vreg.
  v5e (one TensorCore; ~820 GB/s HBM; 197 TFLOP/s bf16 / (4 MXUs x 128 x 128 x 2) = 1.5 GHz):
  HBM allows ~1.0e11 token-channels/s; the EUP (1.5e12 exp/s, ~40 per token-channel) ~4e10/s;
  the VPU (6.1e12 ops/s, ~220 per token-channel) ~3e10/s. Compute-bound (VPU, then EUP), by
  ~3.5x over memory; the forward at batch 8, time 2048, channels 1536 would take ~0.9 ms.
  v5p (two TensorCores; ~2.76 TB/s; 459 TFLOP/s -> 1.75 GHz): HBM ~3.5e11/s, EUP ~9e10/s, VPU
  ~6.5e10/s: compute-bound by ~5x.
Leads for tuning on hardware, in order: (1) the grid-step overhead (~0.35 us per step) is of
the order of a step's own work (128 x 32 = 4096 token-channels, ~0.14 us at the VPU estimate
on v5e), so longer chunks (64-128) or several 128-lane blocks per step should come first;
(2) hoisting the row operations to [chunk, block_d] arrays once per chunk (full vregs) would
cut the VPU work by about half. The per-token dependency chain (h = decay h + b: a product and
a sum) is short next to a chunk's independent work, so latency should not bound it. The
backward does about twice the forward's work and reads the output cotangent.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops.selective_scan import _kernel_math as km

CHUNK = 32  # tokens per grid step along time (unrolled), and per saved state; a multiple of 16
LANES = 128  # channels per block when they are split
SUBLANES = 8  # the state size is padded to a multiple of this
VMEM_BUDGET = 12 * 2**20  # bytes per grid step; the default scoped VMEM limit is 16 MiB on v5e

_F32 = km.F32
_LAYOUT = km.TPU_LAYOUT  # state [state, block_d]; token values [1, block_d] rows, [state, 1] cols


def _tile_bytes(shape, itemsize: int) -> int:
  """VMEM bytes of a block: the last dim padded to 128 lanes, the one before to the sublane tile."""
  *lead, rows, cols = shape
  sublanes = SUBLANES * 4 // itemsize
  size = -(-rows // sublanes) * sublanes * -(-cols // LANES) * LANES * itemsize
  for n in lead:
    size *= n
  return size


def vmem_bytes(block_d: int, state: int, chunk: int, itemsize: int, *, backward: bool) -> int:
  """VMEM of one grid step: double-buffered blocks plus scratch (``itemsize``: u's dtype)."""
  n = -(-state // SUBLANES) * SUBLANES
  token = _tile_bytes((chunk, block_d), itemsize)
  column = _tile_bytes((n, chunk), 4)  # B, C, dB, dC
  keep = _tile_bytes((1, chunk), 4)
  square = _tile_bytes((n, block_d), 4)  # A and the states
  param = _tile_bytes((1, block_d), 4)  # D, delta_bias and their gradients
  rows = _tile_bytes((chunk, block_d), 4)
  if backward:
    blocks = 7 * token + 4 * column + keep + 5 * square + 4 * param
    scratch = square + (2 * chunk + 1) * square + 3 * rows
  else:
    blocks = 4 * token + 2 * column + keep + 4 * square + 2 * param
    scratch = square + rows
  return 2 * blocks + scratch


def unsupported(channels: int, groups: int, state: int, *, chunk: int = CHUNK,
                itemsize: int = 4) -> str | None:
  """Why "pallas_tpu" cannot run this shape, or None when it can."""
  if groups > 1 and (channels // groups) % LANES:
    return (f"channels per group ({channels // groups}) must be a multiple of {LANES} when B "
            f"and C have {groups} groups (a channel block reads one group)")
  need = vmem_bytes(LANES, state, chunk, itemsize, backward=True)
  if need > VMEM_BUDGET:
    return f"state size {state} needs {need} bytes of VMEM per step (budget {VMEM_BUDGET})"
  return None


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static settings of one call (hashable: the custom_vjp's non-differentiable argument)."""

  time: int  # tokens before padding; later tokens are padding
  chunk: int
  block_d: int
  blocks_per_group: int  # channel blocks per group of B and C
  delta_softplus: bool
  interpret: bool


# --- kernels: one grid step is (batch row, channel block, chunk) -------------------------------

def _load_token(ins: dict, i: int, c, bias, cfg: _Config) -> km.Token:
  """Token ``i`` (static) of chunk ``c`` (traced): [1, block_d] rows and [state, 1] columns."""
  row = lambda name: ins[name][pl.ds(i, 1), :].astype(_F32)
  col = lambda name: ins[name][:, pl.ds(i, 1)]
  raw = row("delta")
  if bias is not None:
    raw = raw + bias
  return km.Token(
      u=row("u"), raw=raw, dt=km.step_size(raw, cfg.delta_softplus, _valid(i, c, cfg)),
      B=col("B"), C=col("C"), z=row("z") if "z" in ins else None,
      keep=col("keep") if "keep" in ins else None)


def _valid(i: int, c, cfg: _Config):
  """1.0 for a real token and 0.0 for a padding one; None when time needs no padding."""
  return (c * cfg.chunk + i < cfg.time).astype(_F32) if cfg.time % cfg.chunk else None


def _param(ins: dict, name: str):
  """A [1, block_d] parameter row, or None when the input is absent."""
  return ins[name][...] if name in ins else None


def _split_refs(refs, in_names, out_names):
  n_in, n_out = len(in_names), len(out_names)
  return (dict(zip(in_names, refs[:n_in])), dict(zip(out_names, refs[n_in:n_in + n_out])),
          refs[n_in + n_out:])


def _forward_kernel(*refs, in_names, out_names, cfg: _Config):
  """Advances the state over one chunk; writes out, the chunk's entering state, the final state."""
  ins, outs, (h_ref, rows_ref) = _split_refs(refs, in_names, out_names)
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    h_ref[...] = ins["h0"][...] if "h0" in ins else jnp.zeros(h_ref.shape, _F32)

  h = h_ref[...]
  if "chunk_states" in outs:
    outs["chunk_states"][...] = h
  A = ins["A"][...]
  rate = km.decay_rate(A)
  D, bias = _param(ins, "D"), _param(ins, "delta_bias")
  for i in range(cfg.chunk):
    tok = _load_token(ins, i, c, bias, cfg)
    h, _ = km.advance(h, tok, rate, _LAYOUT)
    rows_ref[pl.ds(i, 1), :] = km.gate(km.readout(h, tok, D, _LAYOUT), tok)
  outs["out"][...] = rows_ref[...].astype(outs["out"].dtype)
  h_ref[...] = h

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    outs["final_state"][...] = h


def _backward_kernel(*refs, in_names, out_names, cfg: _Config):
  """The adjoint over one chunk (the grid's chunk axis runs from the last chunk to the first)."""
  ins, outs, scratch = _split_refs(refs, in_names, out_names)
  g_ref, states_ref, decays_ref, du_rows, ddelta_rows, dz_rows = scratch
  k = pl.program_id(2)
  c = pl.num_programs(2) - 1 - k
  accumulated = [n for n in ("dA", "dD", "ddelta_bias") if n in outs]

  @pl.when(k == 0)
  def _():
    g_ref[...] = ins["dfinal"][...]
    for name in accumulated:
      outs[name][...] = jnp.zeros(outs[name].shape, _F32)

  A = ins["A"][...]
  rate = km.decay_rate(A)
  D, bias = _param(ins, "D"), _param(ins, "delta_bias")
  h = ins["chunk_states"][...]
  states_ref[0] = h  # states_ref[i]: before token i; states_ref[i + 1]: after it
  for i in range(cfg.chunk):
    h, decay = km.advance(h, _load_token(ins, i, c, bias, cfg), rate, _LAYOUT)
    states_ref[i + 1] = h
    decays_ref[i] = decay

  g = g_ref[...]
  sums = {name: jnp.zeros(outs[name].shape, _F32) for name in accumulated}
  for i in reversed(range(cfg.chunk)):
    tok = _load_token(ins, i, c, bias, cfg)
    dout = ins["dout"][pl.ds(i, 1), :].astype(_F32)
    g, d = km.adjoint(g, tok, states_ref[i + 1], states_ref[i], decays_ref[i], dout, A, D,
                      _LAYOUT, cfg.delta_softplus, _valid(i, c, cfg))
    du_rows[pl.ds(i, 1), :] = d.du
    ddelta_rows[pl.ds(i, 1), :] = d.draw
    if d.dz is not None:
      dz_rows[pl.ds(i, 1), :] = d.dz
    outs["dB"][:, pl.ds(i, 1)] = d.dB
    outs["dC"][:, pl.ds(i, 1)] = d.dC
    for name, term in (("dA", d.dA), ("dD", d.dD), ("ddelta_bias", d.draw)):
      if name in sums:
        sums[name] = sums[name] + term
  g_ref[...] = g
  for name, total in sums.items():
    outs[name][...] += total
  for name, rows in (("du", du_rows), ("ddelta", ddelta_rows), ("dz", dz_rows)):
    if name in outs:
      outs[name][...] = rows[...].astype(outs[name].dtype)

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    outs["dh0"][...] = g


# --- block specs -------------------------------------------------------------------------------

def _spec(kind: str, x_shape, cfg: _Config, reverse: bool) -> pl.BlockSpec:
  """The block of one grid step (b, j, c) for an array of the given layout kind."""
  bd, bpg, chunk = cfg.block_d, cfg.blocks_per_group, cfg.chunk
  at = (lambda c, n: n - 1 - c) if reverse else (lambda c, n: c)
  if kind == "token":  # [batch, time, channels]
    n = x_shape[1] // chunk
    return pl.BlockSpec((None, chunk, bd), lambda b, j, c: (b, at(c, n), j))
  if kind == "group":  # [batch, groups, chunks, state, chunk]: this block's group (lax.div:
    # jnp's floor division lowers through sign, which needs a TPU present to lower)
    n = x_shape[2]
    return pl.BlockSpec((None, None, None) + x_shape[3:],
                        lambda b, j, c: (b, jax.lax.div(j, bpg), at(c, n), 0, 0))
  if kind == "block_partial":  # [batch, channel blocks, chunks, state, chunk]
    n = x_shape[2]
    return pl.BlockSpec((None, None, None) + x_shape[3:], lambda b, j, c: (b, j, at(c, n), 0, 0))
  if kind == "keep":  # [batch, chunks, 1, chunk]
    n = x_shape[1]
    return pl.BlockSpec((None, None, 1, chunk), lambda b, j, c: (b, at(c, n), 0, 0))
  if kind == "chunk_states":  # [batch, chunks, state, channels]
    n = x_shape[1]
    return pl.BlockSpec((None, None, x_shape[2], bd), lambda b, j, c: (b, at(c, n), 0, j))
  if kind == "param_state":  # [state, channels]
    return pl.BlockSpec((x_shape[0], bd), lambda b, j, c: (0, j))
  if kind == "param":  # [1, channels]
    return pl.BlockSpec((1, bd), lambda b, j, c: (0, j))
  if kind == "state":  # [batch, state, channels]; also [batch, 1, channels] partial sums
    return pl.BlockSpec((None, x_shape[1], bd), lambda b, j, c: (b, 0, j))
  raise ValueError(kind)


_KINDS = dict(u="token", delta="token", z="token", dout="token", du="token", ddelta="token",
              dz="token", out="token", B="group", C="group", dB="block_partial",
              dC="block_partial", A="param_state", D="param", delta_bias="param", keep="keep",
              h0="state", dfinal="state", final_state="state", dh0="state", dA="state",
              dD="state", ddelta_bias="state", chunk_states="chunk_states")


def _call(kernel, ins: dict, out_shapes: dict, scratch_shapes, cfg: _Config, *,
          reverse: bool) -> dict:
  """Runs ``kernel`` over the (batch, channel blocks, chunks) grid on the arrays in ``ins``."""
  ins = {k: v for k, v in ins.items() if v is not None}
  batch, time, channels = ins["u"].shape
  in_names, out_names = tuple(ins), tuple(out_shapes)
  outs = pl.pallas_call(
      functools.partial(kernel, in_names=in_names, out_names=out_names, cfg=cfg),
      grid=(batch, channels // cfg.block_d, time // cfg.chunk),
      in_specs=[_spec(_KINDS[k], v.shape, cfg, reverse) for k, v in ins.items()],
      out_specs=[_spec(_KINDS[k], v.shape, cfg, reverse) for k, v in out_shapes.items()],
      out_shape=list(out_shapes.values()),
      scratch_shapes=scratch_shapes,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=pltpu.InterpretParams() if cfg.interpret else False,
  )(*ins.values())
  return dict(zip(out_names, outs))


# --- the differentiable scan over padded, TPU-laid-out arrays ---------------------------------

def _forward(cfg: _Config, u, delta, A, B, C, D, z, delta_bias, keep, h0, *, save_states: bool):
  batch, time, channels = u.shape
  state = A.shape[0]
  out_shapes = dict(out=jax.ShapeDtypeStruct(u.shape, u.dtype),
                    final_state=jax.ShapeDtypeStruct((batch, state, channels), _F32))
  if save_states:
    out_shapes["chunk_states"] = jax.ShapeDtypeStruct(
        (batch, time // cfg.chunk, state, channels), _F32)
  ins = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, keep=keep, h0=h0)
  scratch = [pltpu.VMEM((state, cfg.block_d), _F32), pltpu.VMEM((cfg.chunk, cfg.block_d), _F32)]
  return _call(_forward_kernel, ins, out_shapes, scratch, cfg, reverse=False)


def _scan_bwd(cfg, residuals, cotangents):
  u, delta, A, B, C, D, z, delta_bias, keep, h0, chunk_states = residuals
  dout, dfinal = cotangents
  batch, _, channels = u.shape
  state = A.shape[0]
  n_blocks = channels // cfg.block_d
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, _F32)
  partial = f32((batch, n_blocks) + B.shape[2:])  # [batch, blocks, chunks, state, chunk]
  out_shapes = dict(
      du=jax.ShapeDtypeStruct(u.shape, u.dtype),
      ddelta=jax.ShapeDtypeStruct(delta.shape, delta.dtype), dB=partial, dC=partial,
      dA=f32((batch, state, channels)), dh0=f32((batch, state, channels)))
  if z is not None:
    out_shapes["dz"] = jax.ShapeDtypeStruct(z.shape, z.dtype)
  if D is not None:
    out_shapes["dD"] = f32((batch, 1, channels))
  if delta_bias is not None:
    out_shapes["ddelta_bias"] = f32((batch, 1, channels))
  ins = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, keep=keep,
             chunk_states=chunk_states, dout=dout, dfinal=dfinal.astype(_F32))
  square = pltpu.VMEM((state, cfg.block_d), _F32)
  rows = pltpu.VMEM((cfg.chunk, cfg.block_d), _F32)
  scratch = [square, pltpu.VMEM((cfg.chunk + 1, state, cfg.block_d), _F32),
             pltpu.VMEM((cfg.chunk, state, cfg.block_d), _F32), rows, rows, rows]
  g = _call(_backward_kernel, ins, out_shapes, scratch, cfg, reverse=True)

  def per_group(x):  # [batch, blocks, ...] -> [batch, groups, ...]: sum a group's blocks
    return x.reshape((batch, B.shape[1], cfg.blocks_per_group) + x.shape[2:]).sum(2)

  batch_sum = lambda name: None if name not in g else g[name].sum(0)
  return (g["du"], g["ddelta"], g["dA"].sum(0), per_group(g["dB"]), per_group(g["dC"]),
          batch_sum("dD"), g.get("dz"), batch_sum("ddelta_bias"), None,
          None if h0 is None else g["dh0"])


_scan = km.recomputing_vjp(_forward, _scan_bwd)


# --- the entry point -----------------------------------------------------------------------------

def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, keep, initial_state, *,
                   chunk: int = CHUNK, interpret: bool | None = None):
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
    chunk: tokens per grid step along time and per saved state of the backward (a multiple of
      16 keeps bfloat16 blocks on whole tiles).
    interpret: run the kernels in Pallas' TPU interpret mode; None: unless the backend is TPU.

  Returns:
    out [batch, time, channels] in u's dtype and the final state [batch, channels, state]
    float32.

  Raises:
    ValueError: for a shape ``unsupported`` refuses.
  """
  batch, time, channels = u.shape
  groups, state = B.shape[2], A.shape[1]
  if chunk % 16:
    raise ValueError(f"pallas_tpu: chunk must be a multiple of 16 (whole bfloat16 tiles), got "
                     f"{chunk}")
  reason = unsupported(channels, groups, state, chunk=chunk, itemsize=u.dtype.itemsize)
  if reason is not None:
    raise ValueError(f"pallas_tpu: {reason}")
  # One group: pad the channels to whole 128-lane blocks, or use them all as one smaller block.
  pad_c = -channels % LANES if groups == 1 and channels > LANES else 0
  width = channels + pad_c
  block_d = min(width, LANES)
  pad_t, pad_n = -time % chunk, -state % SUBLANES
  n_chunks = (time + pad_t) // chunk
  cfg = _Config(time=time, chunk=chunk, block_d=block_d,
                blocks_per_group=width // groups // block_d, delta_softplus=delta_softplus,
                interpret=jax.default_backend() != "tpu" if interpret is None else interpret)

  def tokens(x):  # [batch, time, channels], padded
    return None if x is None else jnp.pad(x, [(0, 0), (0, pad_t), (0, pad_c)])

  def per_group(x):  # [batch, time, groups, state] -> [batch, groups, chunks, state, chunk]
    x = jnp.pad(x.astype(_F32), [(0, 0), (0, pad_t), (0, 0), (0, pad_n)])
    return x.reshape(batch, n_chunks, chunk, groups, state + pad_n).transpose(0, 3, 1, 4, 2)

  def param(x):  # [channels] -> [1, channels]
    return None if x is None else jnp.pad(x.astype(_F32), [(0, pad_c)])[None]

  A_t = jnp.pad(A.astype(_F32).T, [(0, pad_n), (0, pad_c)])
  keep_t = None if keep is None else jnp.pad(
      keep, [(0, 0), (0, pad_t)], constant_values=1).reshape(batch, n_chunks, 1, chunk)
  h0 = None if initial_state is None else jnp.pad(
      initial_state.astype(_F32), [(0, 0), (0, pad_c), (0, pad_n)]).transpose(0, 2, 1)
  out, final_state = _scan(cfg, tokens(u), tokens(delta), A_t, per_group(B), per_group(C),
                           param(D), tokens(z), param(delta_bias), keep_t, h0)
  return out[:, :time, :channels], final_state.transpose(0, 2, 1)[:, :channels, :state]
