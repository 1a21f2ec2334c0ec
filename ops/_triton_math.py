"""Arithmetic for the Pallas Triton (``"pallas_gpu"``) kernels that the compiler would not emit.

XLA's Triton compiles without floating-point contraction: ``a * b + c`` in a kernel becomes a
multiply and an add, two instructions and two roundings (an H200 profile of the selective scan's
forward counted 150 unfused and 20 fused float32 instructions per token). ``fma`` writes the
fused multiply-add as one PTX instruction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu_triton

F32 = jnp.float32


def fma(a, b, c, *, interpret: bool):
  """``a * b + c`` in float32 with one rounding (PTX ``fma.rn.f32``), broadcast to the operands'
  common shape (at least 1-D inside a kernel). ``interpret``: the kernel runs in the Pallas
  interpreter (CPU), where inline PTX cannot run; there it is ``a * b + c``."""
  if interpret:
    return a * b + c
  shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(c))
  args = [jnp.broadcast_to(jnp.asarray(x, F32), shape) for x in (a, b, c)]
  [result] = plgpu_triton.elementwise_inline_asm(
      "fma.rn.f32 $0, $1, $2, $3;", args=args, constraints="=f,f,f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(shape, F32)])
  return result
