"""Fused selective scan (SPEC 1.2) as Pallas GPU kernels on the Triton backend (``"pallas_gpu"``).

One forward kernel does the whole op: the discretisation (``delta_bias``, softplus), the scan,
the C readout, the D skip and the SiLU(z) gate. Each program owns one batch row and a block of
``block_d`` channels (by default ``default_block_d``, per kernel: the most, up to 8 for the
forward and 32 for the backward, that still give the grid the kernel's target number of
programs, but at least 4), keeps the state [block_d, state] in float32
registers and walks time in order: an outer ``fori_loop`` over chunks of ``chunk`` tokens and,
inside it, a Python loop unrolled over the chunk's tokens, so the loads of later tokens (which
do not depend on the state) can be issued early. The state leaves the chip only as the final
state and, when a gradient is wanted, as the state entering each chunk (``time / chunk`` states
per row, the residual).

The backward kernel (``jax.custom_vjp``) has the same grid and walks the chunks in reverse: it
recomputes a chunk's states from the saved entering state (each token's state a separate value,
so no scratch memory and no dynamic register indexing), then runs the adjoint recurrence
``g_{t-1} = keep_t exp(delta_t A) g_t`` backwards through the chunk. Per-token gradients (u,
delta, z) are written directly; dB and dC per token are written per channel block and summed by
XLA; dA, dD and d(delta_bias) accumulate in registers over the whole sequence and are written
once per program (summed over the batch by XLA); d(initial_state) is the last adjoint.

Why Triton and not Mosaic GPU: the work is a latency-bound sequential loop over small per-token
vectors ([block_d] and [state] rows) with a register-resident state; there is no matrix product
for wgmma and no large tile for TMA to stream, which is what Mosaic GPU's warpgroup programming
model is built around. Triton picks the register layouts, broadcasts and the reductions over the
state axis by itself, and schedules the chunk's independent loads ahead of the arithmetic (each
kernel issues a chunk's loads before its first store, which the compiler could not otherwise move
them past).

Cost per token and channel, with state size n (forward): n ``exp`` (the decay), about 5n FLOPs
(decay product, state update, readout) and a few more for the gate; memory traffic is u, delta,
z and out (2 bytes each in bfloat16) per channel plus B and C (n values each) per group. At
n = 16 that is 16 ``exp`` and ~80 FLOPs per 8 bytes, so with enough programs in flight the
special-function (``exp``) rate would bound it before HBM bandwidth. In practice the grid is
small (``batch x channels / block_d`` programs of 1-2 warps) and each program's tokens depend on
each other through the state, so the per-token dependency chain (latency) bounds it; hence the
smaller channel blocks of ``default_block_d`` when the batch is small, so that each
multiprocessor holds several programs. Measured once on an H200 (jax 0.11.2; batch 8, time
2048, channels 1536, state 16, bfloat16, with D, z, delta_bias and softplus; block_d 32):
forward 1.2 ms (``"xla"``: 5.1 ms), forward and backward 4.2 ms (``"xla"``: 23.3 ms); 200 MB of
token traffic in 1.2 ms is ~0.17 TB/s and 4e8 ``exp`` ~0.3 T/s, both far below the chip's rates,
as a latency bound predicts. The backward does about twice the forward's arithmetic (recompute
plus adjoint) and also reads the output cotangent.

Padding: time is padded to a multiple of ``chunk`` (padded tokens get a zero step, so they leave
the state unchanged) and the state size to a power of two (A, B, C padded with zeros, so padded
state entries stay zero). ``block_d`` is a power of two dividing ``channels / groups``, so one
channel block reads one group's B and C.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from ops.selective_scan import _kernel_math as km

# Defaults from H200 sweeps: block_d in {4, 8, 16, 32} by benchmarks.kernels --scan-block-ds
# (docs/kernels.md), and earlier warps in {1, 2, 4, 8} and chunk in {4, 8, 16} (differences
# within ~25%, not re-measured). num_stages (1 or 2) made no difference and is left to Triton.
BLOCK_D = 32  # the most channels per program (a power of two dividing channels / groups)
MIN_BLOCK_D = 4  # the fewest channels per program that default_block_d picks to fill the grid
# Per kernel, (the most channels per program, the programs wanted in the grid). Measured at B2
# L4096 and B8 L8192, D2048 N16: the one-warp forward was fastest with 1,024-2,048 programs of 4
# or 8 channels (16 channels took 255 registers and ran slowest), the two-warp backward with
# about 512 programs (8 channels at B2, 32 at B8).
BLOCK_D_RULES = {"forward": (8, 2048), "backward": (BLOCK_D, 512)}
CHUNK = 8  # tokens per unrolled step of the time loop, and per saved state
NUM_WARPS_FORWARD = 1
NUM_WARPS_BACKWARD = 2

_F32 = km.F32
_LAYOUT = km.GPU_LAYOUT  # state [block_d, state]; token values 1-D


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static settings of one call (hashable: the custom_vjp's non-differentiable argument)."""

  time: int  # tokens before padding; later tokens are padding
  chunk: int
  block_d: int  # channels per program of the forward kernel
  blocks_per_group: int  # channel blocks per group of B and C
  backward_block_d: int  # channels per program of the backward kernel
  delta_softplus: bool
  num_warps_forward: int
  num_warps_backward: int
  interpret: bool


def _load_token(ins: dict, t, bias, cfg: _Config) -> km.Token:
  """Loads token ``t`` (a traced int32 scalar) of this program's row and channel block."""
  raw = ins["delta"][t].astype(_F32)
  if bias is not None:
    raw = raw + bias
  return km.Token(
      u=ins["u"][t].astype(_F32), raw=raw,
      dt=km.step_size(raw, cfg.delta_softplus, _valid(t, cfg)), B=ins["B"][t].astype(_F32),
      C=ins["C"][t].astype(_F32), z=ins["z"][t].astype(_F32) if "z" in ins else None,
      keep=ins["keep"][t] if "keep" in ins else None)


def _valid(t, cfg: _Config):
  """1.0 for a real token and 0.0 for a padding one; None when time needs no padding."""
  return (t < cfg.time).astype(_F32) if cfg.time % cfg.chunk else None


def _optional(ins: dict, name: str):
  """A whole [block_d] parameter block as float32, or None when the input is absent."""
  return ins[name][...].astype(_F32) if name in ins else None


def _forward_kernel(*refs, in_names, out_names, cfg: _Config):
  """One (batch row, channel block): out per token, the final state, optionally chunk states."""
  ins = dict(zip(in_names, refs))
  outs = dict(zip(out_names, refs[len(in_names):]))
  A = ins["A"][...]
  D, bias = _optional(ins, "D"), _optional(ins, "delta_bias")
  h = ins["h0"][...] if "h0" in ins else jnp.zeros(A.shape, _F32)

  def chunk_body(c, h):
    if "chunk_states" in outs:
      outs["chunk_states"][c] = h
    # Every load of the chunk comes before its first store: the compiler cannot move a load
    # past a store to a ref it might alias.
    toks = [_load_token(ins, c * cfg.chunk + i, bias, cfg) for i in range(cfg.chunk)]
    for i, tok in enumerate(toks):
      h, _ = km.advance(h, tok, A, _LAYOUT)
      out = km.gate(km.readout(h, tok, D, _LAYOUT), tok)
      outs["out"][c * cfg.chunk + i] = out.astype(outs["out"].dtype)
    return h

  n_chunks = ins["u"].shape[0] // cfg.chunk
  outs["final_state"][...] = jax.lax.fori_loop(0, n_chunks, chunk_body, h)


def _backward_kernel(*refs, in_names, out_names, cfg: _Config):
  """One (batch row, channel block): the adjoint recurrence over the chunks in reverse."""
  ins = dict(zip(in_names, refs))
  outs = dict(zip(out_names, refs[len(in_names):]))
  A = ins["A"][...]
  D, bias = _optional(ins, "D"), _optional(ins, "delta_bias")
  block_d = A.shape[0]

  def chunk_body(k, carry):
    g, dA_acc, dD_acc, dbias_acc = carry
    c = ins["u"].shape[0] // cfg.chunk - 1 - k
    t0 = c * cfg.chunk
    toks = [_load_token(ins, t0 + i, bias, cfg) for i in range(cfg.chunk)]
    douts = [ins["dout"][t0 + i].astype(_F32) for i in range(cfg.chunk)]  # loads before stores
    states = [ins["chunk_states"][c]]  # states[i]: before token i; states[i + 1]: after it
    decays = []
    for tok in toks:
      h, decay = km.advance(states[-1], tok, A, _LAYOUT)
      states.append(h)
      decays.append(decay)
    for i in reversed(range(cfg.chunk)):
      t = t0 + i
      g, d = km.adjoint(g, toks[i], states[i + 1], states[i], decays[i], douts[i], A, D,
                        _LAYOUT, cfg.delta_softplus, _valid(t, cfg))
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


# --- block specs: the grid is (batch, channel blocks) --------------------------------------------

def _spec(kind: str, x_shape, cfg: _Config) -> pl.BlockSpec:
  """The block of one program for an array of the given layout kind."""
  bd, bpg = cfg.block_d, cfg.blocks_per_group
  if kind == "token":  # [batch, time, channels]
    return pl.BlockSpec((None, x_shape[1], bd), lambda b, j: (b, 0, j))
  if kind == "group":  # [batch, time, groups, state]: this block's group
    return pl.BlockSpec((None, x_shape[1], None, x_shape[3]), lambda b, j: (b, 0, j // bpg, 0))
  if kind == "block_partial":  # [batch, time, channel blocks, state]: this block's row
    return pl.BlockSpec((None, x_shape[1], None, x_shape[3]), lambda b, j: (b, 0, j, 0))
  if kind == "param_state":  # [channels, state]
    return pl.BlockSpec((bd, x_shape[1]), lambda b, j: (j, 0))
  if kind == "param":  # [channels]
    return pl.BlockSpec((bd,), lambda b, j: (j,))
  if kind == "row":  # [batch, time]
    return pl.BlockSpec((None, x_shape[1]), lambda b, j: (b, 0))
  if kind == "state":  # [batch, channels, state]
    return pl.BlockSpec((None, bd, x_shape[2]), lambda b, j: (b, j, 0))
  if kind == "channel_partial":  # [batch, channels]
    return pl.BlockSpec((None, bd), lambda b, j: (b, j))
  if kind == "chunk_states":  # [batch, chunks, channels, state]
    return pl.BlockSpec((None, x_shape[1], bd, x_shape[3]), lambda b, j: (b, 0, j, 0))
  raise ValueError(kind)


_KINDS = dict(u="token", delta="token", z="token", dout="token", du="token", ddelta="token",
              dz="token", out="token", B="group", C="group", dB="block_partial",
              dC="block_partial", A="param_state", D="param", delta_bias="param", keep="row",
              h0="state", dfinal="state", final_state="state", dh0="state", dA="state",
              dD="channel_partial", ddelta_bias="channel_partial", chunk_states="chunk_states")


def _call(kernel, ins: dict, out_shapes: dict, cfg: _Config, num_warps: int) -> dict:
  """Runs ``kernel`` over the (batch, channel blocks) grid on the arrays present in ``ins``."""
  ins = {k: v for k, v in ins.items() if v is not None}
  batch, _, channels = ins["u"].shape
  in_names, out_names = tuple(ins), tuple(out_shapes)
  if cfg.interpret:
    backend_args = dict(interpret=True)
  else:
    backend_args = dict(compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps))
  outs = pl.pallas_call(
      functools.partial(kernel, in_names=in_names, out_names=out_names, cfg=cfg),
      grid=(batch, channels // cfg.block_d),
      in_specs=[_spec(_KINDS[k], v.shape, cfg) for k, v in ins.items()],
      out_specs=[_spec(_KINDS[k], v.shape, cfg) for k, v in out_shapes.items()],
      out_shape=list(out_shapes.values()),
      **backend_args,
  )(*ins.values())
  return dict(zip(out_names, outs))


# --- the differentiable scan over padded arrays --------------------------------------------------

def _forward(cfg: _Config, u, delta, A, B, C, D, z, delta_bias, keep, h0, *, save_states: bool):
  batch, time, channels = u.shape
  state = A.shape[1]
  out_shapes = dict(out=jax.ShapeDtypeStruct(u.shape, u.dtype),
                    final_state=jax.ShapeDtypeStruct((batch, channels, state), _F32))
  if save_states:
    out_shapes["chunk_states"] = jax.ShapeDtypeStruct(
        (batch, time // cfg.chunk, channels, state), _F32)
  ins = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, keep=keep, h0=h0)
  return _call(_forward_kernel, ins, out_shapes, cfg, cfg.num_warps_forward)


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

  def per_group(x, like):  # [batch, time, channel blocks, state] -> B's [batch, time, groups, state]
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


def default_block_d(batch: int, channels: int, groups: int = 1, kernel: str = "forward") -> int:
  """Channels per program of ``kernel`` ("forward" or "backward", ``BLOCK_D_RULES``) for
  ``batch`` rows of ``channels`` in ``groups`` groups of B and C.

  The largest power of two up to the kernel's most that divides ``channels / groups`` and whose
  grid of ``batch * channels / block_d`` programs reaches the kernel's target, but not below
  ``MIN_BLOCK_D`` (nor above the largest power-of-two divisor of ``channels / groups``).
  """
  most, target = BLOCK_D_RULES[kernel]
  block_d = _largest_power_of_two_divisor(channels // groups, most)
  while block_d > MIN_BLOCK_D and batch * (channels // block_d) < target:
    block_d //= 2
  return block_d


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, keep, initial_state, *,
                   block_d: int | None = None, chunk: int = CHUNK,
                   num_warps_forward: int = NUM_WARPS_FORWARD,
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
      <= this dividing channels / groups is used); None: each kernel's ``default_block_d``.
    chunk: tokens per unrolled time step and per saved state of the backward.
    num_warps_forward, num_warps_backward: Triton's warps per program of each kernel.
    interpret: run the kernels in the Pallas interpreter; None: only on CPU.

  Returns:
    out [batch, time, channels] in u's dtype and the final state [batch, channels, state]
    float32.
  """
  batch, time, channels = u.shape
  groups, state = B.shape[2], A.shape[1]
  if block_d is None:
    block_d, backward_block_d = (default_block_d(batch, channels, groups, kernel)
                                 for kernel in ("forward", "backward"))
  else:
    block_d = backward_block_d = _largest_power_of_two_divisor(channels // groups, block_d)
  cfg = _Config(time=time, chunk=chunk, block_d=block_d,
                blocks_per_group=channels // groups // block_d,
                backward_block_d=backward_block_d, delta_softplus=delta_softplus,
                num_warps_forward=num_warps_forward, num_warps_backward=num_warps_backward,
                interpret=jax.default_backend() == "cpu" if interpret is None else interpret)
  pad_t = -time % chunk
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
