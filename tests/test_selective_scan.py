"""Tests of ``ops.selective_scan`` against SPEC.md 1.2 (Mamba-1 selective scan), time-major layout.

The ground truth is ``oracle`` below: SPEC 1.2 transcribed token by token in float64 NumPy,
independent of the op's code. Properties checked:

* "reference" equals the oracle over drawn cases, and every form does on fixed cases, compiled
  and op by op (output and final state);
* "xla", "pallas_gpu" and "pallas_tpu" equal "reference" in output, final state and the gradient
  of every float input (one test class, ``AgreementBase``, subclassed per implementation); the
  Pallas kernels run in their interpreters on CPU, and the TPU kernels also lower for a TPU;
* ``implementation=None`` on TPU picks "pallas_tpu", or warns and falls back for a shape it
  does not support, which naming it refuses;
* a packed batch with ``segment_ids`` equals running each segment on its own;
* ``selective_scan_step`` token by token equals the full forward;
* the kernels' branch-free softplus and their sigmoid, in jnp's primitives and the GPU kernels',
  match float64;
* malformed arguments raise a ``ValueError`` that names the argument.

Tolerances (relative RMS error, tests/_numerics.py). A float32 result, value or gradient: 1e-5.
Rounding in float32 gives errors near 1e-7 (measured: at most 6e-7 over 40 drawn cases, for
outputs, states and every gradient, dA worst); the margin allows for longer products of decays
and sums over batch and time taken in another order. A form that exponentiates unreferenced
cumulative sums of the log decay (SPEC 3.5) would lose about |cumsum| x 6e-8 and fail.
A bfloat16 result: 1e-2, a few bf16 ulps (2^-8 = 3.9e-3 apart; measured at most 2.4e-3).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from ops.selective_scan import _kernel_math as km
from ops.selective_scan import pallas_gpu, pallas_tpu, selective_scan, selective_scan_step
from tests import _numerics as num

pytestmark = pytest.mark.compile_bound  # conftest: XLA's optimisation passes off

TOL_F32, tolerance = num.TOL_F32, num.tolerance
IMPLEMENTATIONS = ("reference", "xla", "pallas_gpu", "pallas_tpu")
# Fixed oracle cases the kernels also run (interpret mode is slow; their drawn cases are in the
# agreement classes): "pallas_tpu" cannot run the grouped case (channels per group below 128).
KERNEL_ORACLE_CASES = {"pallas_gpu": ("grouped_all_options",),
                       "pallas_tpu": ("single_token", "bfloat16_past_chunk")}
DIFFERENTIABLE = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
TIME_MAJOR = ("u", "delta", "B", "C", "z")  # the arguments with a time axis (axis 1)


# --- the float64 oracle (SPEC 1.2) ------------------------------------------------------------

def _per_channel(x, channels: int) -> np.ndarray:
  """B or C as float64 [batch, time, channels, state]; channel d reads group d // (d_all/groups)."""
  x = num.to_f64(x)
  if x.ndim == 3:
    x = x[:, :, None]
  return np.repeat(x, channels // x.shape[2], axis=2)


def oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
           initial_state=None, segment_ids=None):
  """SPEC 1.2 in float64 NumPy, one token at a time. Returns (out, final_state)."""
  u, delta, A = num.to_f64(u), num.to_f64(delta), num.to_f64(A)
  batch, time, channels = u.shape
  B, C = _per_channel(B, channels), _per_channel(C, channels)
  dt = delta if delta_bias is None else delta + num.to_f64(delta_bias)
  if delta_softplus:
    dt = np.logaddexp(0.0, dt)
  x = (np.zeros((batch, channels, A.shape[1])) if initial_state is None
       else num.to_f64(initial_state))
  y = np.zeros((batch, time, channels))
  for t in range(time):
    if segment_ids is not None and t > 0:
      starts = np.asarray(segment_ids[:, t]) != np.asarray(segment_ids[:, t - 1])
      x = np.where(starts[:, None, None], 0.0, x)
    x = np.exp(dt[:, t, :, None] * A) * x + (dt[:, t] * u[:, t])[:, :, None] * B[:, t]
    y[:, t] = np.sum(x * C[:, t], axis=-1)
  if D is not None:
    y = y + num.to_f64(D) * u
  if z is not None:
    z = num.to_f64(z)
    y = y * z / (1.0 + np.exp(-z))
  return y, x


# --- problem cases ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
  """One problem: shapes, dtype of u/delta/z/B/C, options, and the seed of its random inputs.

  ``groups = 0`` gives B and C without a group axis ([batch, time, state]).
  """

  batch: int = 2
  time: int = 9
  channels: int = 4
  state: int = 3
  groups: int = 0
  dtype: str = "float32"
  delta_softplus: bool = True
  with_D: bool = True
  with_z: bool = True
  with_delta_bias: bool = True
  with_initial_state: bool = True
  with_segment_ids: bool = False
  seed: int = 0

  def arrays(self) -> dict:
    """The array arguments of ``selective_scan`` (those the options switch on)."""
    rng = np.random.default_rng(self.seed)
    b, t, d, n = self.batch, self.time, self.channels, self.state
    bc_shape = (b, t, n) if self.groups == 0 else (b, t, self.groups, n)
    if self.delta_softplus:  # softplus(N(-2, 0.5) + bias) ~ 0.05 .. 0.5
      delta = num.normal(rng, (b, t, d), self.dtype, scale=0.5, loc=-2.0)
      bias = num.normal(rng, (d,), scale=0.5)
    else:  # delta must stay positive without the softplus
      delta = num.uniform(rng, (b, t, d), 0.001, 0.3, self.dtype)
      bias = num.uniform(rng, (d,), 0.0, 0.05)
    arrays = dict(
        u=num.normal(rng, (b, t, d), self.dtype), delta=delta,
        A=-jnp.exp(num.uniform(rng, (d, n), np.log(0.5), np.log(16.0))),
        B=num.normal(rng, bc_shape, self.dtype), C=num.normal(rng, bc_shape, self.dtype),
        D=num.normal(rng, (d,)), z=num.normal(rng, (b, t, d), self.dtype), delta_bias=bias,
        initial_state=num.normal(rng, (b, d, n)),
        segment_ids=num.random_segment_ids(rng, b, t))
    optional = dict(D=self.with_D, z=self.with_z, delta_bias=self.with_delta_bias,
                    initial_state=self.with_initial_state, segment_ids=self.with_segment_ids)
    return {k: v for k, v in arrays.items() if optional.get(k, True)}


@st.composite
def cases(draw, max_batch: int = 3, max_time: int | None = None, grouped: bool = True) -> Case:
  """Cases of drawn shapes (lengths off the chunk multiples included), dtype and options.

  ``max_time`` keeps the lengths at most that; ``grouped=False`` draws one group at most
  (B and C without or with a group axis of 1).
  """
  channels = draw(st.integers(1, 16))
  lengths = [n for n in num.SEQ_LENGTHS if max_time is None or n <= max_time]
  return Case(
      batch=draw(st.integers(1, max_batch)), time=draw(st.sampled_from(lengths)),
      channels=channels, state=draw(st.integers(1, 16)),
      groups=draw(st.just(0) | (num.divisors(channels) if grouped else st.just(1))),
      dtype=draw(num.float_dtypes()), delta_softplus=draw(st.booleans()),
      with_D=draw(st.booleans()), with_z=draw(st.booleans()),
      with_delta_bias=draw(st.booleans()), with_initial_state=draw(st.booleans()),
      with_segment_ids=draw(st.booleans()), seed=draw(num.seeds()))


# --- jitted runners (module level, so equal shapes reuse the compilation) ---------------------

@functools.partial(jax.jit, static_argnames=("implementation", "delta_softplus"))
def _forward(arrays, *, implementation, delta_softplus):
  """(out, final_state) of ``selective_scan``."""
  return selective_scan(**arrays, delta_softplus=delta_softplus, return_final_state=True,
                        implementation=implementation)


@functools.partial(jax.jit, static_argnames=("implementation", "delta_softplus"))
def _forward_and_vjp(arrays, cotangents, *, implementation, delta_softplus):
  """((out, final_state), gradients of every float array) for the cotangents of both outputs."""
  forward = lambda x: _forward(x, implementation=implementation, delta_softplus=delta_softplus)
  return num.vjp_of(forward, arrays, cotangents, DIFFERENTIABLE)


def _random_cotangents(case: Case, stream: int = 1):
  """Random cotangents for (out [u's dtype], final_state [float32]); ``stream`` picks an
  independent draw."""
  rng = np.random.default_rng([case.seed, stream])
  return (num.normal(rng, (case.batch, case.time, case.channels), case.dtype),
          num.normal(rng, (case.batch, case.channels, case.state)))


# --- the op equals the oracle -----------------------------------------------------------------

def _check_against_oracle(case: Case, run) -> None:
  """Compares ``run(arrays) -> (out, final_state)`` with the oracle, dtypes and shapes included."""
  arrays = case.arrays()
  out, final_state = run(arrays)
  ref_out, ref_state = oracle(**arrays, delta_softplus=case.delta_softplus)
  assert out.dtype == jnp.dtype(case.dtype), out.dtype
  assert final_state.dtype == jnp.float32, final_state.dtype
  num.assert_close(ref_out, out, tolerance(out), "out")
  num.assert_close(ref_state, final_state, TOL_F32, "final_state")


@given(case=cases())
def test_reference_matches_oracle(case):
  _check_against_oracle(case, functools.partial(
      _forward, implementation="reference", delta_softplus=case.delta_softplus))


ORACLE_CASES = dict(
    single_token=Case(batch=1, time=1, channels=1, state=1, delta_softplus=False, with_D=False,
                      with_z=False, with_delta_bias=False, with_initial_state=False),
    grouped_all_options=Case(time=37, channels=6, state=4, groups=3, with_segment_ids=True),
    bfloat16_past_chunk=Case(time=129, groups=1, dtype="bfloat16", delta_softplus=False,
                             with_z=False),
)


class OracleTest(chex.TestCase):
  """Fixed cases against the oracle, each run compiled and op by op (chex variants)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      *[dict(case_name=c, implementation=i) for c in ORACLE_CASES for i in IMPLEMENTATIONS
        if i not in KERNEL_ORACLE_CASES or c in KERNEL_ORACLE_CASES[i]],
      dict(case_name="grouped_all_options", implementation=None))
  def test_fixed_case(self, case_name, implementation):
    case = ORACLE_CASES[case_name]
    run = self.variant(functools.partial(
        selective_scan, delta_softplus=case.delta_softplus, return_final_state=True,
        implementation=implementation))
    _check_against_oracle(case, lambda arrays: run(**arrays))


# "pallas_tpu" shares "pallas_gpu"'s path through ``selective_scan`` (and is slow to compile).
@pytest.mark.parametrize("implementation", [i for i in IMPLEMENTATIONS if i != "pallas_tpu"])
def test_without_final_state_returns_out_only(implementation):
  """``return_final_state=False`` returns the output array alone."""
  arrays = Case(time=3).arrays()
  out = selective_scan(**arrays, delta_softplus=True, implementation=implementation)
  expected, _ = selective_scan(**arrays, delta_softplus=True, return_final_state=True,
                               implementation=implementation)
  assert isinstance(out, jax.Array)
  np.testing.assert_array_equal(expected, out)


# --- every other form equals "reference", gradients included ------------------------------------

class AgreementBase:
  """Output, final state and the gradient of every float input agree with "reference".

  Each non-reference implementation's test class subclasses this and sets ``implementation``.
  """

  __test__ = False  # collected only through the subclasses
  implementation: str

  def _check(self, case: Case) -> None:
    arrays, cotangents = case.arrays(), _random_cotangents(case)
    run = lambda implementation: _forward_and_vjp(
        arrays, cotangents, implementation=implementation, delta_softplus=case.delta_softplus)
    # The gradients' usual size, for a draw whose cotangent cancels one (see _numerics).
    _, scales = _forward_and_vjp(arrays, _random_cotangents(case, stream=2),
                                 implementation="reference", delta_softplus=case.delta_softplus)
    num.assert_forms_agree(run, arrays, DIFFERENTIABLE, self.implementation,
                           gradient_scales=scales)

  @given(case=cases())
  def test_matches_reference(self, case):
    self._check(case)

  # A fixed case with every optional input, so that each gradient is checked in every run.
  all_inputs_case = Case(batch=2, time=65, channels=8, state=16, groups=2, with_segment_ids=True,
                         seed=1)

  def test_matches_reference_all_inputs(self):
    self._check(self.all_inputs_case)


class TestXlaAgreement(AgreementBase):
  __test__ = True
  implementation = "xla"


class TestPallasGpuAgreement(AgreementBase):
  """The kernels run in the Pallas interpreter on CPU (compiled by Triton on GPU)."""

  __test__ = True
  implementation = "pallas_gpu"

  def test_tuning_settings_agree(self):
    """Several channel blocks per group (dB, dC summed over blocks) and chunks of 4 tokens."""
    case = Case(batch=2, time=11, channels=8, state=4, groups=2, with_segment_ids=True, seed=2)
    _check_kernel_settings(pallas_gpu, case, block_d=2, chunk=4)

  @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
  @pytest.mark.parametrize("prefetch", [0, 4])
  def test_state_prefetch_agrees(self, dtype, prefetch):
    """B and C of none or all of each chunk's tokens loaded a chunk ahead (the default: the
    first two), as stored or as bf16 pairs in words, with segments."""
    case = Case(batch=1, time=13, channels=8, state=6, dtype=dtype, seed=3)
    _check_kernel_settings(pallas_gpu, case, chunk=4, segments=2,
                           prefetch_state_tokens=prefetch)

  def test_state_prefetch_outside_the_chunk_raises(self):
    case = Case(batch=1, time=4, channels=4, state=2)
    with pytest.raises(ValueError, match="prefetch_state_tokens"):
      _kernel_call(pallas_gpu, case, chunk=4, prefetch_state_tokens=5)(case.arrays())

  @pytest.mark.parametrize("time, segments", [(21, 4), (9, 4), (16, 2)])
  def test_segments_agree(self, time, segments):
    """The forward split into segments walked in parallel, each entered with the state its
    predecessors' pass carries in: restarts inside and at segment ends, an initial state,
    padding that fills part of the last segment (21 tokens in 4 x 3 chunks of 2) or all of it
    (9 tokens in 4 x 2 chunks of 2), and no padding."""
    case = Case(batch=2, time=time, channels=4, state=4, with_segment_ids=True, seed=5)
    _check_kernel_settings(pallas_gpu, case, block_d=2, segments=segments, chunk=2)

  @given(case=cases(max_batch=2, max_time=65), segments=st.sampled_from([2, 4, 8]),
         chunk=st.sampled_from([1, 2, 4]))
  def test_drawn_segments_agree(self, case, segments, chunk):
    """Drawn cases (every optional input, dtype and length) with the time split into segments,
    so that the segments' first pass and its chaining meet what the default settings, one
    segment below 512 tokens, never do."""
    _check_kernel_settings(pallas_gpu, case, segments=segments, chunk=chunk)

  def test_default_block_d_splits_a_group(self):
    """A small grid through the public function: ``default_backward_block_d`` takes 4 of a
    group's 16 channels per program (the group's divisor alone would give 16), so dB and dC
    sum over four blocks; the forward takes all 16."""
    case = Case(batch=1, time=9, channels=16, state=4, groups=1, seed=3)
    assert pallas_gpu.default_forward_launch(case.batch, case.time, case.channels)[0] == 16
    assert pallas_gpu.default_backward_block_d(case.batch, case.channels) == 4
    self._check(case)

  def test_forward_and_backward_block_d_differ(self):
    """With rules that give the forward 2 channels per program, two a thread, and the backward
    8, the backward reads the forward's chunk states and finds each block's group of B and C
    at its own blocking."""
    case = Case(batch=1, time=6, channels=16, state=4, groups=2, seed=4)
    with (mock.patch.object(pallas_gpu, "FORWARD_LAUNCHES", ((2, 2),)),
          mock.patch.object(pallas_gpu, "BACKWARD_BLOCK_D_RULE", (8, 1))):
      assert pallas_gpu.default_forward_launch(case.batch, case.time, case.channels, 2) == (2, 1, 1)
      assert pallas_gpu.default_backward_block_d(case.batch, case.channels, 2) == 8
      self._check(case)


def test_default_backward_block_d():
  """The most channels per program (a power of two, at most the rule's most, dividing channels
  / groups) whose grid of batch * channels / block_d programs reaches the rule's target, but
  at least MIN_BLOCK_D unless the group's divisor is smaller."""
  backward = pallas_gpu.default_backward_block_d
  assert (pallas_gpu.BACKWARD_BLOCK_D_RULE, pallas_gpu.MIN_BLOCK_D) == ((32, 512), 4)
  assert backward(2, 2048) == 8  # the measured best at B2 D2048
  assert backward(8, 2048) == 32  # and at B8 D2048
  assert backward(64, 2048) == 32  # capped by the rule's most
  assert backward(64, 2048, 256) == 8  # 8 channels per group cap it
  assert backward(1, 64) == 4  # the floor
  assert backward(4, 14, 2) == 1  # a divisor below the floor


def test_default_forward_launch():
  """The first of FORWARD_LAUNCHES whose default segments keep WIDE_SEGMENT_TOKENS tokens, else
  the last: (block_d, warps for its channels a thread, segments)."""
  launch = pallas_gpu.default_forward_launch
  assert pallas_gpu.FORWARD_LAUNCHES == ((128, 2), (64, 1))
  assert pallas_gpu.WIDE_SEGMENT_TOKENS == 512
  assert launch(8, 8192, 2048) == (128, 2, 16)  # the measured best at B8 L8192 D2048
  assert launch(2, 4096, 2048) == (64, 2, 32)  # and at B2 L4096: 128 wide, segments of 128
  assert launch(1, 65536, 2048) == (128, 2, 128)  # one long row: 128 segments of 512 tokens
  assert launch(1, 512, 128) == (64, 2, 4)  # four segments of 128 tokens
  assert launch(8, 8192, 2048, 64) == (32, 1, 4)  # 32 channels per group: one warp
  assert launch(8, 8192, 96) == (32, 1, 64)  # 96 channels: blocks of their divisor, 32


def test_default_segments():
  """The fewest segments (a power of two) that give the forward FORWARD_PROGRAMS programs,
  each segment keeping at least MIN_SEGMENT_TOKENS tokens."""
  segments = pallas_gpu.default_segments
  assert (pallas_gpu.FORWARD_PROGRAMS, pallas_gpu.MIN_SEGMENT_TOKENS) == (2048, 128)
  assert segments(2, 4096, 2048 // 64) == 32  # the measured best at B2 L4096 D2048
  assert segments(8, 8192, 2048 // 128) == 16  # and at B8 L8192, 128 channels a program
  assert segments(64, 8192, 32) == 1  # the grid is full without
  assert segments(1, 1024, 1) == 8  # each keeps 128 tokens
  assert segments(1, 255, 1) == 1  # too short to split


@pytest.mark.parametrize("arith", ["exact", "pallas_gpu"])
def test_kernel_activations_match_float64(arith):
  """The kernels' branch-free softplus and their sigmoid, in jnp's primitives and in the GPU
  kernels' (interpret forms, with ``exp`` as ``exp2(x log2 e)``), against float64 over |x| <=
  60: relative error within (3 + |x|) 1e-7, the product x log2(e)'s rounding (|x| 6e-8)
  included; the device's approximate ``ex2`` and ``rcp`` add a few float32 ulps."""
  primitives = km.EXACT if arith == "exact" else pallas_gpu._arith(interpret=True)
  x = np.concatenate([np.linspace(-60, 60, 20001), [-1e-30, 0.0, 1e-30]]).astype(np.float32)
  x64 = x.astype(np.float64)
  expected = {"softplus": np.logaddexp(0.0, x64), "sigmoid": 1.0 / (1.0 + np.exp(-x64))}
  for name, want in expected.items():
    got = np.asarray(getattr(km, name)(jnp.asarray(x), primitives), np.float64)
    assert np.all(np.isfinite(got)), name
    np.testing.assert_array_less(np.abs(got - want) / want, 1e-7 * (3 + np.abs(x64)),
                                 err_msg=name)


def _kernel_call(module, case: Case, **options):
  """``arrays -> (out, final_state)`` calling a kernel module's ``selective_scan`` directly."""

  def call(x):
    ids = x.get("segment_ids")
    keep = None if ids is None else jnp.concatenate(
        [jnp.ones_like(ids[:, :1]), ids[:, 1:] == ids[:, :-1]], 1).astype(jnp.float32)
    B, C = (x[k] if case.groups else x[k][:, :, None] for k in ("B", "C"))
    return module.selective_scan(
        x["u"], x["delta"], x["A"], B, C, x.get("D"), x.get("z"), x.get("delta_bias"),
        case.delta_softplus, keep, x.get("initial_state"), **options)

  return call


def _check_kernel_settings(module, case: Case, **options) -> None:
  """The kernels called with non-default settings agree with "reference", gradients included."""
  arrays, cotangents = case.arrays(), _random_cotangents(case)
  kernel = _kernel_call(module, case, **options)
  run = lambda implementation: (
      num.vjp_of(kernel, arrays, cotangents, DIFFERENTIABLE) if implementation == "kernel"
      else _forward_and_vjp(arrays, cotangents, implementation=implementation,
                            delta_softplus=case.delta_softplus))
  num.assert_forms_agree(run, arrays, DIFFERENTIABLE, "kernel")


class TestPallasTpuAgreement(AgreementBase):
  """The kernels run in TPU interpret mode on CPU (slow: the shapes are kept small).

  "pallas_tpu" takes one group of any number of channels, or groups of a multiple of 128
  channels; the drawn cases are of one group, the fixed one of two groups of 128 channels.
  """

  __test__ = True
  implementation = "pallas_tpu"
  # Two channel blocks, one per group; 40 tokens: a chunk of 32 and a padded one.
  all_inputs_case = Case(batch=1, time=40, channels=256, state=16, groups=2,
                         with_segment_ids=True, seed=1)

  # Each example compiles for ~6 s in TPU interpret mode: 3/5 of the profile's examples.
  @settings(max_examples=max(1, settings().max_examples * 3 // 5))
  @given(case=cases(max_batch=2, max_time=65, grouped=False))
  def test_matches_reference(self, case):
    """Drawn cases, calling the kernels with chunks of 16 tokens: they compile in TPU interpret
    mode in half the time of the default 32 (the fixed case runs the default)."""
    _check_kernel_settings(pallas_tpu, case, chunk=16)

  def test_padded_channels_and_chunk_16(self):
    """One group of 130 channels (padded to two blocks of 128), bfloat16, chunks of 16 tokens."""
    case = Case(batch=1, time=20, channels=130, state=3, groups=0, dtype="bfloat16",
                with_segment_ids=True, seed=3)
    _check_kernel_settings(pallas_tpu, case, chunk=16)


@pytest.mark.parametrize("dtype, channels, groups", [("bfloat16", 256, 2), ("float32", 4, 0)])
def test_pallas_tpu_lowers_for_tpu(dtype, channels, groups):
  """Forward and backward kernels lower through Mosaic for a TPU (exported on CPU, not run).

  Lowering catches primitives Mosaic has no rule for; it does not run Mosaic's layout passes,
  which only a TPU's compiler does.
  """
  case = Case(batch=1, time=40, channels=channels, state=16, groups=groups, dtype=dtype,
              with_segment_ids=True)
  arrays = case.arrays()
  forward = _kernel_call(pallas_tpu, case, interpret=False)

  def loss(x):
    out, final_state = forward({**arrays, **x})
    return out.astype(jnp.float32).sum() + final_state.sum()

  differentiable = {k: v for k, v in arrays.items() if k in DIFFERENTIABLE}
  for fn, args in ((forward, arrays), (jax.grad(loss), differentiable)):
    num.export_for_tpu(fn, args)


def _grad_temp_bytes(implementation: str, time: int, channels=64, state=64) -> int:
  """Compiled scratch memory of forward+backward at batch 1 (XLA's own accounting)."""
  u = jnp.ones((1, time, channels))
  A, B = -jnp.ones((channels, state)), jnp.ones((1, time, state))
  loss = lambda u, delta, B, C: selective_scan(u, delta, A, B, C, implementation=implementation,
                                               delta_softplus=True).sum()
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  return grad.lower(u, u, B, B).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.compile_bound(False)  # the memory of the optimised compile
def test_xla_backward_memory_does_not_hold_every_state():
  """Going from T=4096 to T=16384 adds 192 MiB of [T, channels, state] states. The reference
  stores them for its backward; the chunked form keeps one state per chunk and recomputes, so it
  adds only per-token [T, channels] terms (inputs' gradients) and T / chunk states."""
  all_states = lambda time: time * 64 * 64 * 4
  added_states = all_states(16384) - all_states(4096)
  added_xla = _grad_temp_bytes("xla", 16384) - _grad_temp_bytes("xla", 4096)
  added_reference = _grad_temp_bytes("reference", 16384) - _grad_temp_bytes("reference", 4096)
  assert added_reference > added_states
  assert added_xla < 0.25 * added_states


# --- packed sequences -------------------------------------------------------------------------

# Per row: segment labels and lengths (few distinct lengths: few compilations). Ids change value
# but not always upward; boundaries fall on t = 64 and t = 65 (64 is a multiple of usual chunks).
PACKED_ROWS = (((7, 64), (3, 1), (9, 5)), ((2, 5), (5, 64), (1, 1)), ((4, 1), (0, 5), (4, 64)))


@pytest.mark.parametrize("implementation", [i for i in IMPLEMENTATIONS if i != "pallas_tpu"])
def test_segments_equal_separate_runs(implementation):
  """Packed rows equal each segment run alone: the first from initial_state, the rest from zero."""
  ids = jnp.asarray([np.repeat(*zip(*row)) for row in PACKED_ROWS], jnp.int32)
  case = Case(batch=len(PACKED_ROWS), time=ids.shape[1], channels=4, state=3, groups=2)
  arrays = case.arrays()
  run = functools.partial(_forward, implementation=implementation,
                          delta_softplus=case.delta_softplus)
  out, final_state = run({**arrays, "segment_ids": ids})
  for b, bounds in enumerate(num.segment_bounds(ids)):
    state = arrays["initial_state"][b:b + 1]
    for i, (start, stop) in enumerate(bounds):
      piece = {k: v[b:b + 1, start:stop] if k in TIME_MAJOR else v for k, v in arrays.items()}
      seg_out, state = run({**piece, "initial_state": state if i == 0 else jnp.zeros_like(state)})
      num.assert_close(seg_out, out[b:b + 1, start:stop], TOL_F32, f"out row {b} segment {i}")
    num.assert_close(state, final_state[b:b + 1], TOL_F32, f"final_state row {b}")


# --- decoding token by token ------------------------------------------------------------------

_step = jax.jit(selective_scan_step, static_argnames=("delta_softplus",))


@pytest.mark.parametrize("implementation, dtype, groups", [
    ("reference", "float32", 3), ("xla", "float32", 0), ("reference", "bfloat16", 0),
    ("xla", "bfloat16", 3), ("pallas_gpu", "bfloat16", 3), ("pallas_tpu", "float32", 0)])
def test_step_equals_forward(implementation, dtype, groups):
  """``selective_scan_step`` over the tokens equals the full forward (from an initial state)."""
  case = Case(time=9, channels=6, state=4, groups=groups, dtype=dtype)
  arrays = case.arrays()
  out, final_state = _forward(arrays, implementation=implementation,
                              delta_softplus=case.delta_softplus)
  state = arrays["initial_state"]
  for t in range(case.time):
    token = {k: v[:, t] if k in TIME_MAJOR else v for k, v in arrays.items()
             if k != "initial_state"}
    out_t, state = _step(state, **token, delta_softplus=case.delta_softplus)
    assert out_t.dtype == out.dtype and state.dtype == jnp.float32
    num.assert_close(out[:, t], out_t, tolerance(out_t), f"out[{t}]")
  num.assert_close(final_state, state, TOL_F32, "final_state")


# --- malformed arguments ----------------------------------------------------------------------

def _valid_arguments() -> dict:
  """Well-formed arguments: batch 2, time 5, channels 4, state 3, B and C in 2 groups."""
  return Case(batch=2, time=5, channels=4, state=3, groups=2, with_segment_ids=True).arrays()


def _replace(name: str, make):
  """A change of the valid arguments that sets ``name`` to ``make(old value)``."""
  return lambda args: {**args, name: make(args[name])}


def _grow(axis: int):
  """A change that lengthens ``axis`` by one (repeating its first entry)."""
  return lambda x: jnp.concatenate([x, jnp.take(x, jnp.array([0]), axis)], axis)

BAD_ARGUMENTS = {  # id: (change, regex the message must match)
    "u_rank": (_replace("u", lambda x: x[0]), r"\bu\b"),
    "delta_rank": (_replace("delta", lambda x: x[..., None]), r"\bdelta\b"),
    "delta_channels": (_replace("delta", _grow(2)), r"\bdelta\b"),
    "delta_time": (_replace("delta", _grow(1)), r"\bdelta\b"),
    "A_rank": (_replace("A", lambda x: x[0]), r"\bA\b"),
    "A_channels": (_replace("A", _grow(0)), r"\bA\b"),
    "B_rank": (_replace("B", lambda x: x[None]), r"\bB\b"),
    "B_batch": (_replace("B", _grow(0)), r"\bB\b"),
    "B_time": (_replace("B", _grow(1)), r"\bB\b"),
    "B_state": (_replace("B", _grow(3)), r"\bB\b"),
    "B_groups_not_dividing_channels": (
        lambda a: {**a, "B": _grow(2)(a["B"]), "C": _grow(2)(a["C"])}, r"\b(B|C)\b"),
    "C_state": (_replace("C", _grow(3)), r"\bC\b"),
    "C_rank": (_replace("C", lambda x: x[0]), r"\bC\b"),
    "B_C_groups_mismatch": (_replace("C", lambda x: x[:, :, :1]), r"\b(B|C)\b"),
    "D_shape": (_replace("D", _grow(0)), r"\bD\b"),
    "D_rank": (_replace("D", lambda x: x[None]), r"\bD\b"),
    "z_shape": (_replace("z", _grow(2)), r"\bz\b"),
    "delta_bias_shape": (_replace("delta_bias", _grow(0)), r"\bdelta_bias\b"),
    "initial_state_shape": (_replace("initial_state", _grow(2)), r"\binitial_state\b"),
    "initial_state_rank": (_replace("initial_state", lambda x: x[0]), r"\binitial_state\b"),
    "segment_ids_shape": (_replace("segment_ids", _grow(1)), r"\bsegment_ids\b"),
}


@pytest.mark.parametrize("change, pattern", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bad_argument_raises(implementation, change, pattern):
  with pytest.raises(ValueError, match=pattern):
    selective_scan(**change(_valid_arguments()), implementation=implementation)


def test_unknown_implementation_raises():
  with pytest.raises(ValueError, match=r"implementation") as info:
    selective_scan(**_valid_arguments(), implementation="cuda")
  for allowed in IMPLEMENTATIONS:
    assert allowed in str(info.value), str(info.value)


@pytest.fixture
def on_tpu(monkeypatch):
  """``jax.default_backend()`` says "tpu"; "pallas_tpu" still runs in TPU interpret mode, and the
  calls of its kernels are recorded (the list returned)."""
  calls = []
  kernels = pallas_tpu.selective_scan

  def interpreted(*args, **kwargs):
    calls.append(args)
    return kernels(*args, **kwargs, interpret=True)

  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  monkeypatch.setattr(pallas_tpu, "selective_scan", interpreted)
  return calls


def test_default_on_tpu_is_pallas_tpu(on_tpu):
  arrays = Case(time=5, channels=4, state=3).arrays()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = selective_scan(**arrays, delta_softplus=True)
  assert len(on_tpu) == 1
  expected = selective_scan(**arrays, delta_softplus=True, implementation="reference")
  num.assert_close(expected, out, TOL_F32)


def test_default_on_tpu_falls_back_for_unsupported_shape(on_tpu):
  """Two groups of 2 channels: "pallas_tpu" needs 128 channels per group; "xla" runs instead."""
  arrays = _valid_arguments()
  with pytest.warns(UserWarning, match=r"'pallas_tpu'.*channels per group \(2\)"):
    out = selective_scan(**arrays, delta_softplus=True)
  assert not on_tpu
  expected = selective_scan(**arrays, delta_softplus=True, implementation="reference")
  num.assert_close(expected, out, TOL_F32)


def test_pallas_tpu_refuses_unsupported_shape():
  with pytest.raises(ValueError, match=r"'pallas_tpu'.*channels per group \(2\).*128"):
    selective_scan(**_valid_arguments(), implementation="pallas_tpu")


@pytest.mark.parametrize("channels, groups, state, supported", [
    (4, 1, 16, True), (300, 1, 16, True), (256, 2, 16, True), (8, 2, 16, False),
    (384, 2, 16, False), (128, 1, 1024, False)])
def test_pallas_tpu_unsupported(channels, groups, state, supported):
  """Groups of a multiple of 128 channels, or one group of any number; VMEM within budget."""
  assert (pallas_tpu.unsupported(channels, groups, state) is None) == supported


@pytest.mark.parametrize("implementation", ["reference", "pallas_gpu"])
def test_chunk_size_outside_xla_raises(implementation):
  with pytest.raises(ValueError, match=r"chunk_size"):
    selective_scan(**_valid_arguments(), implementation=implementation, chunk_size=16)


def _valid_step_arguments() -> dict:
  """Well-formed ``selective_scan_step`` arguments: one token of ``_valid_arguments``."""
  args = _valid_arguments()
  del args["segment_ids"]
  args["state"] = args.pop("initial_state")
  return {k: v[:, 0] if k in TIME_MAJOR else v for k, v in args.items()}


BAD_STEP_ARGUMENTS = {
    "state_shape": (_replace("state", _grow(2)), r"\bstate\b"),
    "state_rank": (_replace("state", lambda x: x[0]), r"\bstate\b"),
    "u_rank": (_replace("u", lambda x: x[:, None]), r"\bu\b"),
    "B_state": (_replace("B", _grow(2)), r"\bB\b"),
    "z_shape": (_replace("z", _grow(1)), r"\bz\b"),
}


@pytest.mark.parametrize("change, pattern", BAD_STEP_ARGUMENTS.values(),
                         ids=BAD_STEP_ARGUMENTS.keys())
def test_bad_step_argument_raises(change, pattern):
  with pytest.raises(ValueError, match=pattern):
    selective_scan_step(**change(_valid_step_arguments()))
