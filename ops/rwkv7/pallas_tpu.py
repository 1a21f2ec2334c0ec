"""Chunkwise RWKV-7 as Pallas TPU (Mosaic) kernels (implementation ``"pallas_tpu"``), SPEC 2.5.

KDA's TPU chunk walks (``ops.kda.pallas_tpu.walk``, one kernel module for both ops) on RWKV-7's
chunk mathematics (``ops.rwkv7._kernel_chunk``): two kernels, each one walk over the chunks with
the state in VMEM scratch.

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

import jax

from ops.kda import pallas_tpu as kda_tpu
from ops.kda.pallas_tpu import default_interpret, unsupported
from ops.rwkv7 import _kernel_chunk as chunk_math

HIGHEST = jax.lax.Precision.HIGHEST

__all__ = ["default_interpret", "scan", "unsupported"]


def _primitives(dtype, interpret: bool):
  """KDA's TPU primitives with the exact row shift."""
  prims = kda_tpu.primitives(dtype, interpret)
  return prims._replace(shift=lambda x: prims.dot(chunk_math.shift_matrix(x.shape[0]), x,
                                                  precision=HIGHEST))


RWKV7 = kda_tpu.ChunkOp(primitives=_primitives, math=chunk_math, value_index=5)


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
  return kda_tpu.walk(RWKV7, (r, w, k, a, b, v), initial_state, segment_index, scale=scale,
                      chunk_size=chunk_size, interpret=interpret)
