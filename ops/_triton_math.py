"""Arithmetic for the Pallas Triton (``"pallas_gpu"``) kernels that the compiler would not emit.

XLA's Triton compiles without floating-point contraction: ``a * b + c`` in a kernel becomes a
multiply and an add, two instructions and two roundings (an H200 profile of the selective scan's
forward counted 150 unfused and 20 fused float32 instructions per token). ``fma`` writes the
fused multiply-add as one PTX instruction. Its ``exp`` and ``1 / x`` are libdevice's ``expf``
(about ten instructions around one ``ex2``) and a division with range checks (about seven around
one ``rcp``); ``exp`` and ``reciprocal`` here are the bare special-function instructions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu_triton

F32 = jnp.float32


def _ptx(instruction: str, *operands):
  """The float32 PTX ``instruction`` ($0 the result, $1... the operands) on the operands
  broadcast to their common shape (at least 1-D inside a kernel). PTX cannot run in the Pallas
  interpreter (CPU); there the kernels take jnp's forms instead."""
  shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in operands))
  args = [jnp.broadcast_to(jnp.asarray(x, F32), shape) for x in operands]
  [result] = plgpu_triton.elementwise_inline_asm(
      instruction, args=args, constraints="=f" + ",f" * len(args), pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(shape, F32)])
  return result


def fma(a, b, c):
  """``a * b + c`` in float32 with one rounding (PTX ``fma.rn.f32``)."""
  return _ptx("fma.rn.f32 $0, $1, $2, $3;", a, b, c)


def reciprocal(x):
  """``1 / x`` in float32 to within one unit in the last place (PTX ``rcp.approx.ftz.f32``:
  subnormal inputs and results flush to zero)."""
  return _ptx("rcp.approx.ftz.f32 $0, $1;", x)


def exp(x):
  """e^x as ``exp2(x log2(e))``: one multiply and one ``ex2`` (relative error about |x| 2^-24
  from the product's rounding, against ``expf``'s 2 units in the last place)."""
  return jnp.exp2(x * math.log2(math.e))
