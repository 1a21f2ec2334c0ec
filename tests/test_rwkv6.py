"""Tests of ``ops.rwkv6`` against SPEC.md 2.1 (the RWKV-6 wkv recurrence).

The ground truth is ``oracle`` below: SPEC 2.1 transcribed token by token in float64 NumPy
(``o_t = (scale r_t)^T (S + diag(u) k_t v_t^T)``, then ``S <- diag(exp(w_t)) S + k_t v_t^T``), with
initial states and ``segment_ids`` resets, independent of the op's code. Properties checked:

* "reference" equals the oracle over drawn cases, and every form does on fixed cases, compiled
  and op by op (output and final state);
* "xla" (chunkwise gated linear attention) equals "reference" in output, final state and the
  gradients of r, k, v, w, u and initial_state, over drawn shapes, dtypes, chunk sizes, gates
  and options, with sequence lengths that are not multiples of the chunk;
* strong decay (per-token w down to -20, entries of -1000) stays finite and equals the oracle,
  gradients included;
* a zero state built under jit over a single chunk (which once triggered an XLA:CPU fusion
  bug) equals the oracle;
* packed rows (``segment_ids``) equal each segment run alone;
* ``rwkv6_step`` token by token equals the full forward, from the start and after a prefill;
* malformed arguments raise a ``ValueError`` that names the argument.

Inputs: r, k, v, u ~ N(0, 1), ``h0 ~ N`` in float32, and the decay in fla's log space,
``w = -exp(w_raw)`` with ``w_raw ~ N(-2, 1.5)`` (SPEC 2.1's init spans w_raw in [-6, -1]), some
entries exactly 0 (no decay).

Tolerances (relative RMS error, tests/_numerics.py). A float32 result, value or gradient: 1e-5
(measured over 60 drawn cases, "xla" against "reference": o 4.6e-7, final state 9.4e-7,
gradients up to 8.3e-7 (dw); "reference" against the oracle: o 2.1e-7, final state 7.8e-8). A
bfloat16 result: 1e-2, a few bf16 ulps (measured o 2.1e-3 against the oracle, 7.6e-5 between
the forms, gradients up to 1.4e-4). Strong decay uses 3e-5 for float32; its reason is given
where it is defined.
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
from hypothesis import given
from hypothesis import strategies as st

from ops.rwkv6 import rwkv6, rwkv6_step
from tests import _numerics as num

pytestmark = pytest.mark.compile_bound  # conftest: XLA's optimisation passes off

TOL_F32, tolerance = num.TOL_F32, num.tolerance
IMPLEMENTATIONS = ("reference", "xla")
DIFFERENTIABLE = ("r", "k", "v", "w", "u", "initial_state")
TIME_MAJOR = ("r", "k", "v", "w", "segment_ids")  # the arguments with a time axis (1)


# --- the float64 oracle (SPEC 2.1) ------------------------------------------------------------

def oracle(r, k, v, w, u, scale=1.0, initial_state=None, segment_ids=None):
  """SPEC 2.1 in float64 NumPy, one token at a time.

  Shapes as ``rwkv6``. Returns (o [B, T, H, V], final_state [B, H, K, V]), both float64.
  """
  r, k, v, w, u = (num.to_f64(x) for x in (r, k, v, w, u))
  batch, time, heads, key_dim = r.shape
  state = (np.zeros((batch, heads, key_dim, v.shape[-1])) if initial_state is None
           else num.to_f64(initial_state).copy())
  o = np.zeros(v.shape)
  ids = None if segment_ids is None else np.asarray(segment_ids)
  for t in range(time):
    if ids is not None and t > 0:
      starts = ids[:, t] != ids[:, t - 1]
      state = np.where(starts[:, None, None, None], 0.0, state)
    write = np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
    o[:, t] = np.einsum("bhk,bhkv->bhv", scale * r[:, t], state + u[..., None] * write)
    state = np.exp(w[:, t])[..., None] * state + write
  return o, state


def test_oracle_matches_closed_form():
  """The oracle itself, on a case solvable by hand: K = V = 1, one head, r = 2, k = 1,
  decay 1/2, bonus u = 3, scale 1/2, S_0 = 4: o_t = S_{t-1} + 3 v_t, S_t = S_{t-1} / 2 + v_t."""
  ones = np.ones((1, 3, 1, 1))
  v = np.arange(1.0, 4.0).reshape(1, 3, 1, 1)
  o, state = oracle(2 * ones, ones, v, np.full_like(v, np.log(0.5)), np.full((1, 1), 3.0),
                    scale=0.5, initial_state=np.full((1, 1, 1, 1), 4.0))
  s1 = 4.0 / 2 + 1.0
  s2 = s1 / 2 + 2.0
  np.testing.assert_allclose(o.ravel(), [4.0 + 3.0, s1 + 6.0, s2 + 9.0])
  np.testing.assert_allclose(state.ravel(), [s2 / 2 + 3.0])


# --- problem cases ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
  """One problem: shapes, dtype, options, the decay's distribution and the seed of its inputs.

  ``dtype`` is that of every array argument but the float32 initial state. Decays (log space):

  * "weak": ``-exp(N(-2, 1.5))``, a fraction ``zero_fraction`` of entries exactly 0;
  * "strong": "weak" with 30% of the entries ``-U(0, 20)`` and 5% at -1000.

  ``with_segment_ids`` adds random packed-row ids (up to 6 segments a row, so several segments
  can share a chunk).
  """

  batch: int = 2
  time: int = 9
  heads: int = 2
  key_dim: int = 16
  value_dim: int = 16
  dtype: str = "float32"
  scale: float = 1.0
  with_initial_state: bool = True
  gate: str = "weak"
  zero_fraction: float = 0.0
  with_segment_ids: bool = False
  chunk_size: int = 64
  seed: int = 0

  def decays(self, rng: np.random.Generator) -> np.ndarray:
    shape = (self.batch, self.time, self.heads, self.key_dim)
    w = -np.exp(rng.normal(-2.0, 1.5, shape))
    w[rng.random(shape) < self.zero_fraction] = 0.0
    if self.gate == "strong":
      draw = rng.random(shape)
      w = np.where(draw < 0.3, -rng.uniform(0.0, 20.0, shape), w)
      w[draw > 0.95] = -1000.0
    else:
      assert self.gate == "weak", self.gate
    return w

  def arrays(self) -> dict:
    """The array arguments of ``rwkv6`` (initial_state and segment_ids when switched on)."""
    rng = np.random.default_rng(self.seed)
    b, t, h, dk, dv = self.batch, self.time, self.heads, self.key_dim, self.value_dim
    arrays = dict(
        r=num.normal(rng, (b, t, h, dk), self.dtype), k=num.normal(rng, (b, t, h, dk), self.dtype),
        v=num.normal(rng, (b, t, h, dv), self.dtype),
        w=jnp.asarray(self.decays(rng), self.dtype), u=num.normal(rng, (h, dk), self.dtype))
    if self.with_initial_state:
      arrays["initial_state"] = num.normal(rng, (b, h, dk, dv))
    if self.with_segment_ids:
      arrays["segment_ids"] = num.random_segment_ids(rng, b, t, max_segments=6)
    return arrays

  def cotangents(self, stream: int = 1):
    """Random cotangents for (o [the case's dtype], final_state [float32]); ``stream`` picks an
    independent draw."""
    rng = np.random.default_rng([self.seed, stream])
    return (num.normal(rng, (self.batch, self.time, self.heads, self.value_dim), self.dtype),
            num.normal(rng, (self.batch, self.heads, self.key_dim, self.value_dim)))


# Lengths below and past the chunk sizes drawn (16, 32, 64), none a multiple of 16 but 1 token.
SEQ_LENGTHS = (1, 7, 17, 33, 63, 65, 100)
HEAD_DIMS = (16, 32, 64)


@st.composite
def cases(draw, lengths=SEQ_LENGTHS) -> Case:
  """Drawn shapes, dtypes, scale, decays, options and chunk sizes."""
  batch, heads = draw(st.tuples(st.integers(1, 2), st.integers(1, 2)))
  return Case(
      batch=batch, time=draw(st.sampled_from(lengths)), heads=heads,
      key_dim=draw(st.sampled_from(HEAD_DIMS)), value_dim=draw(st.sampled_from(HEAD_DIMS)),
      dtype=draw(num.float_dtypes()), scale=draw(st.sampled_from((1.0, 0.25))),
      with_initial_state=draw(st.booleans()), gate=draw(st.sampled_from(("weak", "strong"))),
      zero_fraction=draw(st.sampled_from((0.0, 0.3))), with_segment_ids=draw(st.booleans()),
      chunk_size=draw(st.sampled_from((16, 32, 64))), seed=draw(num.seeds()))


# The shape shared by the fixed cases below (one compilation serves several tests): an initial
# state, a scale and T = 100, six full chunks of 16 and a partial one.
BASE = Case(batch=2, time=100, heads=2, key_dim=32, value_dim=16, scale=0.5, chunk_size=16)


# --- jitted runners (module level, so equal shapes reuse the compilation) ---------------------

_STATIC = ("implementation", "scale", "chunk_size")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _forward(arrays, *, implementation, scale=1.0, chunk_size=64):
  """(o, final_state) of ``rwkv6``."""
  return rwkv6(**arrays, scale=scale, return_final_state=True, implementation=implementation,
               chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _forward_and_vjp(arrays, cotangents, **static):
  """((o, final_state), gradients of every float array) for the cotangents of both outputs."""
  return num.vjp_of(lambda x: _forward(x, **static), arrays, cotangents, DIFFERENTIABLE)


def _static(case: Case) -> dict:
  return dict(scale=case.scale, chunk_size=case.chunk_size)


# --- the op equals the oracle -----------------------------------------------------------------

def _check_against_oracle(case: Case, run) -> None:
  """Compares ``run(arrays) -> (o, final_state)`` with the oracle, dtypes and shapes included."""
  arrays = case.arrays()
  o, final_state = run(arrays)
  ref_o, ref_state = oracle(**arrays, scale=case.scale)
  assert o.dtype == jnp.dtype(case.dtype), o.dtype
  assert final_state.dtype == jnp.float32, final_state.dtype
  num.assert_close(ref_o, o, tolerance(o), "o")
  num.assert_close(ref_state, final_state, TOL_F32, "final_state")


# Against the float64 oracle, drawn lengths start at 7: the output of a single token is the
# bonus alone, (sum_d r_d u_d k_d) v, whose float32 sum cancels past 1e-5 in 0.2-0.5% of draws
# (normal r, u, k; K = 16 to 64), an error both forms share. Fixed single-token cases remain.
@given(case=cases(lengths=SEQ_LENGTHS[1:]))
def test_reference_matches_oracle(case):
  _check_against_oracle(case, functools.partial(
      _forward, implementation="reference", scale=case.scale))


ORACLE_CASES = dict(
    single_token_bfloat16=Case(batch=1, time=1, heads=1, dtype="bfloat16",
                               with_initial_state=False),
    all_options=Case(time=40, key_dim=32, value_dim=16, scale=0.3, zero_fraction=0.3,
                     with_segment_ids=True, chunk_size=16, seed=3),
)


class OracleTest(chex.TestCase):
  """Fixed cases against the oracle, each run compiled and op by op (chex variants)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      *[dict(case_name=c, implementation=i) for c in ORACLE_CASES for i in IMPLEMENTATIONS],
      dict(case_name="all_options", implementation=None))
  def test_fixed_case(self, case_name, implementation):
    case = ORACLE_CASES[case_name]
    run = self.variant(functools.partial(
        rwkv6, return_final_state=True, implementation=implementation, **_static(case)))
    _check_against_oracle(case, lambda arrays: run(**arrays))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_without_final_state_returns_none(implementation):
  """``return_final_state=False`` returns ``(o, None)``; no initial state means zeros."""
  case = Case(time=3, with_initial_state=False)
  arrays = case.arrays()
  o, final_state = rwkv6(**arrays, implementation=implementation)
  assert final_state is None
  num.assert_close(oracle(**arrays)[0], o, TOL_F32, "o")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("time, key_dim, chunk_size", [(1, 64, 32), (7, 32, 64)])
def test_zero_state_made_under_jit(implementation, time, key_dim, chunk_size):
  """A zero state built inside the compiled function (no initial state, or jnp.zeros) over a
  single chunk. These two cases returned garbage (up to inf) while the "xla" body summed the
  bonus next to its dot with the then constant state (XLA:CPU's YNNPACK fusion; see
  ops/rwkv6/chunk.py)."""
  case = Case(batch=1, time=time, heads=2, key_dim=key_dim, value_dim=key_dim,
              with_initial_state=False, seed=18)
  arrays = case.arrays()
  ref_o, ref_state = oracle(**arrays)
  zeros = lambda: jnp.zeros((1, 2, key_dim, key_dim), jnp.float32)
  for initial_state in (None, zeros):
    run = jax.jit(lambda a: rwkv6(
        **a, initial_state=initial_state and initial_state(), return_final_state=True,
        implementation=implementation, chunk_size=chunk_size))
    o, final_state = run(arrays)
    num.assert_close(ref_o, o, TOL_F32, "o")
    num.assert_close(ref_state, final_state, TOL_F32, "final_state")


# --- "xla" equals "reference", gradients included -----------------------------------------------

# Float32 error of the chunked form under strong decay: 3e-5. Within a chunk the cumulative gate
# G falls to about -200 ("strong": 30% of the tokens -U(0, 20), C = 64); the chunked form builds
# its weights exp(G~_r - G_i) from such numbers, whose float32 spacing (1.5e-5 at 200) becomes a
# relative error of the weight. The token-by-token recurrence never forms them. Measured over
# 400 draws of a small case (B = H = 1, K = V = 16, T = 65, C = 64): final state up to 1.5e-5
# (median 3.9e-6), dw 1.3e-5 (median 5.6e-6), o and the other gradients under 6.5e-6. Entries
# below -20 are raised to -20 by the chunked form (ops/rwkv6/chunk.py); a -1000 would leave G
# near -1000 (spacing 6e-5, errors up to 5e-4).
TOL_STRONG_DECAY = 3e-5


def _check_xla_matches_reference(case: Case) -> None:
  """Output, final state and the gradient of every float input agree between the two forms
  (float32 results of strong decays to ``TOL_STRONG_DECAY``)."""
  arrays, cotangents = case.arrays(), case.cotangents()
  run = lambda implementation: _forward_and_vjp(arrays, cotangents,
                                                implementation=implementation, **_static(case))
  if case.gate == "weak":
    # The gradients' usual size, for a draw whose cotangent cancels one (see _numerics).
    _, scales = _forward_and_vjp(arrays, case.cotangents(stream=2), implementation="reference",
                                 **_static(case))
    num.assert_forms_agree(run, arrays, DIFFERENTIABLE, "xla", output="o",
                           gradient_scales=scales)
    return
  (ref_o, ref_state), ref_grads = run("reference")
  (o, final_state), grads = run("xla")
  pairs = dict(o=(ref_o, o), final_state=(ref_state, final_state),
               **{f"d{name}": (ref_grads[name], grad) for name, grad in grads.items()})
  for name, (ref, x) in pairs.items():
    num.assert_close(ref, x, max(tolerance(x), TOL_STRONG_DECAY), name)


@given(case=cases())
def test_xla_matches_reference(case):
  _check_xla_matches_reference(case)


def test_strong_decay_is_finite_and_correct():
  """Per-token decays down to -20 and entries of -1000 mixed with weak ones, chunks of 64: "xla"
  stays finite and equals the oracle, and the float32 recurrence in gradients too."""
  case = dataclasses.replace(BASE, gate="strong", chunk_size=64, seed=5)
  arrays = case.arrays()
  w = np.asarray(arrays["w"])
  assert w.min() == -1000.0 and ((w < -15) & (w > -20)).any()
  o, final_state = _forward(arrays, implementation="xla", **_static(case))
  ref_o, ref_state = oracle(**arrays, scale=case.scale)
  num.assert_close(ref_o, o, TOL_STRONG_DECAY, "o vs oracle")
  num.assert_close(ref_state, final_state, TOL_STRONG_DECAY, "final_state vs oracle")
  _check_xla_matches_reference(case)


# --- packed sequences -------------------------------------------------------------------------

# Per row: segment labels and lengths (T = 100, chunks of 16). Ids change value but not always
# upward (a reset is any change); boundaries fall on the chunk edge t = 16 and beside it (15,
# 17), a segment of one token, and several segments inside one chunk.
PACKED_ROWS = (((7, 16), (3, 1), (7, 83)), ((2, 15), (5, 2), (1, 83)),
               ((4, 5), (0, 6), (4, 1), (9, 88)))
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
                            **_static(case))
  bounds = num.segment_bounds(ids)
  assert {b for row in bounds for _, b in row[:-1]} >= {15, 16, 17}
  for b, row_bounds in enumerate(bounds):
    state = arrays["initial_state"][b:b + 1]
    for i, (start, stop) in enumerate(row_bounds):
      piece = {k: v[b:b + 1, start:stop] for k, v in arrays.items() if k in TIME_MAJOR}
      seg_o, state = oracle(**piece, u=arrays["u"], scale=case.scale,
                            initial_state=state if i == 0 else None)
      num.assert_close(seg_o, o[b:b + 1, start:stop], TOL_F32, f"o row {b} segment {i}")
    num.assert_close(state, final_state[b:b + 1], TOL_F32, f"final_state row {b}")


def test_segments_gradients_match_reference():
  """The packed rows above: "xla" gradients equal "reference" ones (whose resets the test
  above checks against separate runs)."""
  case = PACKED_CASE
  arrays = {**case.arrays(), "segment_ids": _packed_segment_ids()}
  run = lambda implementation: _forward_and_vjp(arrays, case.cotangents(),
                                                implementation=implementation, **_static(case))
  num.assert_forms_agree(run, arrays, DIFFERENTIABLE, "xla", output="o")


# --- decoding token by token ------------------------------------------------------------------

_step = jax.jit(rwkv6_step, static_argnames=("scale",))


@pytest.mark.parametrize("implementation, prefill, dtype", [
    ("reference", 0, "float32"), ("xla", 0, "float32"), ("xla", 37, "float32"),
    ("reference", 64, "float32"), ("xla", 37, "bfloat16")])
def test_prefill_and_steps_equal_forward(implementation, prefill, dtype):
  """``rwkv6`` over the first ``prefill`` tokens, then ``rwkv6_step`` token by token from its
  final state, equals the full forward: every output and the final state."""
  case = dataclasses.replace(BASE, dtype=dtype, seed=10)
  arrays = case.arrays()
  o, final_state = _forward(arrays, implementation=implementation, **_static(case))
  state = arrays["initial_state"]
  if prefill:
    head = {k: v[:, :prefill] if k in TIME_MAJOR else v for k, v in arrays.items()}
    o_head, state = _forward(head, implementation=implementation, **_static(case))
    num.assert_close(o[:, :prefill], o_head, tolerance(o_head), "prefill o")
  for t in range(prefill, case.time):
    token = {k: v[:, t] for k, v in arrays.items() if k in TIME_MAJOR}
    o_t, state = _step(**token, u=arrays["u"], state=state, scale=case.scale)
    assert o_t.dtype == o.dtype and state.dtype == jnp.float32
    num.assert_close(o[:, t], o_t, tolerance(o_t), f"o[{t}]")
  num.assert_close(final_state, state, TOL_F32, "final_state")


def test_step_without_state_starts_from_zero():
  """One step from no state: the bonus term alone, and the state k v^T."""
  case = Case(batch=1, time=1, heads=2, with_initial_state=False, seed=11)
  arrays = case.arrays()
  ref_o, ref_state = oracle(**arrays)
  o, state = rwkv6_step(**{k: v[:, 0] if k in TIME_MAJOR else v for k, v in arrays.items()})
  assert state.shape == ref_state.shape and state.dtype == jnp.float32
  num.assert_close(ref_o[:, 0], o, TOL_F32, "o")
  num.assert_close(ref_state, state, TOL_F32, "state")


# --- malformed arguments ----------------------------------------------------------------------

def _valid_arguments() -> dict:
  """Well-formed arguments: batch 2, time 5, 2 heads, K = 16, V = 8."""
  return Case(batch=2, time=5, heads=2, key_dim=16, value_dim=8).arrays()


def _replace(name: str, make):
  """A change of the valid arguments that sets ``name`` to ``make(old value)``."""
  return lambda args: {**args, name: make(args[name])}


def _grow(axis: int):
  """A change that lengthens ``axis`` by one (repeating its first entry)."""
  return lambda x: jnp.concatenate([x, jnp.take(x, jnp.array([0]), axis)], axis)


BAD_ARGUMENTS = {  # id: (change, regex the message must match)
    "r_rank": (_replace("r", lambda x: x[0]), r"\br\b"),
    "k_heads": (_replace("k", _grow(2)), r"\bk\b"),
    "k_key_dim": (_replace("k", _grow(3)), r"\bk\b"),
    "k_time": (_replace("k", _grow(1)), r"\bk\b"),
    "v_batch": (_replace("v", _grow(0)), r"\bv\b"),
    "v_time": (_replace("v", _grow(1)), r"\bv\b"),
    "v_heads": (_replace("v", _grow(2)), r"\bv\b"),
    "v_rank": (_replace("v", lambda x: x[0]), r"\bv\b"),
    "w_key_dim": (_replace("w", _grow(3)), r"\bw\b"),
    "w_time": (_replace("w", _grow(1)), r"\bw\b"),
    "w_per_head_layout": (_replace("w", lambda x: x[..., 0]), r"\bw\b"),
    "w_positive": (_replace("w", lambda x: x.at[1, 2, 1, 4].set(0.25)), r"\bw\b"),
    "u_key_dim": (_replace("u", _grow(1)), r"\bu\b"),
    "u_heads": (_replace("u", _grow(0)), r"\bu\b"),
    "u_per_token": (_replace("u", lambda x: jnp.broadcast_to(x, (2, 5) + x.shape)), r"\bu\b"),
    "initial_state_bfloat16": (_replace("initial_state", lambda x: x.astype(jnp.bfloat16)),
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
    rwkv6(**change({**_valid_arguments(), "implementation": implementation}))


def test_unknown_implementation_names_the_choices():
  with pytest.raises(ValueError, match=r"implementation") as info:
    rwkv6(**_valid_arguments(), implementation="cuda")
  for allowed in IMPLEMENTATIONS:
    assert allowed in str(info.value), str(info.value)


@pytest.mark.parametrize("chunk_size", [0, -16, 8, 24, 100])
def test_bad_chunk_size_raises(chunk_size):
  with pytest.raises(ValueError, match=r"\bchunk_size\b"):
    rwkv6(**_valid_arguments(), implementation="xla", chunk_size=chunk_size)


def test_positive_decay_is_not_checked_under_jit():
  """Under jit the decay is abstract: no value check (and no error) there."""
  args = _valid_arguments()
  args["w"] = args["w"].at[0, 0, 0, 0].set(0.25)
  o, _ = jax.jit(lambda a: rwkv6(**a, implementation="reference"))(args)
  assert o.shape == args["v"].shape


def _valid_step_arguments() -> dict:
  """Well-formed ``rwkv6_step`` arguments: one token of ``_valid_arguments``."""
  args = _valid_arguments()
  args["state"] = args.pop("initial_state")
  return {k: v[:, 0] if k in TIME_MAJOR else v for k, v in args.items()}


BAD_STEP_ARGUMENTS = {
    "state_value_dim": (_replace("state", _grow(3)), r"\bstate\b"),
    "state_batch": (_replace("state", _grow(0)), r"\bstate\b"),
    "state_rank": (_replace("state", lambda x: x[0]), r"\bstate\b"),
    "state_bfloat16": (_replace("state", lambda x: x.astype(jnp.bfloat16)), r"\bstate\b"),
    "r_rank": (_replace("r", lambda x: x[:, None]), r"\br\b"),
    "k_key_dim": (_replace("k", _grow(2)), r"\bk\b"),
    "v_heads": (_replace("v", _grow(1)), r"\bv\b"),
    "w_positive": (_replace("w", lambda x: x.at[0, 1, 2].set(0.5)), r"\bw\b"),
    "u_heads": (_replace("u", _grow(0)), r"\bu\b"),
}


@pytest.mark.parametrize("change, pattern", BAD_STEP_ARGUMENTS.values(),
                         ids=BAD_STEP_ARGUMENTS.keys())
def test_bad_step_argument_raises(change, pattern):
  with pytest.raises(ValueError, match=pattern):
    rwkv6_step(**change(_valid_step_arguments()))
