"""One fused KDA decode step as a Pallas TPU (Mosaic) kernel (SPEC 3.1, 3.7).

``update`` has the contract of ``ops.kda.pallas_gpu_step.update`` and ``ops.kda.reference.update``:
the prepared layout (q already scaled and, if asked, L2-normalised; q and k repeated to the value
heads), one token for every (batch, value head), returning ``(o [B, HV, V] float32, new state
[B, HV, K, V] float32)``. q, k, v, g, beta may arrive in bfloat16 or float32 and are cast to
float32 inside the kernel; the state must be float32. Argument checks and zero padding are shared
with the GPU kernel (``ops.kda._step_common``).

Kernel. The grid is ``(B, HV // block_h)``, both axes "parallel" (independent programs, split
across the TensorCores of a megacore chip such as v5p). A program owns ``block_h`` value heads of
one batch row: the state block ``[block_h, K, V]`` (V on the 128 lanes, K on the sublanes) and
the rows ``q, k, g [block_h, K]``, ``v [block_h, V]``, ``beta [block_h, 1]``. For each of its heads
(a static loop) it does, on the VPU in float32:

    a, k, q as columns [K, 1]           (see below)
    S <- S * a,  a = exp(g)             (lane broadcast of the column)
    pred = sum_K(S * k)  [1, V]         (a reduction over the sublane axis)
    S <- S + (beta k) (v - pred)        (a column times a row: the rank-1 update)
    o = sum_K(S * q)     [1, V]

and stores the row of ``o`` and the new state block. The MXU is not used: the step has two
matrix-vector products against one token (1 of 128 MXU rows busy) and float32 matmuls run as
several bf16 passes, while the VPU does the ~7 K V flops per head exactly, in the reference's
float32 arithmetic. The rows q, k, g arrive with K on the lanes (the layout the small [B, HV, K]
arrays have in HBM, so no transpose pass is needed outside); a row becomes a column on the VPU
and XLU by ``sum(where(eye, row broadcast to [K, K], 0), lanes)``, exact in float32 (every sum
adds zeros to one term), three per head (a, k, q).

Blocks and padding (TPU tiling). Every block's last two dims equal the full array dims, so any
K and V satisfy the (8, 128) block rule: the wrapper reshapes q, k, g, v to ``[B, HV // block_h,
block_h, dim]`` (free in the tiled HBM layout when block_h is a multiple of 8 or equals HV, a
small copy of these vectors otherwise) and beta to ``[B, HV // block_h, block_h, 1]`` (a copy of
B * HV scalars), and the state block is
``(block_h, K, V)`` of ``[B, HV, K, V]``. K is zero-padded to a multiple of 8 (the float32 sublane
tile), so the state's K rows fill whole (8, 128) tiles and the sublane sums never run over the
layout's implicit padding; V is used at its full size (lanes past V are masked by Mosaic; at
V = 128 or 256 there are none). K = 128 needs no padding; a K that is not a multiple of 8 costs
an extra padded copy of the state each way, as on the GPU.

VMEM per program (estimates; K = V = 128, float32 state, Pallas double-buffers every block):
  state in:  block_h * 128 * 128 * 4 B = block_h * 64 KiB, x 2 buffers = block_h * 128 KiB
  state out: the same, block_h * 128 KiB (the output block is its own VMEM buffer even though
             the HBM buffer is aliased)
  q, k, g, v, o rows: 5 * block_h * 128 * 4 B = block_h * 2.5 KiB (f32; bf16 half),
             x 2 buffers = block_h * 5 KiB
  beta [block_h, 1]: lane-padded to [block_h, 128], block_h * 512 B, x 2 = block_h * 1 KiB
  total: block_h * 262 KiB, i.e. 4.1 MiB at the default block_h = 16 (2.0 MiB at 8, 262 KiB
  at 1), within 16 MiB, the smallest default scoped-VMEM limit (v5e's). In-kernel values are
  one head at a time: S [128, 128] float32 is 16 vregs of 4 KiB, plus 16 for the [K, K]
  select of a column conversion, within the 64-vreg file.

Expected bound (estimates, not measured: no TPU was available). Per call the kernel reads and
writes the state once, ``2 * B * HV * K * V * 4`` bytes, plus O(B * HV * (K + V)) bytes of
vectors. At HV = 32, K = V = 128 (Kimi-Linear's KDA layer) that is 4.19 MB at B = 1 and 268 MB
at B = 64, so the HBM floor is
  v5e (~820 GB/s):  4.19e6 / 820e9  = 5.1 us at B = 1;  268.4e6 / 820e9  = 327 us at B = 64;
  v5p (~2.76 TB/s): 4.19e6 / 2.76e12 = 1.5 us at B = 1; 268.4e6 / 2.76e12 = 97 us at B = 64.
Per head that is 128 KiB of traffic: 0.16 us on v5e, 0.047 us on v5p (~80 cycles at 1.75 GHz).
The work per head is ~7 K V = 115k float32 flops on the VPU (~8 ops on each of the state's 16
vregs, ~130 vreg ops) plus the three column conversions (3 x 16 selects and 3 x 16 cross-lane
reductions on the XLU): ~1 flop per byte, far below the chips' compute balance, so the step
should be bandwidth-bound on v5e with room to spare. On v5p the margin is thin (a few tens of
cycles of VALU issue and ~48 XLU reductions against ~80 cycles of DMA per head); if a profile
shows the XLU binding there, the conversions can move out of the kernel (q, k, g passed as
[B, HV / block_h, K, block_h] columns by the wrapper) or onto the MXU (eye @ rows^T). The grid
costs ~0.35 us per program, 128 programs at B = 64, HV = 32, block_h = 16 (~45 us), overlapped
with the pipelined copies of the next block. At B = 1 the call is a few microseconds and fixed
overheads (launch, pipeline prologue) dominate.

In place. ``input_output_aliases`` maps the state input to the state output, as on the GPU: with
the state donated (``jax.jit(..., donate_argnums=...)``), XLA writes the new state over the old
one. Each program reads its whole state block before writing it, and blocks are disjoint.

Inference only: no ``custom_vjp``; do not differentiate through ``update``.

``interpret=None`` runs the kernel in Pallas' TPU interpret mode (``pltpu.InterpretParams()``)
unless the default backend is "tpu", so CI on CPU runs the same kernel body; ``interpret=False``
forces the Mosaic lowering, which ``jax.export(..., platforms=["tpu"])`` runs on a CPU host (it
checks the Pallas -> Mosaic lowering, not libtpu's later layout passes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ops.kda import _step_common

SUBLANES = 8  # float32 sublane tile: K is padded to a multiple of it
MAX_BLOCK_H = 16  # heads per program, at most (unrolled in the kernel)
MAX_STATE_BLOCK_BYTES = 1 << 20  # one state block, before double buffering


def default_block_h(heads: int, key_dim: int, value_dim: int) -> int:
  """Heads per program: the largest divisor of HV within MAX_BLOCK_H and a 1 MiB state block.

  Divisors that are a multiple of 8 (or HV itself) come first: the [B, HV, dim] -> [B, HV / hb,
  hb, dim] reshape is then free in the TPU's tiled HBM layout.
  """
  key_dim += -key_dim % SUBLANES
  cap = max(1, min(MAX_BLOCK_H, MAX_STATE_BLOCK_BYTES // (key_dim * value_dim * 4)))
  divisors = [d for d in range(1, min(cap, heads) + 1) if heads % d == 0]
  aligned = [d for d in divisors if d % SUBLANES == 0 or d == heads]
  return max(aligned or divisors)


def _column(row, eye):
  """[1, K] -> [K, 1] on the VPU / XLU, exactly: row i of the result sums one nonzero term."""
  return jnp.sum(jnp.where(eye, row, 0.0), axis=1, keepdims=True)


def _step_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, state_ref, o_ref, new_state_ref):
  """One program: state block [hb, K, V], rows q, k, g [hb, K], v [hb, V], beta [hb, 1]."""
  f32 = jnp.float32
  block_h, key_dim = q_ref.shape
  rows = lambda r: r[...].astype(f32)
  q, k, v, beta = rows(q_ref), rows(k_ref), rows(v_ref), rows(beta_ref)
  decay = jnp.exp(rows(g_ref))  # [hb, K]
  eye = (jax.lax.broadcasted_iota(jnp.int32, (key_dim, key_dim), 0)
         == jax.lax.broadcasted_iota(jnp.int32, (key_dim, key_dim), 1))
  for h in range(block_h):  # static: block_h <= MAX_BLOCK_H
    k_col = _column(k[h:h + 1], eye)  # [K, 1]
    state = state_ref[h] * _column(decay[h:h + 1], eye)  # [K, V]
    predicted = jnp.sum(state * k_col, axis=0, keepdims=True)  # S^T k, [1, V]
    state = state + (beta[h:h + 1] * k_col) * (v[h:h + 1] - predicted)
    o_ref[h:h + 1, :] = jnp.sum(state * _column(q[h:h + 1], eye), axis=0, keepdims=True)
    new_state_ref[h] = state


def update(state, q, k, v, g, beta, *, interpret: bool | None = None,
           block_h: int | None = None):
  """One KDA token for every (batch, value head), fused in one Pallas TPU (Mosaic) kernel.

  Args:
    state: [B, HV, K, V] float32.
    q, k, g: [B, HV, K] (q scaled, q and k repeated to the value heads); v: [B, HV, V];
      beta: [B, HV]. float32 or bfloat16; cast to float32 in the kernel.
    interpret: run Pallas' TPU interpret mode; None means unless the default backend is "tpu".
      False forces the Mosaic path (e.g. for ``jax.export(..., platforms=["tpu"])`` on a CPU).
    block_h: value heads per program, a divisor of HV; None picks ``default_block_h``.

  Returns:
    (o [B, HV, V] float32, new state [B, HV, K, V] float32), as ``reference.update``.
  """
  B, HV, K, V = _step_common.check_inputs(state, q, k, v, g, beta)
  if block_h is None:
    block_h = default_block_h(HV, K, V)
  if block_h < 1 or HV % block_h:
    raise ValueError(f"block_h must be a positive divisor of HV={HV}, got {block_h}")
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  return _update(state, q, k, v, g, beta, key_pad=-K % SUBLANES, block_h=block_h,
                 interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=("key_pad", "block_h", "interpret"))
def _update(state, q, k, v, g, beta, *, key_pad, block_h, interpret):
  B, HV, K, V = state.shape
  state, q, k, v, g = _step_common.pad(state, q, k, v, g, key_pad=key_pad, value_pad=0)
  Kp, G = K + key_pad, HV // block_h
  grouped = lambda x: x.reshape(B, G, block_h, x.shape[-1])
  q, k, v, g, beta = grouped(q), grouped(k), grouped(v), grouped(g), grouped(beta[..., None])

  def rows(width):
    return pl.BlockSpec((None, None, block_h, width), lambda b, j: (b, j, 0, 0))

  state_block = pl.BlockSpec((None, block_h, Kp, V), lambda b, j: (b, j, 0, 0))
  o, state = pl.pallas_call(
      _step_kernel,
      out_shape=(jax.ShapeDtypeStruct((B, G, block_h, V), jnp.float32),
                 jax.ShapeDtypeStruct((B, HV, Kp, V), jnp.float32)),
      grid=(B, G),
      in_specs=[rows(Kp), rows(Kp), rows(V), rows(Kp), rows(1), state_block],
      out_specs=(rows(V), state_block),
      input_output_aliases={5: 1},  # the state (input 5) is overwritten by the new state
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="kda_decode_step_tpu",
  )(q, k, v, g, beta, state)
  return _step_common.unpad(o.reshape(B, HV, V), state, K, V)
