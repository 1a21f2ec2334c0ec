"""One fused KDA decode step as a Pallas GPU kernel on the Triton backend (SPEC 3.1, 3.7).

``update`` has the contract of ``ops.kda.reference.update``: the prepared layout (q already
scaled and, if asked, L2-normalised; q and k repeated to the value heads), one token for every
(batch, value head), returning ``(o [B, HV, V] float32, new state [B, HV, K, V] float32)``. The
inputs q, k, v, g, beta may arrive in their own dtype (bfloat16 or float32): they are cast to
float32 inside the kernel, so no separate XLA cast pass is needed. The state must be float32.

Kernel. The grid is ``(B, HV, V // block_v)``, one program per (row, value head, block of value
channels), as in fla's ``fused_recurrent`` (SPEC 3.7). A program loads its state block
``S [K, block_v]`` (float32), q, k, g ``[K]``, v ``[block_v]`` and beta, then in registers:

    S <- S * exp(g)[:, None]
    pred = S^T k                      (a reduction over K)
    S <- S + (beta k)[:, None] (v - pred)[None, :]
    o = S^T q                         (a reduction over K)

and stores ``o [block_v]`` and the new state block. The value channels are independent in the
delta rule (every term mixes key channels only), so splitting V across programs needs no
communication, while each program holds the full K axis for its two reductions.

Why Triton. The step is a small memory-bound elementwise-plus-reduction kernel: per head it does
about 8 K V flops on K V float32 words of state read and written once, i.e. ~1 flop per byte,
far below the H200's ~300 flops per byte of balance. There are no matrix products worth a tensor
core (matrix-vector products against one token), no pipelining across a loop, and no shared
memory or warp specialisation to manage, so the lower-level Mosaic GPU backend would add code
for no gain; the
Triton backend lowers the few block loads, the exp, the two ``sum`` reductions and the stores
directly, and picks vectorised, coalesced accesses along the contiguous V axis by itself. Fusing
matters more than anything else: the plain-JAX ``reference.update`` is a chain of state-sized
ops (decay, predict, update, read-out) that XLA need not fuse into one pass over the state (the
measured times below show it moves more than the minimum), while this kernel touches the state
once in and once out. At decode batch sizes the call is short enough that launch
overhead (a few microseconds) is comparable to the memory time, so one launch instead of several
is the other half of the gain. Measured on an H200 (HV = 32, K = V = 128, see DEFAULT_BLOCK_V):
81 us at B = 64 and 157 us at B = 128 against XLA's 116 us and 215 us, i.e. 77-80% of the
bandwidth floor below.

Bytes and the floor. Per call the kernel reads and writes the state, ``2 * B * HV * K * V * 4``
bytes, plus the small q, k, g, v, beta and o vectors (``O(B * HV * (K + V))``, negligible). At the
H200's ~4.3 TB/s of HBM bandwidth the floor is ``2 * B * HV * K * V * 4 / 4.3e12`` seconds; e.g.
Kimi-Linear's KDA layer (HV = 32, K = V = 128) at B = 1 moves 4.2 MB: ~1 us, below the launch
overhead, and at B = 64, 268 MB: ~62 us.

In place. ``input_output_aliases`` maps the state input to the state output, so when the caller
donates the state buffer (``jax.jit(..., donate_argnums=...)`` on a function whose state
argument flows straight into ``update``), XLA writes the new state over the old one and the step
allocates nothing state-sized. Every element of a state block is read before any is written, and
the blocks of different programs are disjoint, so aliasing is safe. Without donation XLA copies
the state first (still correct, one extra state-sized copy).

Padding. Triton blocks must have power-of-two sizes. When K is not a power of two, or V is not a
multiple of ``block_v``, the wrapper pads (q, k, g with 0 along K; v with 0 along V; the state
with 0 along both) and slices the result back (``ops.kda._step_common``, shared with the TPU
kernel). Padded key rows have k = q = 0 and g = 0, so they stay
zero and add nothing to the reductions; padded value columns have v = 0 and a zero state column,
so their residual is 0 and they stay zero. This path costs an extra padded copy of the state each
way (measured at B = 16, HV = 32, K = 96, V = 80: 35 us against XLA's 23 us), so the padded
path is slower than the plain-JAX step; the fast path (K a power of two, V a multiple of
``block_v``, e.g. K = V = 128) does none.

Inference only. Decoding has no backward pass, so this module defines no ``custom_vjp``; do not
differentiate through ``update`` (use ``kda(..., implementation="reference" | "xla")`` for
gradients).

``interpret=None`` runs the kernel in Pallas' interpreter when the default backend is not a GPU,
so CI on CPU checks the same kernel body; only public ``jax.experimental.pallas`` and
``jax.experimental.pallas.triton`` APIs are used. jax 0.11.2 warns (DeprecationWarning) that the
Pallas Triton backend is deprecated in favour of Mosaic GPU; it still compiles and runs there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from ops.kda import _step_common

# Measured on an H200 (jax 0.11.2, HV = 32, K = V = 128, 200 steps in one jitted fori_loop):
# at B = 64 the step takes 90 us with block_v = 32, 81 us with 64 (floor 62 us, XLA reference
# 116 us); at B = 128, 178 us vs 157 us (floor 125 us, reference 215 us). block_v = 16 is much
# slower (143 us at B = 64: 64-byte rows), 128 no better than 64 and very slow at 2 warps (spills).
# At B <= 16 every setting measured the same within the loop's own overhead (~10 us per step).
DEFAULT_BLOCK_V = 64


def _num_warps(key_dim: int, block_v: int) -> int:
  """Warps per program: about 32 state elements per thread, between 1 and 4 warps.

  On an H200 at K = 128, block_v = 64, 2, 4 and 8 warps measured the same (81-82 us at B = 64);
  8 warps were 25% slower than 4 at block_v = 128, hence the cap.
  """
  return max(1, min(4, (key_dim * block_v) // (32 * 32)))


def _step_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, state_ref, o_ref, new_state_ref):
  """One program: state block [K, block_v], vectors q, k, g [K], v [block_v], beta [1]."""
  f32 = jnp.float32
  q = q_ref[...].astype(f32)
  k = k_ref[...].astype(f32)
  g = g_ref[...].astype(f32)
  v = v_ref[...].astype(f32)
  beta = beta_ref[...].astype(f32)  # [1], broadcasts against [K]
  state = state_ref[...] * jnp.exp(g)[:, None]
  predicted = jnp.sum(state * k[:, None], axis=0)  # S^T k, [block_v]
  state = state + (beta * k)[:, None] * (v - predicted)[None, :]
  o_ref[...] = jnp.sum(state * q[:, None], axis=0).astype(o_ref.dtype)
  new_state_ref[...] = state


def update(state, q, k, v, g, beta, *, interpret: bool | None = None,
           block_v: int = DEFAULT_BLOCK_V, num_warps: int | None = None):
  """One KDA token for every (batch, value head), fused in one Pallas Triton kernel.

  Args:
    state: [B, HV, K, V] float32.
    q, k, g: [B, HV, K] (q scaled, q and k repeated to the value heads); v: [B, HV, V];
      beta: [B, HV]. float32 or bfloat16; cast to float32 in the kernel.
    interpret: run Pallas' interpreter; None means when the default backend is not "gpu".
    block_v: value channels per program, a power of two (capped at V rounded up to one).
    num_warps: Triton warps per program; None picks from the block size.

  Returns:
    (o [B, HV, V] float32, new state [B, HV, K, V] float32), as ``reference.update``.
  """
  B, HV, K, V = _step_common.check_inputs(state, q, k, v, g, beta)
  if block_v < 1 or block_v & (block_v - 1):
    raise ValueError(f"block_v must be a power of two, got {block_v}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  block_v = min(block_v, _step_common.next_power_of_2(V))
  key_pad = _step_common.next_power_of_2(K) - K
  value_pad = -V % block_v
  if num_warps is None:
    num_warps = _num_warps(K + key_pad, block_v)
  return _update(state, q, k, v, g, beta, key_pad=key_pad, value_pad=value_pad,
                 block_v=block_v, num_warps=num_warps, interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=("key_pad", "value_pad", "block_v", "num_warps",
                                             "interpret"))
def _update(state, q, k, v, g, beta, *, key_pad, value_pad, block_v, num_warps, interpret):
  B, HV, K, V = state.shape
  state, q, k, v, g = _step_common.pad(state, q, k, v, g, key_pad=key_pad, value_pad=value_pad)
  Kp, Vp = K + key_pad, V + value_pad
  beta = beta.reshape(B, HV, 1)

  vector = pl.BlockSpec((None, None, Kp), lambda b, h, j: (b, h, 0))
  value = pl.BlockSpec((None, None, block_v), lambda b, h, j: (b, h, j))
  scalar = pl.BlockSpec((None, None, 1), lambda b, h, j: (b, h, 0))
  state_block = pl.BlockSpec((None, None, Kp, block_v), lambda b, h, j: (b, h, 0, j))
  o, state = pl.pallas_call(
      _step_kernel,
      out_shape=(jax.ShapeDtypeStruct((B, HV, Vp), jnp.float32),
                 jax.ShapeDtypeStruct((B, HV, Kp, Vp), jnp.float32)),
      grid=(B, HV, Vp // block_v),
      in_specs=[vector, vector, value, vector, scalar, state_block],
      out_specs=(value, state_block),
      input_output_aliases={5: 1},  # the state (input 5) is overwritten by the new state
      compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="kda_decode_step",
  )(q, k, v, g, beta, state)
  return _step_common.unpad(o, state, K, V)
