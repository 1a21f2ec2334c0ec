"""Tests of the fused KDA decode-step kernels: ``ops.kda.pallas_gpu_step.update`` (Pallas, Triton
backend) and ``ops.kda.pallas_tpu_step.update`` (Pallas, Mosaic TPU backend).

Both kernels have one contract, so one test base (``DecodeKernelBase``) holds the properties and
each kernel's class subclasses it, adding only its blocking options (``block_v`` on the GPU,
``block_h`` on the TPU). On CPU each kernel runs in its Pallas interpreter (``interpret=None``
picks it: the Triton interpreter for the GPU kernel, TPU interpret mode for the TPU kernel); on
its own hardware it is compiled; the tests are the same. Properties checked:

* one step equals ``ops.kda.reference.update`` in output and new state, over drawn shapes (K and
  V powers of two or not, so the padding paths run; several V blocks per head on the GPU, one or
  several heads per program on the TPU), input dtypes (float32 and bfloat16 q, k, v, g, beta)
  and gates (mild, and strong decay down to -20 per token with exact zeros mixed in);
* every element of the new state and of the output is written: each is compared on its own
  (no RMS averaging) on inputs where every state element changes, through the padded and the
  unpadded paths, and with the state buffer donated (the in-place path);
* several steps chained equal ``ops.kda.kda(..., implementation="reference")`` over the same
  tokens (GVA, L2 norm, a custom scale, an initial state);
* a fixed case compiled and op by op (chex variants);
* malformed arguments raise ``ValueError``;
* TPU only: the kernel lowers to Mosaic for a real TPU (``jax.export`` with
  ``platforms=["tpu"]`` on the CPU host, ``interpret=False``) at K = V = 128, and the default
  heads per program.

Tolerances (relative RMS error, tests/_numerics.py). The kernels cast their inputs to float32 and
then do the reference's float32 arithmetic, so against ``reference.update`` fed the same values
(bfloat16 inputs cast to float32 first) the error is float32 rounding of the sums' order alone:
TOL_F32 (1e-5) for both input dtypes, stricter than the bfloat16 1e-2 a rounded input would get.
Only ``kda``'s output, returned in v's dtype, is held to ``num.tolerance`` (1e-2 for bfloat16).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given
from hypothesis import strategies as st

from ops.kda import _prepare, kda, reference
from ops.kda import pallas_gpu_step, pallas_tpu_step
from tests import _numerics as num

TOL_F32 = num.TOL_F32


def make_step_inputs(rng, batch, heads, key_dim, value_dim, dtype="float32", gate="mild",
                     state_scale=1.0):
  """Prepared-layout inputs: (state f32, q, k, v, g, beta in ``dtype``), as ``update`` takes."""
  shape = (batch, heads, key_dim)
  q = num.normal(rng, shape, dtype, scale=key_dim ** -0.5)
  k = num.normal(rng, shape, jnp.float32)
  k = (k * jax.lax.rsqrt(jnp.sum(k * k, -1, keepdims=True) + 1e-6)).astype(dtype)
  v = num.normal(rng, (batch, heads, value_dim), dtype)
  if gate == "mild":  # fla's tests: logsigmoid(N(0, 1)) / 16
    g = jax.nn.log_sigmoid(num.normal(rng, shape)) / 16
  else:  # strong decay down to -20 per token, a quarter of the channels exactly 0
    g = num.uniform(rng, shape, -20.0, 0.0)
    g = jnp.where(num.uniform(rng, shape, 0.0, 1.0) < 0.25, 0.0, g)
  g = g.astype(dtype)
  beta = jax.nn.sigmoid(num.normal(rng, (batch, heads))).astype(dtype)
  state = num.normal(rng, (batch, heads, key_dim, value_dim), jnp.float32, scale=state_scale)
  return state, q, k, v, g, beta


def reference_step(state, *inputs):
  return reference.update(state, *(x.astype(jnp.float32) for x in inputs))


def assert_step_matches(update, inputs, **kwargs):
  ref_o, ref_state = reference_step(*inputs)
  o, new_state = update(*inputs, **kwargs)
  assert o.shape == ref_o.shape and o.dtype == jnp.float32
  assert new_state.shape == ref_state.shape and new_state.dtype == jnp.float32
  num.assert_close(ref_o, o, TOL_F32, "o")
  num.assert_close(ref_state, new_state, TOL_F32, "state")


def _bad(change):
  inputs = dict(zip(("state", "q", "k", "v", "g", "beta"),
                    make_step_inputs(np.random.default_rng(0), 1, 2, 8, 8)))
  return {**inputs, **change(inputs)}


BAD_INPUTS = {
    "state dtype": (lambda a: {"state": a["state"].astype(jnp.bfloat16)}, "state must be float32"),
    "state rank": (lambda a: {"state": a["state"][0]}, "state must have shape"),
    "k shape": (lambda a: {"k": a["k"][..., :4]}, "k must have shape"),
    "v shape": (lambda a: {"v": a["v"][..., :4]}, "v must have shape"),
    "beta shape": (lambda a: {"beta": a["beta"][..., None]}, "beta must have shape"),
}


class DecodeKernelBase:
  """The properties every fused decode kernel shares; one subclass per kernel module.

  ``module`` is the kernel under test. ``block_options(index, heads)`` maps a drawn index 0..2 to
  that kernel's blocking keywords; ``WRITE_CASES`` are (key_dim, value_dim, options, donate) of
  the every-element test (batch 2, 3 heads); ``BAD_OPTIONS`` are (options, error pattern).
  """

  module = None
  WRITE_CASES: tuple = ()
  BAD_OPTIONS: tuple = ()

  def block_options(self, index: int, heads: int) -> dict:
    raise NotImplementedError

  # --- one step against the reference ---------------------------------------------------------

  @given(batch=st.integers(1, 2), heads=st.integers(1, 3),
         key_dim=st.sampled_from([8, 16, 20, 32]), value_dim=st.sampled_from([8, 24, 32, 40]),
         blocking=st.integers(0, 2), dtype=num.float_dtypes(),
         gate=st.sampled_from(["mild", "strong"]), seed=num.seeds())
  def test_step_matches_reference(self, batch, heads, key_dim, value_dim, blocking, dtype, gate,
                                  seed):
    inputs = make_step_inputs(np.random.default_rng(seed), batch, heads, key_dim, value_dim,
                              dtype, gate)
    assert_step_matches(self.module.update, inputs, **self.block_options(blocking, heads))

  # --- every element written ------------------------------------------------------------------

  @pytest.mark.parametrize("case", range(3))
  def test_every_element_is_written(self, case):
    """Each output element equals the reference on its own, and every state element changed.

    The gate is strictly negative and beta > 0, so every new state element differs from the old
    one: a block the kernel left unwritten would keep the old value (the state buffer is aliased
    to the output) and fail the elementwise comparison.
    """
    key_dim, value_dim, options, donate = self.WRITE_CASES[case]
    rng = np.random.default_rng(key_dim * value_dim + case)
    state, q, k, v, _, beta = make_step_inputs(rng, 2, 3, key_dim, value_dim)
    g = num.uniform(rng, q.shape, -3.0, -0.5)
    old_state = np.asarray(state)
    ref_o, ref_state = (np.asarray(x) for x in reference_step(state, q, k, v, g, beta))
    step = functools.partial(self.module.update, **options)
    if donate:
      step = jax.jit(step, donate_argnums=0)
    o, new_state = (np.asarray(x) for x in step(state, q, k, v, g, beta))
    assert np.all(new_state != old_state)
    np.testing.assert_allclose(new_state, ref_state, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(o, ref_o, rtol=1e-5, atol=1e-6)

  # --- chained steps against the sequence op --------------------------------------------------

  @pytest.mark.parametrize("dtype", num.FLOAT_DTYPES)
  def test_chained_steps_equal_sequence(self, dtype):
    """``_prepare`` (as ``kda_step`` does) then ``update`` token by token equals ``kda``.

    GVA (H = 2 q/k heads, HV = 4 value heads), the in-kernel L2 norm, a custom scale and an
    initial state; K = 20 and V = 24 take the padded paths. v, g and beta reach the kernel in
    their own dtype.
    """
    rng = np.random.default_rng(11)
    batch, time, heads, value_heads, key_dim, value_dim, scale = 2, 4, 2, 4, 20, 24, 0.3
    q, k = (num.normal(rng, (batch, time, heads, key_dim), dtype) for _ in range(2))
    v = num.normal(rng, (batch, time, value_heads, value_dim), dtype)
    g = (jax.nn.log_sigmoid(num.normal(rng, (batch, time, value_heads, key_dim))) / 4
         ).astype(dtype)
    beta = jax.nn.sigmoid(num.normal(rng, (batch, time, value_heads))).astype(dtype)
    state = num.normal(rng, (batch, value_heads, key_dim, value_dim))
    ref_o, ref_state = kda(q, k, v, g, beta, scale=scale, initial_state=state,
                           return_final_state=True, use_qk_l2norm_in_kernel=True,
                           implementation="reference")
    step = jax.jit(self.module.update)
    for t in range(time):
      q_t, k_t, *_ = _prepare(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], heads,
                              value_heads, key_dim, scale, True)
      o_t, state = step(state, q_t, k_t, v[:, t], g[:, t], beta[:, t])
      o_t = o_t.astype(v.dtype)
      num.assert_close(ref_o[:, t], o_t, num.tolerance(o_t), f"o[{t}]")
    num.assert_close(ref_state, state, TOL_F32, "final_state")

  # --- argument errors ------------------------------------------------------------------------

  @pytest.mark.parametrize("change, pattern", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
  def test_bad_argument_raises(self, change, pattern):
    with pytest.raises(ValueError, match=pattern):
      self.module.update(**_bad(change))

  def test_bad_option_raises(self):
    for options, pattern in self.BAD_OPTIONS:
      with pytest.raises(ValueError, match=pattern):
        self.module.update(**_bad(lambda a: {}), **options)


class TestPallasGpuStep(DecodeKernelBase):
  """The Triton kernel (``ops.kda.pallas_gpu_step``); the Triton interpreter off a GPU."""

  module = pallas_gpu_step
  WRITE_CASES = (
      (16, 32, {"block_v": 8}, False),   # no padding, four V blocks per head
      (20, 24, {"block_v": 16}, False),  # K and V padded, then sliced back
      (16, 32, {"block_v": 16}, True),   # the state donated: overwritten in place
  )
  BAD_OPTIONS = (({"block_v": 24}, "block_v must be a power of two"),)

  def block_options(self, index, heads):
    return {"block_v": (8, 16, 32)[index]}


class TestPallasTpuStep(DecodeKernelBase):
  """The Mosaic TPU kernel (``ops.kda.pallas_tpu_step``); TPU interpret mode off a TPU."""

  module = pallas_tpu_step
  WRITE_CASES = (
      (16, 32, {"block_h": 1}, False),  # no padding, one head per program (3 per batch row)
      (20, 24, {"block_h": 3}, False),  # K padded to 24, then sliced back; all heads in one
      (16, 32, {"block_h": 3}, True),   # the state donated: overwritten in place
  )
  BAD_OPTIONS = (({"block_h": 3}, "block_h must be a positive divisor of HV=2"),
                 ({"block_h": 0}, "block_h must be a positive divisor"))

  def block_options(self, index, heads):
    return {"block_h": (None, 1, heads)[index]}

  @pytest.mark.parametrize("dtype", num.FLOAT_DTYPES)
  def test_lowers_to_mosaic_for_tpu(self, dtype):
    """``interpret=False`` at K = V = 128 (HV = 32: two programs of 16 heads per row) exports
    for a TPU from this CPU host: the Pallas -> Mosaic lowering accepts every primitive and
    block. (libtpu's own layout passes run only on a TPU.)"""
    inputs = make_step_inputs(np.random.default_rng(3), 2, 32, 128, 128, dtype)
    exported = num.export_for_tpu(functools.partial(pallas_tpu_step.update, interpret=False),
                                  *inputs)
    assert [tuple(a.shape) for a in exported.out_avals] == [(2, 32, 128), (2, 32, 128, 128)]

  @pytest.mark.parametrize("heads, key_dim, value_dim, expected", [
      (32, 128, 128, 16),  # 16 heads of 64 KiB: a 1 MiB state block
      (32, 128, 256, 8),   # 128 KiB heads: 8 fit in 1 MiB
      (24, 128, 128, 8),   # 12 divides 24 but is not a multiple of 8: 8 is preferred
      (12, 64, 64, 12),    # all heads (a full-dim block)
      (7, 16, 16, 7),
      (31, 128, 128, 1),   # a prime: one head per program
  ])
  def test_default_block_h(self, heads, key_dim, value_dim, expected):
    assert pallas_tpu_step.default_block_h(heads, key_dim, value_dim) == expected


# --- a fixed case, compiled and op by op ------------------------------------------------------

class FixedCaseTest(chex.TestCase, parameterized.TestCase):
  """One fixed case (GVA-sized heads, K = V = 32, two V blocks / two head groups), compiled and
  op by op, for each kernel."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("gpu", pallas_gpu_step.update, {"block_v": 16}),
      ("tpu", pallas_tpu_step.update, {"block_h": 2}),
  )
  def test_fixed_case(self, update, options):
    inputs = make_step_inputs(np.random.default_rng(7), 2, 4, 32, 32, "bfloat16")
    run = self.variant(functools.partial(update, **options))
    ref_o, ref_state = reference_step(*inputs)
    o, new_state = run(*inputs)
    num.assert_close(ref_o, o, TOL_F32, "o")
    num.assert_close(ref_state, new_state, TOL_F32, "state")
