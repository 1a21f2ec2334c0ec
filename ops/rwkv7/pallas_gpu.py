"""Chunkwise RWKV-7 as Pallas GPU kernels (implementation ``"pallas_gpu"``), SPEC 2.5.

KDA's four Triton stages (``ops.kda.pallas_gpu.walk``, one kernel module for both ops) on
RWKV-7's chunk mathematics (``ops.rwkv7._kernel_chunk``): work parallel over chunks, and one walk
over the chunks that carries the state. This module is RWKV-7's ``TritonOp``: its primitives, how
it loads a chunk, its gradients' order and how its chunk matrices are kept.

  intra forward    grid (B, H, chunks)   per chunk, by 16-row sub-chunks
                                         (``ops.rwkv7._kernel_subchunk``): G, G~, A_ab, A_ak,
                                         A_rb, A_rk, T = (I - A_ab)^-1, W, U = T (A_ak v),
                                         Y = A_rk v, r exp(G), b and k times exp(G_C - G),
                                         exp(G_C)
  state forward    grid (B, H, V/BV)     walks the chunks: X = U + W S, o = (r exp(G)) S + A_rb X
                                         + Y, S' = exp(G_C) S + (b exp(G_C - G))^T X
                                         + (k exp(G_C - G))^T v (keeps S and X per chunk)
  state backward   two kernels, KDA's:   a reverse walk (grid (B, H, V/BV)) keeping the dS
                                         after every chunk and dX (dU), then every chunk's
                                         cotangents of those matrices and dv's part through
                                         the state from S, dS, X and dX (grid (B, H, chunks),
                                         the value blocks summed in a loop)
  intra backward   grid (B, H, chunks)   per chunk, by 16-row sub-chunks: recomputes the
                                         chunk's matrices and takes those cotangents (dY is dO
                                         itself) to dr, dw, dk, dv, da, db

Why the Triton backend: KDA's (``ops.kda.pallas_gpu``), the same kernels; so are the launch
settings (``ops.kda.pallas_gpu.LAUNCH``), not yet tuned for RWKV-7, except that its state forward
keeps 2 pipeline stages (``"rwkv7.state_forward"``: its four [C, K] fields a chunk would pass the
shared memory at K = 128 with KDA's 3).

Precision: KDA's (``ops.kda.pallas_gpu.precision_for``): float32 inputs run three TF32 passes,
16-bit inputs bfloat16 operands with a TF32 triangular inverse, and the chunk matrices are stored
in v's dtype (A_rb in float32). G~ = shift(G) is a one-hot product in IEEE float32
(``F32_F32_F32``), exact, so that exp(G~_t - G_{t-1}) is exactly 1. In interpret mode (CPU)
every product is exact float32.

Cost per chunk and head (C = 64, K = V = 64): the intra forward does 6 levels x 4 pair products
(C K C) = 12.6 MFLOP, 6 x 2 inverse products (C C C) = 6.3 MFLOP, W, A_ak v, T (A_ak v) and
A_rk v = 2.1 MFLOP and the shift (C C K, IEEE float32) 0.5 MFLOP; the state forward
W S, r S, A_rb X, b^T X, k^T v = 2.6 MFLOP. Bytes: the inputs once; W, U, r exp(G), Y,
b exp(G_C - G), k exp(G_C - G) (v's dtype) and A_rb (float32) written once and read once per
value block; the state kernels read v itself for the chunk matrices' ``values``.
"""

from __future__ import annotations

import jax

from ops.kda import pallas_gpu as kda_gpu
from ops.kda.pallas_gpu import F32, Field, default_interpret, unsupported
from ops.rwkv7 import _kernel_chunk as chunk_math
from ops.rwkv7 import _kernel_subchunk

__all__ = ["default_interpret", "scan", "unsupported"]


def _primitives(precision: kda_gpu.Precision):
  """KDA's Triton primitives with the exact row shift."""

  def shift(x):
    return jax.lax.dot_general(chunk_math.shift_matrix(x.shape[0]), x, (((1,), (0,)), ((), ())),
                               precision=jax.lax.DotAlgorithmPreset.F32_F32_F32,
                               preferred_element_type=F32)

  return kda_gpu.primitives(precision)._replace(shift=shift)


_K = Field("K")
RWKV7 = kda_gpu.TritonOp(
    name="rwkv7", primitives=_primitives, math=chunk_math, value_index=5,
    fields=chunk_math.ChunkMatrices(
        W=_K, U=Field("V", F32, cotangent_is="d_shared"), Rg=_K, A=Field("C", F32),
        Y=Field("V", cotangent_is="dO"),
        Bg=_K, Kg=_K, values=Field("V", token=5), decay=Field("chunk", F32)),
    sub_chunks=_kernel_subchunk)


def scan(r, w, k, v, a, b, initial_state, segment_index, *, scale: float, chunk_size: int = 64,
         interpret: bool | None = None):
  """RWKV-7 over sequences with the Pallas Triton kernels.

  Args:
    r, w, k, a, b: [B, T, H, K], any float dtype; r unscaled, w the log decay (<= 0).
    v: [B, T, H, V]; its dtype is the output's, the stored chunk matrices' and decides the
      products' precision.
    initial_state: [B, H, K, V] float32.
    segment_index: None, or [B, T] non-decreasing int32; the state restarts from zero where it
      steps up.
    scale: the receptance scale, applied in the kernels.
    chunk_size: tokens per chunk, a power of two >= 16.
    interpret: run the kernels in Pallas interpret mode; None: unless the backend is a GPU.

  Returns:
    o [B, T, H, V] in v's dtype and the final state [B, H, K, V] float32.
  """
  return kda_gpu.walk(RWKV7, (r, w, k, a, b, v), initial_state, segment_index, scale=scale,
                      chunk_size=chunk_size, interpret=interpret)

