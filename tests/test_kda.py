"""Tests of ``ops.kda`` against SPEC.md 3 (KDA, the channel-wise gated delta rule).

The ground truth is ``oracle`` below: SPEC 3.1 transcribed token by token in float64 NumPy
(``S <- S * exp(g_t)[:, None]; S <- S + (beta_t k_t)(v_t - S^T k_t)^T; o_t = S^T (scale q_t)``),
with grouped value heads (GVA), the in-kernel L2 norm, initial states, ``segment_ids`` resets and
``cu_seqlens`` sequences, independent of the op's code. Properties checked:

* "reference" equals the oracle over drawn cases, and every form does on fixed cases, compiled
  and op by op (output and final state);
* every faster form, "xla" (chunkwise WY form, SPEC 3.3-3.5), "pallas_gpu" and "pallas_tpu"
  (its Pallas kernels, in their interpret modes on CPU), equals "reference" in output, final
  state and the gradients of q, k, v, g, beta and initial_state, over drawn shapes, dtypes and
  options, through one test base (``AgreementBase``) that each form's test class subclasses;
* the kernels lower for their hardware from this CPU machine (Triton for CUDA, Mosaic for TPU),
  and ``implementation=None`` resolves to them on their platform, falling back with a warning
  where they cannot run;
* strong decay (down to -5 per token, and down to -20 per token over a whole chunk) stays finite
  and equals float64 references;
* packed batches (``segment_ids`` and ``cu_seqlens``) equal each sequence run alone, gradients
  included;
* ``gated_delta_rule`` equals ``kda`` with its gate broadcast over the key axis;
* ``kda_step`` token by token equals the full forward;
* a long sequence (T = 16384) stays finite and close to the oracle;
* ``kda_gate`` equals both of its formulas, keeps its range and has finite gradients;
* malformed arguments raise a ``ValueError`` that names the argument.

Inputs follow fla's tests (SPEC 6): ``g = logsigmoid(N(0, 1)) / normalizer`` (with exact zeros
mixed in), ``beta = sigmoid(N)``, L2-normalised keys (in the kernel, or here before the call:
the delta rule is a contraction only for ||k|| <= ~1), ``h0 ~ N`` in float32.

Tolerances (relative RMS error, tests/_numerics.py). A float32 result, value or gradient: 1e-5,
the float32 rounding of the two forms with a margin for the triangular solve and the longer sums
of the chunked form (measured over 40 drawn cases: o 6e-7, final state 1.0e-6, dq/dk/dv under
9e-7, dg 1.1e-6, dbeta 2.9e-6; one token of ``kda_step`` against the forward 3.2e-6, the
relative error of a single token's few outputs). A bfloat16 result: 1e-2, a few bf16 ulps
(2^-8 apart; measured o 1.7e-3 against the oracle, 2.7e-4 between the forms, gradients 1.8e-4).
Strong decay uses 3e-5; its reason is given where it is used.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

import ops.kda as kda_module
from ops._validate import resolve_implementation
from ops.kda import gated_delta_rule, kda, kda_gate, kda_step, l2norm, pallas_gpu, pallas_tpu
from tests import _numerics as num

pytestmark = pytest.mark.compile_bound  # conftest: XLA's optimisation passes off

TOL_F32, tolerance = num.TOL_F32, num.tolerance
IMPLEMENTATIONS = ("reference", "xla", "pallas_gpu", "pallas_tpu")
KERNELS = ("pallas_gpu", "pallas_tpu")
# Fixed oracle cases the kernels also run (interpret mode is slow; their drawn cases are in
# TestPallasGpu / TestPallasTpu): the one with every option.
KERNEL_ORACLE_CASES = ("gva_all_options",)
DIFFERENTIABLE = ("q", "k", "v", "g", "beta", "initial_state")
TIME_MAJOR = ("q", "k", "v", "g", "beta", "segment_ids")  # the arguments with a time axis (1)
L2NORM_EPS = 1e-6  # inside the square root (SPEC 3.2, fla's l2norm)


# --- the float64 oracle (SPEC 3.1) ------------------------------------------------------------

def l2normalize(x: np.ndarray) -> np.ndarray:
  """``x / sqrt(sum(x^2) + 1e-6)`` over the last axis, in float64."""
  return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def oracle(q, k, v, g, beta, scale=None, initial_state=None, segment_ids=None, cu_seqlens=None,
           use_qk_l2norm_in_kernel=False):
  """SPEC 3.1 in float64 NumPy, one token at a time.

  Shapes as ``kda``. Returns (o [B, T, HV, V], final_state [N, HV, K, V]), both float64.
  """
  q, k, v, g, beta = (num.to_f64(x) for x in (q, k, v, g, beta))
  if cu_seqlens is not None:  # independent sequences of the one row, each from its own state
    cu = [int(c) for c in cu_seqlens]
    outs, states = [], []
    for n, (start, stop) in enumerate(zip(cu[:-1], cu[1:])):
      o_n, state_n = oracle(
          *(x[:, start:stop] for x in (q, k, v, g, beta)), scale=scale,
          initial_state=None if initial_state is None else initial_state[n:n + 1],
          use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
      outs.append(o_n)
      states.append(state_n)
    return np.concatenate(outs, axis=1), np.concatenate(states, axis=0)
  batch, time, heads, key_dim = q.shape
  value_heads, value_dim = v.shape[2:]
  if use_qk_l2norm_in_kernel:
    q, k = l2normalize(q), l2normalize(k)
  scale = key_dim ** -0.5 if scale is None else scale
  q = np.repeat(q, value_heads // heads, axis=2) * scale  # value head j reads q/k head j // group
  k = np.repeat(k, value_heads // heads, axis=2)
  state = (np.zeros((batch, value_heads, key_dim, value_dim)) if initial_state is None
           else num.to_f64(initial_state).copy())
  o = np.zeros((batch, time, value_heads, value_dim))
  ids = None if segment_ids is None else np.asarray(segment_ids)
  for t in range(time):
    if ids is not None and t > 0:
      starts = ids[:, t] != ids[:, t - 1]
      state = np.where(starts[:, None, None, None], 0.0, state)
    state = state * np.exp(g[:, t])[..., None]
    k_t = k[:, t]
    residual = v[:, t] - np.einsum("bhkv,bhk->bhv", state, k_t)
    state = state + np.einsum("bhk,bhv->bhkv", beta[:, t, :, None] * k_t, residual)
    o[:, t] = np.einsum("bhkv,bhk->bhv", state, q[:, t])
  return o, state


def test_oracle_matches_closed_form():
  """The oracle itself, on a case solvable by hand: K = V = 1, one head.

  With k = 1, beta = 1 the update overwrites the state: S_t = v_t, o_t = scale q_t v_t. With
  beta = 1/2 and g = log(1/2): S_t = S_{t-1}/4 + v_t/2.
  """
  ones = np.ones((1, 3, 1, 1))
  v = np.arange(1.0, 4.0).reshape(1, 3, 1, 1)
  q = 2.0 * ones
  o, state = oracle(q, ones, v, np.zeros_like(v), np.ones((1, 3, 1)), scale=0.5,
                    initial_state=np.full((1, 1, 1, 1), 7.0))
  np.testing.assert_allclose(o.ravel(), [1.0, 2.0, 3.0])
  np.testing.assert_allclose(state.ravel(), [3.0])
  o, state = oracle(q, ones, v, np.full_like(v, np.log(0.5)), np.full((1, 3, 1), 0.5),
                    scale=1.0, initial_state=np.full((1, 1, 1, 1), 4.0))
  s1 = 4.0 / 4 + 1.0 / 2
  s2 = s1 / 4 + 2.0 / 2
  s3 = s2 / 4 + 3.0 / 2
  np.testing.assert_allclose(o.ravel(), [2 * s1, 2 * s2, 2 * s3])
  np.testing.assert_allclose(state.ravel(), [s3])


# --- problem cases ----------------------------------------------------------------------------

def _logsigmoid(x: np.ndarray) -> np.ndarray:
  return -np.logaddexp(0.0, -x)


@dataclasses.dataclass(frozen=True)
class Case:
  """One problem: shapes, dtypes, options, the gate's distribution and the seed of its inputs.

  ``group`` value heads share each q/k head (GVA when > 1). ``dtype`` is that of q, k, v and
  beta; ``gate_dtype`` that of g. Without ``l2norm`` (use_qk_l2norm_in_kernel) the keys are
  normalised here. ``with_segment_ids`` adds random packed-row ids (up to 6 segments a row, so
  several segments can share a chunk). Gates (log space):

  * "logsigmoid": ``logsigmoid(N(0, 1)) / gate_normalizer``, a fraction ``gate_zero_fraction``
    of entries set to exactly 0, and the first ``zero_channels`` key channels 0 at every token;
  * "strong5": ``-U(0, 5)`` per token and channel;
  * "chunk20": "logsigmoid" outside tokens 64..127; inside that whole chunk, half of the
    (batch, head, channel) lanes take ``-U(0, 20)`` per token (a cumulative gate down to about
    -640 within the chunk) while the other lanes keep their weak gates.
  """

  batch: int = 2
  time: int = 9
  heads: int = 2
  group: int = 1
  key_dim: int = 16
  value_dim: int = 16
  dtype: str = "float32"
  gate_dtype: str = "float32"
  scale: float | None = None
  l2norm: bool = True
  with_initial_state: bool = True
  gate: str = "logsigmoid"
  gate_normalizer: float = 1.0
  gate_zero_fraction: float = 0.0
  zero_channels: int = 0
  with_segment_ids: bool = False
  seed: int = 0

  @property
  def value_heads(self) -> int:
    return self.heads * self.group

  @property
  def options(self) -> dict:
    """The static keyword arguments of the runners below."""
    return dict(scale=self.scale, l2norm=self.l2norm)

  def gates(self, rng: np.random.Generator) -> np.ndarray:
    shape = (self.batch, self.time, self.value_heads, self.key_dim)
    g = _logsigmoid(rng.normal(size=shape)) / self.gate_normalizer
    g[rng.random(shape) < self.gate_zero_fraction] = 0.0
    g[..., :self.zero_channels] = 0.0
    if self.gate == "strong5":
      g = -rng.uniform(0.0, 5.0, shape)
    elif self.gate == "chunk20":
      lanes = rng.random((self.batch, 1, self.value_heads, self.key_dim)) < 0.5
      strong = np.where(lanes, -rng.uniform(0.0, 20.0, shape), g)
      g[:, 64:128] = strong[:, 64:128]
    else:
      assert self.gate == "logsigmoid", self.gate
    return g

  def arrays(self) -> dict:
    """The array arguments of ``kda`` (initial_state only when switched on)."""
    rng = np.random.default_rng(self.seed)
    b, t, h, hv, dk, dv = (self.batch, self.time, self.heads, self.value_heads, self.key_dim,
                           self.value_dim)
    q = rng.normal(size=(b, t, h, dk))
    k = rng.normal(size=(b, t, h, dk))
    if not self.l2norm:
      k = l2normalize(k)
    arrays = dict(
        q=jnp.asarray(q, self.dtype), k=jnp.asarray(k, self.dtype),
        v=num.normal(rng, (b, t, hv, dv), self.dtype),
        g=jnp.asarray(self.gates(rng), self.gate_dtype),
        beta=jnp.asarray(1.0 / (1.0 + np.exp(-rng.normal(size=(b, t, hv)))), self.dtype),
        initial_state=num.normal(rng, (b, hv, dk, dv)))
    if not self.with_initial_state:
      del arrays["initial_state"]
    if self.with_segment_ids:
      arrays["segment_ids"] = num.random_segment_ids(rng, b, t, max_segments=6)
    return arrays

  def cotangents(self, num_states: int | None = None, stream: int = 1):
    """Random cotangents for (o [v's dtype], final_state [float32]); ``stream`` picks an
    independent draw."""
    rng = np.random.default_rng([self.seed, stream])
    return (num.normal(rng, (self.batch, self.time, self.value_heads, self.value_dim),
                       self.dtype),
            num.normal(rng, (num_states or self.batch, self.value_heads, self.key_dim,
                             self.value_dim)))


def case_oracle(case: Case, arrays: dict, **kwargs):
  """The oracle on a case's arrays (segment_ids among them or not; kwargs: cu_seqlens)."""
  return oracle(**arrays, scale=case.scale, use_qk_l2norm_in_kernel=case.l2norm, **kwargs)


# Sequence lengths below and past the chunk of 64, none a multiple of it (1 token included).
KDA_SEQ_LENGTHS = (1, 15, 63, 65, 100, 130)
HEAD_DIMS = (16, 32, 64, 128)


@st.composite
def cases(draw) -> Case:
  """Drawn shapes (GVA included), dtypes, scale, options and gate distributions."""
  dtype = draw(num.float_dtypes())
  batch, heads, group = draw(st.tuples(st.integers(1, 2), st.integers(1, 2), st.sampled_from(
      (1, 2))).filter(lambda s: s[0] * s[1] * s[2] <= 4))  # CPU time grows with B * HV
  return Case(
      batch=batch, time=draw(st.sampled_from(KDA_SEQ_LENGTHS)), heads=heads, group=group,
      key_dim=draw(st.sampled_from(HEAD_DIMS)), value_dim=draw(st.sampled_from(HEAD_DIMS)),
      dtype=dtype,
      gate_dtype="float32" if dtype == "float32" else draw(num.float_dtypes()),
      scale=draw(st.sampled_from((None, 0.1, 1.0))), l2norm=draw(st.booleans()),
      with_initial_state=draw(st.booleans()), with_segment_ids=draw(st.booleans()),
      gate_normalizer=draw(st.sampled_from((1.0, 16.0))),
      gate_zero_fraction=draw(st.sampled_from((0.0, 0.5))), seed=draw(num.seeds()))


# The shape and options shared by the fixed cases below (one compilation serves several tests):
# GVA (2 value heads per q/k head), an initial state, a scale, the in-kernel L2 norm, and
# T = 150: two full chunks of 64 and a partial one.
BASE = Case(batch=1, time=150, heads=2, group=2, key_dim=16, value_dim=32, scale=0.5)


# --- jitted runners (module level, so equal shapes reuse the compilation) ---------------------

_STATIC = ("implementation", "scale", "l2norm", "chunk_size", "cu_seqlens")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _forward(arrays, *, implementation, scale=None, l2norm=False, chunk_size=64,
             cu_seqlens=None):
  """(o, final_state) of ``kda``; ``cu_seqlens`` is a tuple (hashable, concrete)."""
  return kda(**arrays, scale=scale, use_qk_l2norm_in_kernel=l2norm, return_final_state=True,
             implementation=implementation, chunk_size=chunk_size,
             cu_seqlens=None if cu_seqlens is None else np.asarray(cu_seqlens, np.int32))


@functools.partial(jax.jit, static_argnames=_STATIC)
def _forward_and_vjp(arrays, cotangents, **static):
  """((o, final_state), gradients of every float array) for the cotangents of both outputs."""
  return num.vjp_of(lambda x: _forward(x, **static), arrays, cotangents, DIFFERENTIABLE)


# --- the op equals the oracle -----------------------------------------------------------------

def _check_against_oracle(case: Case, run, state_tolerance: float = TOL_F32) -> None:
  """Compares ``run(arrays) -> (o, final_state)`` with the oracle, dtypes and shapes included."""
  arrays = case.arrays()
  o, final_state = run(arrays)
  ref_o, ref_state = case_oracle(case, arrays)
  assert o.dtype == jnp.dtype(case.dtype), o.dtype
  assert final_state.dtype == jnp.float32, final_state.dtype
  num.assert_close(ref_o, o, tolerance(o), "o")
  num.assert_close(ref_state, final_state, state_tolerance, "final_state")


@given(case=cases())
def test_reference_matches_oracle(case):
  _check_against_oracle(case, functools.partial(
      _forward, implementation="reference", **case.options))


ORACLE_CASES = dict(
    single_token=Case(batch=1, time=1, heads=1, l2norm=False, with_initial_state=False),
    gva_all_options=Case(time=70, heads=2, group=2, key_dim=32, value_dim=16, scale=0.3,
                         gate_zero_fraction=0.3, with_segment_ids=True, seed=3),
    bfloat16_past_chunk=Case(time=130, heads=1, group=2, key_dim=16, value_dim=32,
                             dtype="bfloat16", gate_dtype="bfloat16", l2norm=False, seed=4),
)


class OracleTest(chex.TestCase):
  """Fixed cases against the oracle, each run compiled and op by op (chex variants)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      *[dict(case_name=c, implementation=i) for c in ORACLE_CASES for i in IMPLEMENTATIONS
        if i not in KERNELS or c in KERNEL_ORACLE_CASES],
      dict(case_name="gva_all_options", implementation=None))
  def test_fixed_case(self, case_name, implementation):
    case = ORACLE_CASES[case_name]
    run = self.variant(functools.partial(
        kda, scale=case.scale, use_qk_l2norm_in_kernel=case.l2norm, return_final_state=True,
        implementation=implementation))
    # The kernels read bfloat16 inputs as they are (AgreementBase.keeps_input_dtype).
    narrow = implementation in ("pallas_gpu", "pallas_tpu") and case.dtype == "bfloat16"
    _check_against_oracle(case, lambda arrays: run(**arrays),
                          num.TOL_BF16 if narrow else TOL_F32)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_without_final_state_returns_none(implementation):
  """``return_final_state=False`` returns ``(o, None)``."""
  case = Case(time=3, l2norm=False)
  arrays = case.arrays()
  o, final_state = kda(**arrays, implementation=implementation)
  assert final_state is None
  num.assert_close(case_oracle(case, arrays)[0], o, TOL_F32, "o")


# --- every faster form equals "reference", gradients included ----------------------------------

def _check_matches_reference(case: Case, implementation: str, float32_tolerance=TOL_F32,
                             **static) -> None:
  """Output, final state and the gradient of every float input agree with "reference"."""
  arrays, cotangents = case.arrays(), case.cotangents()
  static = {**case.options, **static}
  run = lambda implementation: _forward_and_vjp(arrays, cotangents,
                                                implementation=implementation, **static)
  _, scales = _forward_and_vjp(arrays, case.cotangents(stream=2), implementation="reference",
                               **static)
  num.assert_forms_agree(run, arrays, DIFFERENTIABLE, implementation, output="o",
                         float32_tolerance=float32_tolerance, gradient_scales=scales)


def test_a_cancelling_cotangent_is_judged_at_the_gradients_usual_size():
  """One token, no initial state: dq = s beta k (v . do). A hypothesis draw (seed 1, the
  cotangent from default_rng(2)) had v . do = -0.0065 against |v| |do| = 114, which left "xla"
  and "reference" both 1e-4 from the exact dq relative to it, so the plain relative check failed
  with nothing wrong. Against the gradient for an independent cotangent the two agree to 3e-7,
  and a dq off by 1e-4 of that usual size still fails."""
  case = Case(batch=1, time=1, heads=1, key_dim=64, value_dim=128, l2norm=False,
              with_initial_state=False, seed=1)
  arrays = case.arrays()
  rng = np.random.default_rng(2)
  cancelling = (num.normal(rng, (1, 1, 1, 128)), num.normal(rng, (1, 1, 64, 128)))
  assert abs(float(jnp.sum(arrays["v"] * cancelling[0]))) < 0.01
  run = lambda implementation: _forward_and_vjp(arrays, cancelling, implementation=implementation,
                                                **case.options)
  with pytest.raises(AssertionError, match="dq"):
    num.assert_forms_agree(run, arrays, DIFFERENTIABLE, "xla", output="o")
  _, scales = _forward_and_vjp(arrays, case.cotangents(stream=2), implementation="reference",
                               **case.options)
  num.assert_forms_agree(run, arrays, DIFFERENTIABLE, "xla", output="o", gradient_scales=scales)

  def wrong(implementation):
    outputs, grads = run(implementation)
    return outputs, ({**grads, "q": grads["q"] + 1e-4 * scales["q"]}
                     if implementation == "xla" else grads)

  with pytest.raises(AssertionError, match="dq"):
    num.assert_forms_agree(wrong, arrays, DIFFERENTIABLE, "xla", output="o",
                           gradient_scales=scales)


# --- strong decay -------------------------------------------------------------------------------

# Float32 error of the chunked form under strong decay: 3e-5. Within a chunk the cumulative gate
# G falls to about -64 |g| (-160 on average for "strong5", -640 in the strong lanes of
# "chunk20"); the chunked form builds its weights exp(G_r - G_i) from such numbers, whose float32
# spacing (1.5e-5 at 160, 6e-5 at 640) becomes a relative error of the weight. The
# token-by-token recurrence never forms them. The weights that carry such errors are small
# (exp(-|g|) per token), so o, the state and the gradients lose less: measured at most 1.6e-6
# (o), 1.5e-6 (state) and 3.9e-6 (dg) over 24 seeds, against 6e-7 / 4e-6 with ordinary gates.
# A form that exponentiates an unreferenced cumulative gate (SPEC 3.5) overflows to inf or nan
# and fails.
TOL_STRONG_DECAY = 3e-5


def _float64_reference(arrays: dict, case: Case):
  """``kda(implementation="reference")`` on float64 inputs with x64 enabled (the initial state
  stays float32, as the op requires). Returns NumPy (o, final_state).

  By its contract the op computes in float32 whatever the input dtype, so this is the float32
  recurrence run through the x64 code path (o must come back float64, v's dtype); the float64
  truth is the NumPy oracle.
  """
  with jax.enable_x64(True):
    wide = {k: jnp.asarray(num.to_f64(v)) if k != "initial_state" else v
            for k, v in arrays.items()}
    o, state = kda(**wide, scale=case.scale, use_qk_l2norm_in_kernel=case.l2norm,
                   return_final_state=True, implementation="reference")
    assert o.dtype == jnp.float64 and state.dtype == jnp.float32, (o.dtype, state.dtype)
    return num.to_f64(o), num.to_f64(state)


class AgreementBase:
  """The properties every faster implementation shares with "reference"; one subclass each.

  ``implementation`` names the form under test; the subclasses below are what pytest collects.
  """

  implementation: str
  # Whether the form reads its inputs in their own dtype (the Pallas kernels; the GPU kernels
  # also store W, Q Gamma and K exp(G_C - G) in it): then float32 results (the final state,
  # float32 gradients) from bfloat16 inputs carry bfloat16 rounding and are held to 1e-2, not
  # 1e-5.
  keeps_input_dtype = False

  @given(case=cases())
  def test_matches_reference(self, case):
    narrow = self.keeps_input_dtype and case.dtype == "bfloat16"
    _check_matches_reference(case, self.implementation,
                             float32_tolerance=num.TOL_BF16 if narrow else TOL_F32)

  def test_matches_reference_all_inputs(self):
    """A fixed case with GVA, an initial state, a scale and the in-kernel norm (``BASE``), so
    that every gradient is checked in every run."""
    _check_matches_reference(dataclasses.replace(BASE, gate_zero_fraction=0.2, seed=1),
                             self.implementation)

  @pytest.mark.parametrize("chunk_size", [16, 32, 128])
  def test_chunk_sizes_match_reference(self, chunk_size):
    """Other chunk sizes: the same results, partial last chunk included."""
    case = Case(batch=1, time=100, heads=1, group=2, key_dim=16, value_dim=16, seed=2)
    arrays = case.arrays()
    ref_o, ref_state = _forward(arrays, implementation="reference", **case.options)
    o, final_state = _forward(arrays, implementation=self.implementation, chunk_size=chunk_size,
                              **case.options)
    num.assert_close(ref_o, o, TOL_F32, "o")
    num.assert_close(ref_state, final_state, TOL_F32, "final_state")

  @pytest.mark.parametrize("gate", ["strong5", "chunk20"])
  def test_strong_decay_is_finite_and_correct(self, gate):
    case = dataclasses.replace(BASE, gate=gate, seed=5)
    arrays = case.arrays()
    g = np.asarray(arrays["g"])
    assert g.min() < (-4.9 if gate == "strong5" else -19.5)  # the decay is as strong as stated
    o, final_state = _forward(arrays, implementation=self.implementation, **case.options)
    assert np.isfinite(np.asarray(o)).all() and np.isfinite(np.asarray(final_state)).all()
    ref_o, ref_state = case_oracle(case, arrays)
    num.assert_close(ref_o, o, TOL_STRONG_DECAY, "o vs oracle")
    num.assert_close(ref_state, final_state, TOL_STRONG_DECAY, "final_state vs oracle")
    wide_o, wide_state = _float64_reference(arrays, case)
    num.assert_close(wide_o, o, TOL_STRONG_DECAY, "o vs float64 reference")
    num.assert_close(wide_state, final_state, TOL_STRONG_DECAY,
                     "final_state vs float64 reference")
    # The float32 token-by-token form, gradients included: finite and within the same bound.
    cotangents = case.cotangents()
    (_, _), ref_grads = _forward_and_vjp(arrays, cotangents, implementation="reference",
                                         **case.options)
    (_, _), grads = _forward_and_vjp(arrays, cotangents, implementation=self.implementation,
                                     **case.options)
    for name, grad in grads.items():
      assert np.isfinite(np.asarray(grad)).all(), name
      num.assert_close(ref_grads[name], grad, TOL_STRONG_DECAY, f"d{name}")

  def test_segments_gradients_equal_separate_runs(self):
    """Gradients of a packed batch equal the gradients of each segment run alone
    ("reference"), row 0 of ``PACKED_ROWS`` (boundaries at 64 and 65)."""
    ids = _packed_segment_ids()[:1]
    case = dataclasses.replace(BASE, seed=6)
    arrays, (d_o, d_state) = case.arrays(), case.cotangents()
    (_, _), grads = _forward_and_vjp({**arrays, "segment_ids": ids}, (d_o, d_state),
                                     implementation=self.implementation, **case.options)
    row_bounds = num.segment_bounds(ids)[0]
    zero_state = jnp.zeros_like(d_state)
    for i, (start, stop) in enumerate(row_bounds):
      last = i == len(row_bounds) - 1
      piece = {k: v[:, start:stop] for k, v in arrays.items() if k in TIME_MAJOR}
      piece["initial_state"] = arrays["initial_state"] if i == 0 else zero_state
      (_, _), seg_grads = _forward_and_vjp(
          piece, (d_o[:, start:stop], d_state if last else zero_state),
          implementation="reference", **case.options)
      for name in TIME_MAJOR[:5]:
        num.assert_close(seg_grads[name], grads[name][:, start:stop], TOL_F32,
                         f"d{name} segment {i}")
      if i == 0:
        num.assert_close(seg_grads["initial_state"], grads["initial_state"], TOL_F32,
                         "dinitial_state")


class TestXla(AgreementBase):
  """The chunkwise WY form in plain JAX (``ops.kda.chunk``)."""

  implementation = "xla"


class TestPallasGpu(AgreementBase):
  """The Pallas Triton kernels (``ops.kda.pallas_gpu``), in interpret mode off a GPU."""

  implementation = "pallas_gpu"
  keeps_input_dtype = True

  @pytest.mark.parametrize("cotangent_values", [128, 64])
  def test_wide_heads_match_reference(self, cotangent_values, monkeypatch):
    """K = V = 128, where these kernels split the key and value columns across programs (two
    64-column blocks; narrower heads take one), with segments, so that the split is checked in
    every run rather than when a draw happens to pick both widths; the state cotangents both
    on the whole V (one call) and on 64-column value blocks (two groups, the sums held in their
    loop), the form wider values take."""
    monkeypatch.setitem(pallas_gpu.VALUE_BLOCK, "state_cotangents", cotangent_values)
    _check_matches_reference(dataclasses.replace(BASE, time=70, heads=1, key_dim=128,
                                                  value_dim=128, with_segment_ids=True, seed=3),
                             self.implementation)

  def test_state_cotangents_split_into_groups_only_over_several_value_blocks(self):
    """One state-cotangents call per group of fields: all at once with one value block (up to
    V = 128), and at V = 256 (two value blocks, the sums held in the loop) two groups that hold
    every field once; the wide-heads case above checks the values of both forms."""
    sizes = lambda K, V: pallas_gpu.Sizes(B=1, T=64, HV=1, K=K, V=V, C=64)
    written = ("W", "Qg", "Kg", "A", "decay")  # dU is dV~, which the reverse walk writes
    assert pallas_gpu._cotangent_groups(pallas_gpu.KDA, sizes(128, 64)) == [written]
    assert pallas_gpu._cotangent_groups(pallas_gpu.KDA, sizes(128, 128)) == [written]
    assert pallas_gpu._cotangent_groups(pallas_gpu.KDA, sizes(128, 256)) == [written[:2],
                                                                             written[2:]]


class TestPallasTpu(AgreementBase):
  """The Pallas TPU kernels (``ops.kda.pallas_tpu``), in TPU interpret mode off a TPU. They share
  every formula with the GPU kernels (``ops.kda._kernel_chunk``), which ``TestPallasGpu`` draws
  more examples of; here the drawn cases check the TPU plumbing (primitives, blocks, the reversed
  walk, the VMEM state), and the TPU interpreter is slow, so fewer are drawn."""

  implementation = "pallas_tpu"
  keeps_input_dtype = True

  # Its own wrapper: ``settings(...)`` applied to the inherited test would set the shared function
  # object's settings, every subclass's draws with it.
  @settings(max_examples=2)
  @given(case=cases())
  def test_matches_reference(self, case):
    AgreementBase.test_matches_reference.hypothesis.inner_test(self, case)


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-6), ("bfloat16", 8e-3)])
def test_gpu_normalisation_backward_kernel_equals_the_xla_form(dtype, tolerance):
  """``pallas_gpu._normalize_backward`` (interpret mode), chunk by chunk over every head, gives
  ``l2norm.normalize_backward`` in the token's dtype."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 64, 3, 16)), dtype)
  dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  inverse = l2norm.inverse_norm(x)
  got = pallas_gpu._normalize_backward(x, inverse, dy, C=32, interpret=True)
  expected = l2norm.normalize_backward(x, inverse, dy).astype(dtype)
  assert got.dtype == x.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                             rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("key_dim, dtype", [(16, "float32"), (128, "bfloat16"), (1, "float32")])
def test_l2norm_backward_equals_the_derivative_of_the_normalisation(key_dim, dtype):
  """``l2norm.normalize_backward`` (the GPU kernels' normalisation backward, in XLA) against
  float64 autodiff of x / sqrt(sum x^2 + eps) on the same inputs. At K = 1 the normalised value
  is constant up to eps and the two terms cancel to about a thousandth of either (measured 8e-5
  off in float32); either rounded to bfloat16 first would miss by more than the result."""
  rng = np.random.default_rng(key_dim)
  x = jnp.asarray(rng.normal(size=(3, 5, key_dim)), dtype)
  dy = jnp.asarray(rng.normal(size=(3, 5, key_dim)), jnp.float32)
  got = l2norm.normalize_backward(x, l2norm.inverse_norm(x), dy)
  assert got.dtype == jnp.float32 and got.shape == x.shape
  with jax.enable_x64(True):
    wide = lambda y: y * jax.lax.rsqrt(jnp.sum(y * y, axis=-1, keepdims=True) + l2norm.EPS)
    _, vjp = jax.vjp(wide, jnp.asarray(num.to_f64(x)))
    expected = num.to_f64(vjp(jnp.asarray(num.to_f64(dy)))[0])
  num.assert_close(expected, got, 1e-3 if key_dim == 1 else 1e-6, "dx")


# --- the kernels lower for their hardware without it ------------------------------------------

def _kernel_functions(kernels, dtype):
  """(forward, gradient) of ``kernels.scan`` compiled for hardware (interpret off), and args."""
  case = dataclasses.replace(BASE, batch=1, time=70, heads=2, group=1, key_dim=128,
                             value_dim=128, dtype=dtype, with_segment_ids=True)
  arrays = case.arrays()
  index = kda_module._segment_index(arrays["segment_ids"])
  forward = lambda q, k, v, g, beta, h0: kernels.scan(q, k, v, g, beta, h0, index, scale=0.1,
                                                      l2_normalize_qk=True, interpret=False)
  loss = lambda *args: sum(jnp.sum(x.astype(jnp.float32)) for x in forward(*args))
  args = tuple(arrays[name] for name in DIFFERENTIABLE)
  return forward, jax.grad(loss, argnums=tuple(range(6))), args


def test_stages_give_each_stage_and_each_kernel_of_the_intra_stages():
  """``pallas_gpu.stages`` (what ``benchmarks.kernels --ops kda-parts`` times): the four stages
  in order, each intra stage followed by its kernels alone on their real inputs; the pair
  rows' gated operands, the block inverse's, the chunk outputs', the WY backward's, the gradient
  rows' and dg's outputs are the stages'."""
  rng = np.random.default_rng(0)
  B, T, H, K, V = 1, 40, 1, 32, 32  # two chunks of 32, the second partial
  q, k, v = (num.normal(rng, (B, T, H, width)) for width in (K, K, V))
  g = -np.abs(num.normal(rng, (B, T, H, K))) * 0.1
  beta = 1 / (1 + np.exp(-num.normal(rng, (B, T, H))))
  h0 = num.normal(rng, (B, H, K, V))
  q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  rows = pallas_gpu.stages(q, k, v, g, beta, h0, scale=K ** -0.5, chunk_size=32,
                           l2_normalize_qk=True, interpret=True)
  # The kernels read q and k as given (bfloat16) and multiply in their inverse norms.
  tokens = rows[0][2][0]
  assert [x.dtype for x in tokens[:2]] == [jnp.bfloat16] * 2
  for x, inverse in zip(tokens[:2], tokens[5:]):
    np.testing.assert_allclose(np.asarray(inverse), np.asarray(l2norm.inverse_norm(x)))
  assert [name for name, _, _ in rows] == [
      "intra_forward", "intra_forward.pair_rows", "intra_forward.inverse_blocks",
      "intra_forward.chunk_outputs", "state_forward", "state_backward",
      "state_backward.state_walk_backward", "state_backward.state_cotangents[W,Qg,Kg,A,decay]",
      "intra_backward", "intra_backward.wy_dA_kk", "intra_backward.wy_columns",
      "intra_backward.gradient_rows", "intra_backward.dg"]
  needed = ("intra_forward", "intra_forward.pair_rows", "intra_forward.inverse_blocks",
            "intra_forward.chunk_outputs",
            "intra_backward", "intra_backward.wy_dA_kk", "intra_backward.wy_columns",
            "intra_backward.gradient_rows", "intra_backward.dg")
  run = {name: fn(*args) for name, fn, args in rows if name in needed}
  matrices, (P_kk, T_inverse, *gated) = run["intra_forward"]
  _, _, *gated_alone = run["intra_forward.pair_rows"]
  A, T_alone, M = run["intra_forward.inverse_blocks"]
  W, U, Qg, Kg, decay = run["intra_forward.chunk_outputs"]
  assert len(gated) == len(gated_alone) == 4
  for name, expected, got in [*zip(("k_to_end", "q_from_start", "k_from_start", "total"),
                                   gated, gated_alone),
                              ("A", matrices.A, A), ("P_kk", P_kk, M), ("T", T_inverse, T_alone),
                              ("W", matrices.W, W), ("U", matrices.U, U), ("decay",
                                                                            matrices.decay, decay)]:
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6,
                               err_msg=name)
  dq, dk, dg, dv, dbeta = run["intra_backward"]
  rows_out, (_, dbeta_pairs) = run["intra_backward.gradient_rows"], run["intra_backward.wy_dA_kk"]
  dv_alone, _, dbeta_columns = run["intra_backward.wy_columns"]
  for name, expected, got in [("dq", dq, rows_out[0]), ("dk", dk, rows_out[1]),
                              ("dv", dv, dv_alone), ("dg", dg, run["intra_backward.dg"]),
                              ("dbeta", dbeta, dbeta_pairs + dbeta_columns.sum(-1, keepdims=True))]:
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-6, atol=1e-6,
                               err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_forward_only_call_writes_no_P_kk_and_keeps_product_operands_in_v_dtype(dtype):
  """A call that is not differentiated writes no P_kk (only the backward reads it); a
  differentiated call writes P_kk in v's dtype (the backward only multiplies it into dbeta's
  sums). A_qk, T and U are stored in v's dtype either way (only products read A_qk and T, and
  U enters only the state forward's V~, which the backward reads as the state forward kept
  it). Both calls give the same o and final state."""
  rng = np.random.default_rng(2)
  B, T, H, K, V = 1, 40, 2, 32, 16  # two chunks of 32, the second partial
  q, k = (num.normal(rng, (B, T, H, K)) for _ in range(2))
  v = jnp.asarray(num.normal(rng, (B, T, H, V)), dtype)
  g = -np.abs(num.normal(rng, (B, T, H, K))) * 0.1
  beta = 1 / (1 + np.exp(-num.normal(rng, (B, T, H))))
  h0 = num.normal(rng, (B, H, K, V))
  call = functools.partial(pallas_gpu.scan, scale=K ** -0.5, chunk_size=32, interpret=True)
  args = (q, k, v, g, beta, h0, None)

  def kernel_outputs(run):
    with pallas_gpu._recording_kernel_calls() as kernels:
      out = run()
    return out, {name: (fn(*kernel_args), kernel_args) for name, fn, kernel_args in kernels}

  forward_only, alone = kernel_outputs(lambda: call(*args))
  differentiated, with_vjp = kernel_outputs(lambda: jax.vjp(call, *args)[0])
  (A, T_alone), (A_vjp, T_vjp, M) = alone["inverse_blocks"][0], with_vjp["inverse_blocks"][0]
  assert (A.dtype, T_alone.dtype, A_vjp.dtype) == (dtype, dtype, dtype)
  assert (T_vjp.dtype, M.dtype) == (dtype, dtype)
  assert alone["chunk_outputs"][1][-1].dtype == dtype  # the T the chunk outputs read
  U_alone, U_vjp = alone["chunk_outputs"][0][1], with_vjp["chunk_outputs"][0][1]
  assert (U_alone.dtype, U_vjp.dtype) == (dtype, dtype)
  np.testing.assert_array_equal(np.asarray(A, np.float32), np.asarray(A_vjp, np.float32))
  for name, got, expected in zip(("o", "final state"), forward_only, differentiated):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                                  err_msg=name)


def test_gpu_chunk_outputs_over_consecutive_chunks_equal_one_chunk_a_program(monkeypatch):
  """On a large call each chunk-outputs program loops over consecutive chunks
  (``_output_chunks``); small calls, as the other tests make, keep one chunk a program. With the
  grid's floor lowered the loop runs here, over the chunks of two packed segments (the last
  chunk partial, the normalised q and k read in bf16), and gives the same outputs exactly."""
  rng = np.random.default_rng(3)
  B, T, H, K, V, C = 1, 250, 2, 32, 16, 32  # eight chunks of two sub-chunks, the last partial
  q, k = (jnp.asarray(num.normal(rng, (B, T, H, K)), jnp.bfloat16) for _ in range(2))
  v = num.normal(rng, (B, T, H, V))
  g = -np.abs(num.normal(rng, (B, T, H, K))) * 0.1
  beta = 1 / (1 + np.exp(-num.normal(rng, (B, T, H))))
  segments = jnp.asarray([[0] * 100 + [1] * 150], jnp.int32)
  call = functools.partial(pallas_gpu.scan, scale=K ** -0.5, chunk_size=C, l2_normalize_qk=True,
                           interpret=True)
  with pallas_gpu._recording_kernel_calls() as kernels:
    jax.vjp(call, q, k, v, g, beta, num.normal(rng, (B, H, K, V)), segments)
  [(one_chunk, args)] = [(fn, args) for name, fn, args in kernels if name == "chunk_outputs"]
  *tokens, T_inverse = args
  sizes = pallas_gpu.Sizes(B, 256, H, K, V, C)
  n = pallas_gpu._column_blocks(sizes, pallas_gpu.OUTPUT_COLUMNS)
  assert pallas_gpu._output_chunks(sizes, n) == 1
  monkeypatch.setattr(pallas_gpu, "OUTPUT_PROGRAMS", 1)
  assert pallas_gpu._output_chunks(sizes, n) == 8
  looped = pallas_gpu._chunk_outputs(
      pallas_gpu.KDA, tokens[:-3], tokens[-3:], T_inverse, scale=K ** -0.5,
      normalized=(0, 1), sizes=sizes, interpret=True,
      precision=pallas_gpu.precision_for(v.dtype, True))
  expected = one_chunk(*args)
  assert len(expected) == len(looped) == len(pallas_gpu._CHUNK_OUTPUTS)
  for name, e, got in zip(pallas_gpu._CHUNK_OUTPUTS, expected, looped):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(e), err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernels_keep_states_and_their_cotangents_in_v_dtype(dtype):
  """The states the forward keeps for the backward, its pseudo-values V~ = U - W S, the reverse
  walk's dS and dV~ are stored in v's dtype (the products round them to it on the GPU), the
  state before the first chunk being h0 so rounded; the final state and dh0 stay float32. V~
  is each chunk's U - W S from the chunk matrices and kept states, and dV~ the last chunk's
  A_qk^T dO + Kg dS_final."""
  rng = np.random.default_rng(1)
  B, T, H, K, V, C = 1, 64, 1, 32, 32, 32  # two chunks
  q, k, v = (num.normal(rng, (B, T, H, width)) for width in (K, K, V))
  g = -np.abs(num.normal(rng, (B, T, H, K))) * 0.1
  beta = 1 / (1 + np.exp(-num.normal(rng, (B, T, H))))
  h0 = num.normal(rng, (B, H, K, V))
  rows = {name: (fn, args) for name, fn, args in pallas_gpu.stages(
      q, k, jnp.asarray(v, dtype), g, beta, h0, scale=K ** -0.5, chunk_size=C,
      interpret=True)}
  run = lambda name: rows[name][0](*rows[name][1])
  _, final, states, pseudo_values = run("state_forward")
  dstates, dh0, d_pseudo = run("state_backward.state_walk_backward")
  assert {x.dtype for x in (states, dstates, pseudo_values, d_pseudo)} == {jnp.dtype(dtype)}
  assert (final.dtype, dh0.dtype) == (jnp.float32, jnp.float32)
  assert states.shape == dstates.shape == (B, T // C, H, K, V)
  assert pseudo_values.shape == d_pseudo.shape == (B, T, H, V)
  np.testing.assert_array_equal(np.asarray(states[:, 0], np.float32),
                                np.asarray(jnp.asarray(h0).astype(dtype), np.float32))
  assert np.all(np.isfinite(np.asarray(dstates, np.float32)))
  assert np.any(np.asarray(dstates[:, 0], np.float32) != 0)

  matrices, dO, dfinal = (rows["state_backward"][1][i] for i in (0, 3, 4))
  as_chunks = lambda x: np.asarray(x, np.float32)[0, :, 0].reshape(T // C, C, -1)
  W, U, Qg, Kg, A = (as_chunks(getattr(matrices, name)) for name in ("W", "U", "Qg", "Kg", "A"))
  S = np.asarray(states, np.float32)[0, :, 0]
  tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
  num.assert_close(as_chunks(pseudo_values), U - W @ S, tolerance)
  last_d_pseudo = A[-1].T @ as_chunks(dO)[-1] + Kg[-1] @ np.asarray(dfinal)[0, 0]
  num.assert_close(as_chunks(d_pseudo)[-1], last_d_pseudo, tolerance)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_kernels_lower_to_triton(dtype):
  """Forward and backward lower through Pallas' Triton lowering for CUDA on this CPU machine
  (the Triton compiler itself runs on the GPU)."""
  forward, gradient, args = _kernel_functions(pallas_gpu, dtype)
  for fn in (forward, gradient):
    num.assert_lowers_to_triton(fn, *args)


def _sub_chunk_case(rng, chunk: int, decay: float, K: int = 32, V: int = 16):
  """One chunk's random token inputs (q, k, g, v, beta) as [chunk, width] float32, its packed-row
  masks (one to three segments drawn: with three, pairs two sub-chunks apart nearly always
  straddle a segment and are masked) and the interpret-mode GPU primitives, for the sub-chunk
  tests."""
  from ops.kda import _kernel_chunk
  q, k = (num.normal(rng, (chunk, K), scale=0.3) for _ in range(2))
  g = -num.uniform(rng, (chunk, K), 0.0, decay)
  v = num.normal(rng, (chunk, V))
  beta = num.uniform(rng, (chunk, 1), 0.0, 1.0)
  index = jnp.asarray(np.sort(rng.integers(0, rng.integers(1, 4), (1, chunk))), jnp.int32)
  masks = [m[0] for m in _kernel_chunk.packed_row_masks(index, 1, chunk, chunk)]
  prims = pallas_gpu.primitives(pallas_gpu.precision_for(jnp.float32, interpret=True))
  return (q, k, g, v, beta), masks, prims


def _sub_chunk_steps(tokens, masks, prims):
  """(block(b): sub-chunk b's row slice, load(a): sub-chunk a's ``Rows``, the whole chunk's
  ``Rows``) for running ``_kernel_subchunk``'s steps on one chunk's [C, width] arrays."""
  from ops.kda import _kernel_subchunk as sub
  S = sub.SUB
  block = lambda b: slice(b * S, (b + 1) * S)
  rows = sub.load_rows(tokens, *masks, scale=1.0)
  return block, lambda a: sub.Rows(*(x[block(int(a))] for x in rows)), rows


def _three_step_forward(tokens, masks, prims):
  """A chunk's matrices (whole float32 arrays by ``ChunkMatrices`` name), T and M = P_kk from
  the GPU forward's three steps (``_kernel_subchunk``: ``pair_rows`` for each sub-chunk, then
  ``inverse_blocks`` and ``chunk_outputs``), as its three kernels run them; the blocks above the
  diagonal of A_qk and M, never stored, stay NaN (and must never be read) until A_qk's are
  written as zeros, as the block inverse's kernel writes them."""
  from ops.kda import _kernel_subchunk as sub
  S, chunk = sub.SUB, tokens[0].shape[0]
  n = chunk // S
  block, load, rows = _sub_chunk_steps(tokens, masks, prims)
  square = {name: np.full((chunk, chunk), np.nan, np.float32) for name in ("A", "M", "T")}
  with jax.disable_jit():  # the sub-chunk loops run in Python, with concrete indices
    for j in range(n):
      def store(name, value, a, j=j):
        square[name][block(j), block(int(a))] = value
      sub.pair_rows(load, j, prims, store)
  M = square["M"]
  sub.inverse_blocks(lambda b, a: M[block(b), block(a)], lambda b: rows.beta[block(b)], n, prims,
                     lambda value, b, a: square["T"].__setitem__((block(b), block(a)), value))
  above = np.kron(np.triu(np.ones((n, n), bool), 1), np.ones((S, S), bool))
  assert np.isnan(square["A"][above]).all()
  got = {"A": np.where(above, 0.0, square["A"])}
  sub.chunk_outputs(rows, square["T"], prims,
                    lambda name, value: got.__setitem__(name, np.asarray(value)))
  return got, square["T"], M


@pytest.mark.parametrize("chunk, decay", [(64, 0.1), (64, 20.0), (16, 1.0)])
@given(seed=num.seeds())
def test_sub_chunk_intra_forward_equals_the_level_split(seed, chunk, decay):
  """The GPU intra forward's three steps on 16-row sub-chunks (``ops.kda._kernel_subchunk``)
  give T and the chunk matrices of the whole-chunk level split (``_kernel_chunk``), packed
  segments and strong decay (up to -20 a token, exp(-1280) across a chunk) included; the weak
  decay keeps the products across sub-chunks (and across segments, masked) large."""
  from ops.kda import _kernel_chunk
  rng = np.random.default_rng(seed)
  K, V = 32, 16
  (q, k, g, v, beta), masks, prims = _sub_chunk_case(rng, chunk, decay, K, V)
  whole = _kernel_chunk.Chunk(q, k, g, beta, *masks, prims)
  expected = _kernel_chunk.intra_forward(whole, v)
  got, T, _ = _three_step_forward((q, k, g, v, beta), masks, prims)
  num.assert_close(whole.T, T, num.TOL_F32, "T")
  for name in expected._fields:  # every entry written (NaN otherwise) and equal
    num.assert_close(getattr(expected, name), got[name], num.TOL_F32, name, floor=1e-30)


@pytest.mark.parametrize("chunk, decay", [(64, 0.1), (64, 20.0), (32, 1.0)])
@given(seed=num.seeds())
def test_sub_chunk_intra_backward_equals_the_level_split(seed, chunk, decay):
  """The GPU intra backward's steps (``ops.kda._kernel_subchunk``: ``wy_dA_kk_chunk``,
  ``wy_column_block`` and ``gated_operands`` on the whole chunk by column blocks,
  ``gradient_rows`` for each 16-row sub-chunk,
  ``dg_from_rows``, on the forward's P_kk and T) give the token gradients of the whole-chunk
  level split (``_kernel_chunk.token_gradients``) from random cotangents of every chunk
  matrix, packed segments and strong decay included."""
  from ops.kda import _kernel_chunk
  from ops.kda import _kernel_subchunk as sub
  rng = np.random.default_rng(seed)
  K, V = 32, 16
  (q, k, g, v, beta), masks, prims = _sub_chunk_case(rng, chunk, decay, K, V)
  cotangents = _kernel_chunk.ChunkMatrices(
      W=num.normal(rng, (chunk, K)), U=num.normal(rng, (chunk, V)), Qg=num.normal(rng, (chunk, K)),
      Kg=num.normal(rng, (chunk, K)), A=num.normal(rng, (chunk, chunk)),
      decay=num.normal(rng, (1, K)))
  scale = 0.7
  expected = _kernel_chunk.token_gradients(
      _kernel_chunk.load((q, k, g, v, beta), *masks, prims, scale), v, cotangents, scale)
  tokens = (q * scale, k, g, v, beta)  # the steps below take q scaled, as load_rows gives it
  _, T, P_kk = _three_step_forward(tokens, masks, prims)
  n = chunk // sub.SUB
  block, load, whole = _sub_chunk_steps(tokens, masks, prims)

  def cotangent(name, b, a=None):
    x = getattr(cotangents, name)
    return x if b is None else x[block(int(b)), block(int(a))] if a is not None else x[
        block(int(b))]

  wy = {"dv": np.full((chunk, V), np.nan, np.float32),
        "dk_w": np.full((chunk, K), np.nan, np.float32)}
  blocks = 2
  columns = lambda x, cb: jax.lax.dynamic_slice_in_dim(x, cb * (x.shape[1] // blocks),
                                                       x.shape[1] // blocks, 1)
  load_block = lambda cb: (
      sub.Rows(*(columns(x, cb) if x.shape[1] in (K, V) and x.shape[1] > 1 else x
                 for x in whole)), columns(cotangents.W, cb), columns(cotangents.U, cb))

  gated = {name: [] for name in sub.GATED}
  with jax.disable_jit():
    sub.wy_dA_kk_chunk(load_block, blocks, T, P_kk, prims, wy.__setitem__)
    for cb in range(blocks):
      dv, dk_w, dbeta = sub.wy_column_block(*load_block(cb), T, prims)
      for name, value in (("dv", dv), ("dk_w", dk_w)):
        wy[name][:, cb * value.shape[1]:(cb + 1) * value.shape[1]] = value
      wy["dbeta"] = wy["dbeta"] + dbeta
      x = load_block(cb)[0]
      parts = [sub.gated_operands(sub.Rows(*(y[block(b)] for y in x)), prims) for b in range(n)]
      for name in sub.GATED:
        gated[name].append(np.concatenate([part[name] for part in parts]))
  gated = {name: np.concatenate(values, axis=1) for name, values in gated.items()}
  assert gated["total"].shape == (n, K)
  load_gated = lambda name, b: (gated[name][int(b)][None] if name == "total"
                                else gated[name][block(int(b))])
  rows = {}
  with jax.disable_jit():
    for j in range(n):
      sub.gradient_rows(load, load_gated, cotangent,
                        lambda b, a: wy["dA_kk"][block(int(b)), block(int(a))],
                        lambda b: wy["dk_w"][block(int(b))], j, n, prims,
                        lambda name, value, j=j: rows.setdefault(name, []).append(value),
                        scale=1.0)
  got = {name: np.concatenate(values) for name, values in rows.items()}
  got["dq"] = got["dq"] * scale  # d/d(unscaled q) = scale d/d(scaled q)
  got.update(dv=wy["dv"], dbeta=wy["dbeta"])
  got["dg"] = sub.dg_from_rows(got["dG"], got["through_end"])
  for name, value in zip(sub.GRADIENTS, expected):
    num.assert_close(value, got[name], num.sub_chunk_gradient_tolerance(name == "dg", decay),
                     name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tpu_kernels_lower_to_mosaic(dtype):
  """Forward and backward lower to Mosaic for a TPU on this CPU machine (``jax.export``); an
  unsupported primitive (a cumulative sum, say) would raise here."""
  forward, gradient, args = _kernel_functions(pallas_tpu, dtype)
  for fn in (forward, gradient):
    num.export_for_tpu(fn, *args)


def test_none_resolves_to_the_platform_kernels(monkeypatch):
  """``implementation=None`` picks "pallas_tpu" on a TPU and "pallas_gpu" on a GPU (the platform
  faked); a chunk size the kernels cannot run falls back to "xla" with a warning, and naming the
  kernels for it raises."""
  for platform, expected in (("tpu", "pallas_tpu"), ("gpu", "pallas_gpu"), ("cpu", "xla")):
    monkeypatch.setattr(jax, "default_backend", lambda platform=platform: platform)
    assert resolve_implementation(None, kda_module.IMPLEMENTATIONS,
                                  kda_module.DEFAULT_BY_PLATFORM) == expected
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  case = Case(time=20)
  arrays = case.arrays()
  with pytest.warns(UserWarning, match="pallas_tpu.*power of two.*using 'xla'"):
    o, _ = kda(**arrays, chunk_size=48, use_qk_l2norm_in_kernel=case.l2norm)
  num.assert_close(case_oracle(case, arrays)[0], o, TOL_F32, "o")
  with pytest.raises(ValueError, match="pallas_tpu.*power of two"):
    kda(**arrays, chunk_size=48, implementation="pallas_tpu")


def test_keys_too_wide_for_the_gpu_kernels_fall_back_on_a_gpu(monkeypatch):
  """Compiled for a GPU (the platform faked), K above ``pallas_gpu.MAX_KEY_DIM`` after padding
  to a power of two is refused with K named: ``None`` falls back to "xla" with a warning,
  naming "pallas_gpu" raises. Interpreted, the kernels take any K."""
  assert pallas_gpu.unsupported(64, 128, interpret=False) is None
  assert pallas_gpu.unsupported(64, 256, interpret=True) is None
  assert "K = 192" in pallas_gpu.unsupported(64, 192, interpret=False)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  rng = np.random.default_rng(0)
  B, T, H, K, V = 1, 20, 1, 256, 16
  q, k = (num.normal(rng, (B, T, H, K)) for _ in range(2))
  v = num.normal(rng, (B, T, H, V))
  g = -np.abs(num.normal(rng, (B, T, H, K))) * 0.1
  beta = 1 / (1 + np.exp(-num.normal(rng, (B, T, H))))
  with pytest.warns(UserWarning, match=r"pallas_gpu.*K must be at most 128.*using 'xla'"):
    o, _ = kda(q, k, v, g, beta)
  num.assert_close(kda(q, k, v, g, beta, implementation="reference")[0], o, TOL_F32, "o")
  with pytest.raises(ValueError, match=r"pallas_gpu.*K must be at most 128.*got K = 256"):
    kda(q, k, v, g, beta, implementation="pallas_gpu")


# --- packed sequences -------------------------------------------------------------------------

# Per row: segment labels and lengths. Ids change value but not always upward (a reset is any
# change); boundaries fall exactly on the chunk edge t = 64 and beside it, at t = 63 and t = 65.
# Row 0's segment lengths (64, 1, 85) are also the sequence lengths of CU_SEQLENS_GRAD, so the
# separate runs of both gradient tests share their compilations.
PACKED_ROWS = (((7, 64), (3, 1), (7, 85)), ((2, 63), (5, 2), (1, 85)), ((4, 5), (0, 59), (4, 86)))
PACKED_CASE = dataclasses.replace(BASE, batch=3, seed=6)


def _packed_segment_ids():
  return jnp.asarray([np.repeat(*zip(*row)) for row in PACKED_ROWS], jnp.int32)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_segments_equal_separate_runs(implementation):
  """Packed rows equal each segment run alone (the oracle per segment): the first segment from
  the row's initial state, the others from zero; the final state is the last segment's."""
  ids = _packed_segment_ids()
  case = PACKED_CASE
  arrays = case.arrays()
  o, final_state = _forward({**arrays, "segment_ids": ids}, implementation=implementation,
                            **case.options)
  bounds = num.segment_bounds(ids)
  assert {b for row in bounds for _, b in row[:-1]} >= {63, 64, 65}
  for b, row_bounds in enumerate(bounds):
    state = arrays["initial_state"][b:b + 1]
    for i, (start, stop) in enumerate(row_bounds):
      piece = {k: v[b:b + 1, start:stop] for k, v in arrays.items() if k in TIME_MAJOR}
      seg_o, state = case_oracle(case, {**piece, "initial_state": state if i == 0 else None})
      num.assert_close(seg_o, o[b:b + 1, start:stop], TOL_F32, f"o row {b} segment {i}")
    num.assert_close(state, final_state[b:b + 1], TOL_F32, f"final_state row {b}")
  # The oracle's own segment handling agrees (a check of the oracle's reset).
  ref_o, ref_state = case_oracle(case, arrays, segment_ids=ids)
  num.assert_close(ref_o, o, TOL_F32, "o vs oracle with segment_ids")
  num.assert_close(ref_state, final_state, TOL_F32, "final_state vs oracle with segment_ids")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_segment_ids_single_token(implementation):
  """segment_ids on a sequence of one token (no boundary can fall inside it)."""
  case = dataclasses.replace(BASE, batch=2, time=1, with_segment_ids=True, seed=17)
  arrays = case.arrays()
  o, final_state = _forward(arrays, implementation=implementation, **case.options)
  ref_o, ref_state = case_oracle(case, arrays)
  num.assert_close(ref_o, o, TOL_F32, "o")
  num.assert_close(ref_state, final_state, TOL_F32, "final_state")


# cu_seqlens: boundaries at 15, 63, 64 (the chunk edge, after a sequence of one token) and 129;
# for the gradients at 64 and 65 (sequences of 64, 1 and 85 tokens).
CU_SEQLENS = (0, 15, 63, 64, 129, 150)
CU_SEQLENS_GRAD = (0, 64, 65, 150)
VARLEN_CASE = dataclasses.replace(BASE, seed=7)


def _varlen_case_arrays(cu_seqlens):
  """VARLEN_CASE's arrays with one initial state per sequence ([N, HV, K, V])."""
  case = VARLEN_CASE
  arrays = case.arrays()
  rng = np.random.default_rng(case.seed + 2)
  arrays["initial_state"] = num.normal(
      rng, (len(cu_seqlens) - 1, case.value_heads, case.key_dim, case.value_dim))
  return arrays


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cu_seqlens_equal_separate_runs(implementation):
  """Sequences packed in one row by ``cu_seqlens`` equal each run alone (the oracle per
  sequence), each from its own initial state, with per-sequence final states."""
  case, arrays = VARLEN_CASE, _varlen_case_arrays(CU_SEQLENS)
  o, final_state = _forward(arrays, implementation=implementation, cu_seqlens=CU_SEQLENS,
                            **case.options)
  assert final_state.shape == (len(CU_SEQLENS) - 1,) + arrays["initial_state"].shape[1:]
  for n, (start, stop) in enumerate(zip(CU_SEQLENS[:-1], CU_SEQLENS[1:])):
    piece = {k: v[:, start:stop] for k, v in arrays.items() if k in TIME_MAJOR}
    piece["initial_state"] = arrays["initial_state"][n:n + 1]
    seq_o, seq_state = case_oracle(case, piece)
    num.assert_close(seq_o, o[:, start:stop], TOL_F32, f"o sequence {n}")
    num.assert_close(seq_state, final_state[n:n + 1], TOL_F32, f"final_state sequence {n}")
  ref_o, ref_state = case_oracle(case, arrays, cu_seqlens=CU_SEQLENS)
  num.assert_close(ref_o, o, TOL_F32, "o vs oracle with cu_seqlens")
  num.assert_close(ref_state, final_state, TOL_F32, "final_state vs oracle with cu_seqlens")


# The TPU kernels take the same re-layout path as the GPU kernels, whose gradients run here.
@pytest.mark.parametrize("implementation", ["reference", "xla", "pallas_gpu"])
def test_cu_seqlens_gradients_equal_separate_runs(implementation):
  """Gradients through ``cu_seqlens`` equal those of each sequence run alone ("reference")."""
  case, arrays = VARLEN_CASE, _varlen_case_arrays(CU_SEQLENS_GRAD)
  d_o, d_state = case.cotangents(num_states=len(CU_SEQLENS_GRAD) - 1)
  (_, _), grads = _forward_and_vjp(arrays, (d_o, d_state), implementation=implementation,
                                   cu_seqlens=CU_SEQLENS_GRAD, **case.options)
  for n, (start, stop) in enumerate(zip(CU_SEQLENS_GRAD[:-1], CU_SEQLENS_GRAD[1:])):
    piece = {k: v[:, start:stop] for k, v in arrays.items() if k in TIME_MAJOR}
    piece["initial_state"] = arrays["initial_state"][n:n + 1]
    (_, _), seq_grads = _forward_and_vjp(piece, (d_o[:, start:stop], d_state[n:n + 1]),
                                         implementation="reference", **case.options)
    for name in TIME_MAJOR[:5]:
      num.assert_close(seq_grads[name], grads[name][:, start:stop], TOL_F32,
                       f"d{name} sequence {n}")
    num.assert_close(seq_grads["initial_state"], grads["initial_state"][n:n + 1], TOL_F32,
                     f"dinitial_state sequence {n}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cu_seqlens_empty_sequence_and_no_initial_state(implementation):
  """An empty sequence (cu[n] == cu[n + 1]) keeps its zero state; without initial states every
  sequence starts from zero. ``cu_seqlens`` given as a list."""
  case = dataclasses.replace(VARLEN_CASE, time=80, with_initial_state=False, seed=8)
  arrays = case.arrays()
  cu = [0, 30, 30, 80]
  o, final_state = kda(**arrays, cu_seqlens=cu, scale=case.scale,
                       use_qk_l2norm_in_kernel=case.l2norm, return_final_state=True,
                       implementation=implementation)
  ref_o, ref_state = case_oracle(case, arrays, cu_seqlens=cu)
  assert final_state.shape[0] == 3
  np.testing.assert_array_equal(np.asarray(final_state[1]), 0.0)
  num.assert_close(ref_o, o, TOL_F32, "o")
  num.assert_close(ref_state, final_state, TOL_F32, "final_state")


# --- gated_delta_rule -------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("implementation", "scale", "l2norm"))
def _gdr_forward_and_vjp(arrays, cotangents, *, implementation, scale, l2norm):
  """((o, final_state), gradients) of ``gated_delta_rule``, as ``_forward_and_vjp``."""
  run = lambda x: gated_delta_rule(**x, scale=scale, use_qk_l2norm_in_kernel=l2norm,
                                   return_final_state=True, implementation=implementation)
  outputs, vjp = jax.vjp(run, arrays)
  return outputs, vjp(cotangents)[0]


# A wrapper that broadcasts the gate: the forms' own tests cover the kernels.
@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_gated_delta_rule_equals_kda_with_broadcast_gate(implementation):
  """One gate per head ([B, T, HV]) is KDA with that gate on every key channel; the gradient of
  the head gate is the sum over channels of KDA's."""
  case = dataclasses.replace(BASE, seed=9)
  arrays, cotangents = case.arrays(), case.cotangents()
  head_gate = arrays["g"][..., 0]
  broadcast = jnp.broadcast_to(head_gate[..., None], arrays["g"].shape)
  (o, state), grads = _gdr_forward_and_vjp({**arrays, "g": head_gate}, cotangents,
                                           implementation=implementation, **case.options)
  (kda_o, kda_state), kda_grads = _forward_and_vjp(
      {**arrays, "g": broadcast}, cotangents, implementation=implementation, **case.options)
  num.assert_close(kda_o, o, TOL_F32, "o vs kda")
  num.assert_close(kda_state, state, TOL_F32, "final_state vs kda")
  ref_o, ref_state = case_oracle(case, {**arrays, "g": broadcast})
  num.assert_close(ref_o, o, TOL_F32, "o vs oracle")
  num.assert_close(ref_state, state, TOL_F32, "final_state vs oracle")
  assert grads["g"].shape == head_gate.shape
  num.assert_close(kda_grads["g"].sum(-1), grads["g"], TOL_F32, "dg")
  for name in ("q", "k", "v", "beta", "initial_state"):
    num.assert_close(kda_grads[name], grads[name], TOL_F32, f"d{name}")


# --- decoding token by token ------------------------------------------------------------------

_step = jax.jit(kda_step,
                static_argnames=("scale", "use_qk_l2norm_in_kernel", "implementation"))


@pytest.mark.parametrize("implementation, step_implementation, dtype, l2norm", [
    ("reference", "reference", "float32", True), ("xla", "pallas_gpu", "float32", True),
    ("pallas_gpu", "reference", "bfloat16", False), ("xla", "pallas_gpu", "bfloat16", False),
    ("pallas_tpu", "pallas_tpu", "float32", True)])
def test_step_equals_forward(implementation, step_implementation, dtype, l2norm):
  """``kda_step`` over the tokens equals the full forward (GVA, from an initial state); the
  fused decode kernels ("pallas_gpu", "pallas_tpu": interpret mode on CPU) included."""
  case = dataclasses.replace(BASE, dtype=dtype, l2norm=l2norm, seed=10)
  arrays = case.arrays()
  o, final_state = _forward(arrays, implementation=implementation, **case.options)
  state = arrays["initial_state"]
  for t in range(case.time):
    token = {k: v[:, t] for k, v in arrays.items() if k in TIME_MAJOR}
    o_t, state = _step(**token, state=state, scale=case.scale, use_qk_l2norm_in_kernel=l2norm,
                       implementation=step_implementation)
    assert o_t.dtype == o.dtype and state.dtype == jnp.float32
    num.assert_close(o[:, t], o_t, tolerance(o_t), f"o[{t}]")
  # The kernels read bfloat16 inputs as they are (AgreementBase.keeps_input_dtype).
  narrow = implementation in ("pallas_gpu", "pallas_tpu") and dtype == "bfloat16"
  num.assert_close(final_state, state, num.TOL_BF16 if narrow else TOL_F32, "final_state")


def test_step_without_state_starts_from_zero():
  case = Case(batch=1, time=1, heads=1, group=2, with_initial_state=False, seed=11)
  arrays = case.arrays()
  ref_o, ref_state = case_oracle(case, arrays)
  o, state = kda_step(**{k: v[:, 0] for k, v in arrays.items()}, use_qk_l2norm_in_kernel=True)
  assert state.shape == ref_state.shape and state.dtype == jnp.float32
  num.assert_close(ref_o[:, 0], o, TOL_F32, "o")
  num.assert_close(ref_state, state, TOL_F32, "state")


# --- a long sequence --------------------------------------------------------------------------

# T = 16384 tokens with a quarter of the key channels never decaying (g = 0), so the state keeps
# information from the whole sequence, and the rest weakly decaying (logsigmoid / 16). Float32
# rounding could accumulate along the sequence (a random walk of 2^14 roundings would reach
# sqrt(16384) x 6e-8 = 8e-6), but the delta rule's update contracts the state along each key,
# so errors do not grow: measured 2.6e-7 (xla) and 1.7e-7 (reference). The float32 tolerance
# holds with margin.
TOL_LONG = TOL_F32


def test_long_sequence_stays_finite_and_close():
  case = Case(batch=1, time=16384, heads=1, group=1, key_dim=16, value_dim=16,
              gate_normalizer=16.0, zero_channels=4, seed=12)
  arrays = case.arrays()
  ref_o, ref_state = case_oracle(case, arrays)
  # The TPU kernels share every formula with the GPU kernels (and interpret far slower).
  for implementation in ("reference", "xla", "pallas_gpu"):
    o, final_state = _forward(arrays, implementation=implementation, **case.options)
    assert np.isfinite(np.asarray(o)).all(), implementation
    assert np.isfinite(np.asarray(final_state)).all(), implementation
    num.assert_close(ref_o, o, TOL_LONG, f"o ({implementation})")
    num.assert_close(ref_state, final_state, TOL_LONG, f"final_state ({implementation})")


# --- kda_gate ---------------------------------------------------------------------------------

def gate_oracle(g_raw, A_log, dt_bias=None, lower_bound=None) -> np.ndarray:
  """SPEC 3.2's gates in float64: ``-exp(A_log) softplus(g_raw + dt_bias)``, or with
  ``lower_bound``: ``lower_bound * sigmoid(exp(A_log) (g_raw + dt_bias))``."""
  g_raw = num.to_f64(g_raw)
  heads, key_dim = g_raw.shape[-2:]
  x = g_raw if dt_bias is None else g_raw + num.to_f64(dt_bias).reshape(heads, key_dim)
  a = np.exp(num.to_f64(A_log))[:, None]
  if lower_bound is None:
    return -a * np.logaddexp(0.0, x)
  return lower_bound * 0.5 * (1.0 + np.tanh(0.5 * a * x))


def _gate_inputs(seed: int, dtype="float32", raw_scale: float = 2.0):
  """g_raw [2, 5, 3, 8], A_log = log U(1, 16) [3], dt_bias [3 * 8]."""
  rng = np.random.default_rng(seed)
  return (num.normal(rng, (2, 5, 3, 8), dtype, scale=raw_scale),
          jnp.log(num.uniform(rng, (3,), 1.0, 16.0)), num.normal(rng, (24,)))


@pytest.mark.parametrize("lower_bound", [None, -5.0, -1.0])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kda_gate_matches_formula(lower_bound, with_bias, dtype):
  g_raw, A_log, dt_bias = _gate_inputs(13, dtype)
  dt_bias = dt_bias if with_bias else None
  g = kda_gate(g_raw, A_log, dt_bias, lower_bound=lower_bound)
  assert g.dtype == jnp.float32 and g.shape == g_raw.shape
  ref = gate_oracle(g_raw, A_log, dt_bias, lower_bound)
  num.assert_close(ref, g, TOL_F32, "g")
  g = np.asarray(g)
  if lower_bound is None:
    assert (g <= 0).all()
  else:  # [lower_bound, 0); exactly 0 only where sigmoid underflows float32
    assert (g >= lower_bound).all() and (g <= 0).all()
    assert (g[ref < -1e-30] < 0).all()


@pytest.mark.parametrize("lower_bound", [None, -5.0])
def test_kda_gate_extreme_inputs_and_gradients_are_finite(lower_bound):
  """Raw gates of +-1e4 (where a naive log(1 + exp(x)) overflows) give finite gates in range,
  and the gradients of g_raw, A_log and dt_bias are finite; at moderate inputs dg_raw equals
  the formula's derivative."""
  g_raw, A_log, dt_bias = _gate_inputs(14)
  extreme = g_raw.at[0].set(jnp.where(g_raw[0] > 0, 1e4, -1e4))
  g = np.asarray(kda_gate(extreme, A_log, dt_bias, lower_bound=lower_bound))
  assert np.isfinite(g).all() and (g <= 0).all()
  if lower_bound is not None:
    assert (g >= lower_bound).all()
  weights = num.normal(np.random.default_rng(15), g_raw.shape)
  loss = lambda *a: jnp.sum(kda_gate(*a, lower_bound=lower_bound) * weights)
  for raw in (g_raw, extreme):
    grads = jax.grad(loss, argnums=(0, 1, 2))(raw, A_log, dt_bias)
    for name, grad in zip(("g_raw", "A_log", "dt_bias"), grads):
      assert np.isfinite(np.asarray(grad)).all(), name
  x = num.to_f64(g_raw) + num.to_f64(dt_bias).reshape(3, 8)
  a = np.exp(num.to_f64(A_log))[:, None]
  sig = lambda z: 0.5 * (1.0 + np.tanh(0.5 * z))
  expected = (-a * sig(x) if lower_bound is None
              else lower_bound * sig(a * x) * (1 - sig(a * x)) * a) * num.to_f64(weights)
  num.assert_close(expected, jax.grad(loss)(g_raw, A_log, dt_bias), TOL_F32, "dg_raw")


@pytest.mark.parametrize("lower_bound", [-5.5, 0.0, 1.0])
def test_kda_gate_bad_lower_bound_raises(lower_bound):
  with pytest.raises(ValueError, match="lower_bound"):
    kda_gate(*_gate_inputs(16), lower_bound=lower_bound)


# --- malformed arguments ----------------------------------------------------------------------

def _valid_arguments(batch: int = 2) -> dict:
  """Well-formed arguments: time 5, 2 q/k heads, 4 value heads, K = 16, V = 8."""
  return Case(batch=batch, time=5, heads=2, group=2, key_dim=16, value_dim=8).arrays()


def _replace(name: str, make):
  """A change of the valid arguments that sets ``name`` to ``make(old value)``."""
  return lambda args: {**args, name: make(args[name])}


def _grow(axis: int):
  """A change that lengthens ``axis`` by one (repeating its first entry)."""
  return lambda x: jnp.concatenate([x, jnp.take(x, jnp.array([0]), axis)], axis)


def _value_heads(n: int):
  """A change to ``n`` value heads in v, g, beta and initial_state together."""
  def change(args):
    return {**args, "v": args["v"][:, :, :n], "g": args["g"][:, :, :n],
            "beta": args["beta"][:, :, :n], "initial_state": args["initial_state"][:, :n]}
  return change


BAD_ARGUMENTS = {  # id: (change, regex the message must match)
    "value_heads_not_multiple_of_heads": (_value_heads(3), r"\b(q|k|v)\b"),
    "q_rank": (_replace("q", lambda x: x[0]), r"\bq\b"),
    "k_heads": (_replace("k", _grow(2)), r"\b(q|k)\b"),
    "k_key_dim": (_replace("k", _grow(3)), r"\b(q|k)\b"),
    "k_time": (_replace("k", _grow(1)), r"\b(q|k)\b"),
    "v_batch": (_replace("v", _grow(0)), r"\b(q|v)\b"),
    "v_time": (_replace("v", _grow(1)), r"\b(q|v)\b"),
    "v_rank": (_replace("v", lambda x: x[0]), r"\bv\b"),
    "g_key_dim": (_replace("g", _grow(3)), r"\bg\b"),
    "g_heads": (_replace("g", _grow(2)), r"\bg\b"),
    "g_time": (_replace("g", _grow(1)), r"\bg\b"),
    "g_per_head_layout": (_replace("g", lambda x: x[..., 0]), r"\bg\b"),
    "g_positive": (_replace("g", lambda x: x.at[1, 2, 3, 4].set(0.25)), r"\bg\b"),
    "beta_heads": (_replace("beta", _grow(2)), r"\bbeta\b"),
    "beta_rank": (_replace("beta", lambda x: x[..., None]), r"\bbeta\b"),
    "initial_state_bfloat16": (_replace("initial_state", lambda x: x.astype(jnp.bfloat16)),
                               r"\binitial_state\b"),
    "initial_state_float16": (_replace("initial_state", lambda x: x.astype(jnp.float16)),
                              r"\binitial_state\b"),
    "initial_state_value_dim": (_replace("initial_state", _grow(3)), r"\binitial_state\b"),
    "initial_state_key_dim": (_replace("initial_state", _grow(2)), r"\binitial_state\b"),
    "initial_state_batch": (_replace("initial_state", _grow(0)), r"\binitial_state\b"),
    "initial_state_rank": (_replace("initial_state", lambda x: x[0]), r"\binitial_state\b"),
    "segment_ids_shape": (lambda a: {**a, "segment_ids": jnp.zeros((2, 6), jnp.int32)},
                          r"\bsegment_ids\b"),
    "unknown_implementation": (lambda a: {**a, "implementation": "cuda"}, r"\bimplementation\b"),
}


@pytest.mark.parametrize("change, pattern", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bad_argument_raises(implementation, change, pattern):
  with pytest.raises(ValueError, match=pattern):
    kda(**change({**_valid_arguments(), "implementation": implementation}))


def test_unknown_implementation_names_the_choices():
  with pytest.raises(ValueError, match=r"implementation") as info:
    kda(**_valid_arguments(), implementation="cuda")
  for allowed in IMPLEMENTATIONS:
    assert allowed in str(info.value), str(info.value)


def test_positive_gate_is_not_checked_under_jit():
  """Under jit the gate is abstract: no value check (and no error) there."""
  args = _valid_arguments()
  args["g"] = args["g"].at[0, 0, 0, 0].set(0.25)
  o, _ = jax.jit(lambda a: kda(**a, implementation="reference"))(args)
  assert o.shape == args["v"].shape


BAD_VARLEN = {  # cu_seqlens with one row of 5 tokens (unless stated); id: (arguments, regex)
    # Without initial states, so that the cu_seqlens error is the only one.
    "batch_not_one": (dict(batch=2, cu_seqlens=[0, 5]), r"\bcu_seqlens\b"),
    "not_starting_at_zero": (dict(cu_seqlens=[1, 5]), r"\bcu_seqlens\b"),
    "not_ending_at_time": (dict(cu_seqlens=[0, 2, 4]), r"\bcu_seqlens\b"),
    "past_time": (dict(cu_seqlens=[0, 3, 6]), r"\bcu_seqlens\b"),
    "decreasing": (dict(cu_seqlens=[0, 4, 2, 5]), r"\bcu_seqlens\b"),
    "not_one_dimensional": (dict(cu_seqlens=np.array([[0, 5]])), r"\bcu_seqlens\b"),
    # With the row's one initial state for two sequences.
    "initial_state_count": (dict(cu_seqlens=[0, 2, 5], with_state=True), r"\binitial_state\b"),
    "with_segment_ids": (dict(cu_seqlens=[0, 5], segment_ids=np.zeros((1, 5), np.int32)),
                         r"(?s)(?=.*\bsegment_ids\b)(?=.*\bcu_seqlens\b)"),
}


@pytest.mark.parametrize("kwargs, pattern", BAD_VARLEN.values(), ids=BAD_VARLEN.keys())
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bad_varlen_raises(implementation, kwargs, pattern):
  kwargs = dict(kwargs)
  args = _valid_arguments(batch=kwargs.pop("batch", 1))
  if not kwargs.pop("with_state", False):
    del args["initial_state"]
  with pytest.raises(ValueError, match=pattern):
    kda(**args, **kwargs, implementation=implementation)


@pytest.mark.parametrize("chunk_size", [0, -16, 8, 24, 100])
def test_bad_chunk_size_raises(chunk_size):
  with pytest.raises(ValueError, match=r"\bchunk_size\b"):
    kda(**_valid_arguments(), implementation="xla", chunk_size=chunk_size)


def _valid_gdr_arguments() -> dict:
  args = _valid_arguments()
  return {**args, "g": args["g"][..., 0]}


BAD_GDR_ARGUMENTS = {
    "g_per_channel_layout": (_replace("g", lambda x: jnp.stack([x] * 16, -1)), r"\bg\b"),
    "g_heads": (_replace("g", _grow(2)), r"\bg\b"),
    "g_positive": (_replace("g", lambda x: x.at[0, 1, 2].set(0.5)), r"\bg\b"),
    "beta_heads": (_replace("beta", _grow(2)), r"\bbeta\b"),
    "value_heads_not_multiple_of_heads": (_value_heads(3), r"\b(q|k|v)\b"),
}


@pytest.mark.parametrize("change, pattern", BAD_GDR_ARGUMENTS.values(),
                         ids=BAD_GDR_ARGUMENTS.keys())
def test_bad_gated_delta_rule_argument_raises(change, pattern):
  with pytest.raises(ValueError, match=pattern):
    gated_delta_rule(**change(_valid_gdr_arguments()), implementation="reference")


def _valid_step_arguments() -> dict:
  """Well-formed ``kda_step`` arguments: one token of ``_valid_arguments``."""
  args = _valid_arguments()
  args["state"] = args.pop("initial_state")
  return {k: v[:, 0] if k in TIME_MAJOR else v for k, v in args.items()}


BAD_STEP_ARGUMENTS = {
    "state_value_dim": (_replace("state", _grow(3)), r"\bstate\b"),
    "state_rank": (_replace("state", lambda x: x[0]), r"\bstate\b"),
    "state_bfloat16": (_replace("state", lambda x: x.astype(jnp.bfloat16)), r"\bstate\b"),
    "q_rank": (_replace("q", lambda x: x[:, None]), r"\bq\b"),
    "k_key_dim": (_replace("k", _grow(2)), r"\b(q|k)\b"),
    "v_heads_not_multiple": (
        lambda a: {**a, "v": a["v"][:, :3], "g": a["g"][:, :3], "beta": a["beta"][:, :3],
                   "state": a["state"][:, :3]}, r"\b(q|k|v)\b"),
    "g_key_dim": (_replace("g", _grow(2)), r"\bg\b"),
    "beta_heads": (_replace("beta", _grow(1)), r"\bbeta\b"),
}


@pytest.mark.parametrize("change, pattern", BAD_STEP_ARGUMENTS.values(),
                         ids=BAD_STEP_ARGUMENTS.keys())
def test_bad_step_argument_raises(change, pattern):
  with pytest.raises(ValueError, match=pattern):
    kda_step(**change(_valid_step_arguments()))
