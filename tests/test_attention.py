"""Tests of ``ops.attention``: softmax attention, the KV cache, RoPE and YaRN.

The ground truth is ``oracle`` below: softmax attention in float64 NumPy with every key/value
head repeated to the query heads and the mask built token by token from its definition
(causal, same segment, or slot <= query position). Properties checked:

* "reference" and "xla" equal the oracle over drawn shapes (multi-head, grouped-query and
  multi-query; Dv != D), dtypes and options, and on fixed cases compiled and op by op;
* "xla" equals "reference" in output and the gradients of q, k and v for multi-head,
  grouped-query (KH = 2 < H = 4) and multi-query attention with Dv != D, with and without
  segment_ids, in float32 and bfloat16;
* on GPU, "cudnn" (and ``None``) equal "reference" in bfloat16, gradients included, for MHA,
  GQA, MQA, Dv < D and a cache mask;
* grouped-query attention equals multi-head attention with each k/v head repeated;
* decoding token by token into a preallocated cache (``update_cache`` + ``query_positions``),
  after a prefill of a prefix or not, equals the full causal forward;
* RoPE: the rotate-half formula, norms kept, scores depending only on relative positions; YaRN:
  factor 1 is plain RoPE, the correction range of the ramp, the attention factor;
* malformed arguments raise a ``ValueError`` naming the argument.

Tolerances (relative RMS error, tests/_numerics.py): 1e-5 for float32 results, 1e-2 (a few bf16
ulps of 2^-8) for bfloat16 ones.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import assume, given
from hypothesis import strategies as st

from ops.attention import attention, attention_mask, update_cache
from ops.attention.rope import apply_rope, rope_frequencies, yarn_attention_factor
from tests import _numerics as num

TOL_F32, tolerance = num.TOL_F32, num.tolerance
IMPLEMENTATIONS = ("reference", "xla")
DIFFERENTIABLE = ("q", "k", "v")
# Lengths that are not powers of two, one token included.
TIMES = (1, 7, 17, 33)


# --- the float64 oracle -----------------------------------------------------------------------

def oracle_mask(batch: int, q_len: int, kv_len: int, segment_ids=None,
                query_positions=None) -> np.ndarray:
  """Boolean [B, T, S] from the definitions, one entry at a time."""
  mask = np.zeros((batch, q_len, kv_len), bool)
  for b in range(batch):
    for t in range(q_len):
      for s in range(kv_len):
        if query_positions is not None:
          mask[b, t, s] = s <= int(query_positions[b, t])
        else:
          same = segment_ids is None or segment_ids[b, t] == segment_ids[b, s]
          mask[b, t, s] = s <= t and same
  return mask


def oracle(q, k, v, scale=None, segment_ids=None, query_positions=None) -> np.ndarray:
  """Softmax attention in float64 NumPy; shapes as ``attention``. Returns o [B, T, H, Dv]."""
  q, k, v = (num.to_f64(x) for x in (q, k, v))
  batch, q_len, heads, head_dim = q.shape
  group = heads // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  ids = None if segment_ids is None else np.asarray(segment_ids)
  positions = None if query_positions is None else np.asarray(query_positions)
  mask = oracle_mask(batch, q_len, k.shape[1], ids, positions)
  scale = head_dim ** -0.5 if scale is None else scale
  scores = np.einsum("bthd,bshd->bhts", q, k) * scale
  scores = np.where(mask[:, None], scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


def test_oracle_matches_closed_form():
  """One head, D = 1, q = 0: uniform weights over the visible keys, i.e. running means."""
  v = np.arange(1.0, 5.0).reshape(1, 4, 1, 1)
  o = oracle(np.zeros((1, 4, 1, 1)), np.ones((1, 4, 1, 1)), v)
  np.testing.assert_allclose(o.ravel(), [1.0, 1.5, 2.0, 2.5])
  o = oracle(np.zeros((1, 4, 1, 1)), np.ones((1, 4, 1, 1)), v,
             segment_ids=np.array([[0, 0, 1, 1]]))
  np.testing.assert_allclose(o.ravel(), [1.0, 1.5, 3.0, 3.5])
  o = oracle(np.zeros((1, 2, 1, 1)), np.ones((1, 4, 1, 1)), v,
             query_positions=np.array([[3, 1]]))
  np.testing.assert_allclose(o.ravel(), [2.5, 1.5])


# --- problem cases ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
  """Shapes, dtype, options and seed of one self-attention problem (S == T)."""

  batch: int = 2
  time: int = 7
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 16
  value_dim: int = 8
  dtype: str = "float32"
  scale: float | None = None
  with_segment_ids: bool = False
  seed: int = 0

  def arrays(self) -> dict:
    rng = np.random.default_rng(self.seed)
    b, t, kh = self.batch, self.time, self.kv_heads
    arrays = dict(q=num.normal(rng, (b, t, self.heads, self.head_dim), self.dtype),
                  k=num.normal(rng, (b, t, kh, self.head_dim), self.dtype),
                  v=num.normal(rng, (b, t, kh, self.value_dim), self.dtype))
    if self.with_segment_ids:
      arrays["segment_ids"] = num.random_segment_ids(rng, b, t)
    return arrays

  def cotangent(self):
    rng = np.random.default_rng(self.seed + 1)
    return num.normal(rng, (self.batch, self.time, self.heads, self.value_dim), self.dtype)


def xla_cpu_cannot_compile(batch: int, time: int, heads: int, dtype: str) -> bool:
  """Whether jax.nn.dot_product_attention's "xla" fails to compile this shape on XLA:CPU.

  With bfloat16 inputs and B = H = T = S = 1 under jit, jax 0.10.2 stops with "Algorithm not
  supported by the ElementalIrEmitter: ALG_DOT_BF16_BF16_F32" (its one-element dots); drawn cases
  leave that shape out on CPU.
  """
  return (jax.default_backend() == "cpu" and dtype == "bfloat16"
          and batch == time == heads == 1)


@st.composite
def cases(draw) -> Case:
  heads = draw(st.sampled_from((1, 2, 4)))
  case = Case(
      batch=draw(st.integers(1, 2)), time=draw(st.sampled_from(TIMES)), heads=heads,
      kv_heads=draw(num.divisors(heads)), head_dim=draw(st.sampled_from((8, 16))),
      value_dim=draw(st.sampled_from((8, 12, 16, 24))), dtype=draw(num.float_dtypes()),
      scale=draw(st.sampled_from((None, 0.3))), with_segment_ids=draw(st.booleans()),
      seed=draw(num.seeds()))
  assume(not xla_cpu_cannot_compile(case.batch, case.time, case.heads, case.dtype))
  return case


# --- jitted runners ---------------------------------------------------------------------------

# The tests compile many small programs; LLVM's optimisations take about 40% of each compilation
# on CPU and change nothing the tests check (XLA:CPU keeps IEEE semantics at every level).
# (jax allows compiler options only on an outermost jit.)
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.partial(jit, static_argnames=("implementation", "scale"))
def _forward(arrays, *, implementation, scale=None):
  return attention(**arrays, scale=scale, implementation=implementation)


@functools.partial(jit, static_argnames=("implementation", "scale"))
def _forward_and_vjp(arrays, cotangent, *, implementation, scale=None):
  forward = lambda x: attention(**x, scale=scale, implementation=implementation)
  return num.vjp_of(forward, arrays, cotangent, DIFFERENTIABLE)


# --- the implementations equal the oracle -------------------------------------------------------

@functools.partial(jit, static_argnames="scale")
def _both_forms(arrays, scale=None):
  """{implementation: o}: one compilation for "reference" and "xla"."""
  return {i: attention(**arrays, scale=scale, implementation=i) for i in IMPLEMENTATIONS}


@given(case=cases())
def test_forms_match_oracle(case):
  """Drawn shapes (MHA, GQA and MQA; Dv != D), dtypes, scales and segment_ids."""
  arrays = case.arrays()
  ref = oracle(**arrays, scale=case.scale)
  for implementation, o in _both_forms(arrays, case.scale).items():
    assert o.dtype == jnp.dtype(case.dtype) and o.shape == ref.shape, implementation
    num.assert_close(ref, o, tolerance(o), f"o ({implementation})")


ORACLE_CASES = dict(
    single_token_mqa_wide_values=Case(batch=1, time=1, heads=2, kv_heads=1, value_dim=24),
    gqa_segments=Case(time=17, with_segment_ids=True, scale=0.5, seed=1),
)


class OracleTest(chex.TestCase):
  """Fixed cases against the oracle, compiled and op by op; ``None`` included."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      *[dict(case_name="gqa_segments", implementation=i) for i in IMPLEMENTATIONS],
      dict(case_name="single_token_mqa_wide_values", implementation=None))
  def test_fixed_case(self, case_name, implementation):
    case = ORACLE_CASES[case_name]
    arrays = case.arrays()
    run = self.variant(functools.partial(attention, scale=case.scale,
                                         implementation=implementation))
    o = run(**arrays)
    assert o.dtype == jnp.dtype(case.dtype)
    num.assert_close(oracle(**arrays, scale=case.scale), o, tolerance(o), "o")


# --- "xla" equals "reference", gradients included -----------------------------------------------

# Multi-head, grouped-query and multi-query attention, each in float32 and bfloat16 and each with
# and without segment_ids, and every dtype with both: all pairs of the three choices in 6 cases.
GRADIENT_CASES = {
    f"{name}-{dtype}-{'segments' if segments else 'causal'}": (kv_heads, dtype, segments)
    for name, kv_heads, dtype, segments in (
        ("mha", 4, "float32", False), ("mha", 4, "bfloat16", True),
        ("gqa", 2, "float32", False), ("gqa", 2, "bfloat16", True),
        ("mqa", 1, "float32", True), ("mqa", 1, "bfloat16", False))}


@pytest.mark.parametrize("kv_heads, dtype, with_segment_ids", GRADIENT_CASES.values(),
                         ids=GRADIENT_CASES.keys())
def test_xla_matches_reference(kv_heads, dtype, with_segment_ids):
  """H = 4 query heads, D = 16, Dv = 8, T = 17: output and the gradients of q, k and v."""
  case = Case(time=17, kv_heads=kv_heads, dtype=dtype, with_segment_ids=with_segment_ids, seed=3)
  arrays, cotangent = case.arrays(), case.cotangent()
  ref_o, ref_grads = _forward_and_vjp(arrays, cotangent, implementation="reference")
  o, grads = _forward_and_vjp(arrays, cotangent, implementation="xla")
  num.assert_close(ref_o, o, tolerance(o), "o")
  assert grads.keys() == ref_grads.keys() == set(DIFFERENTIABLE)
  for name, grad in grads.items():
    assert grad.dtype == arrays[name].dtype, (name, grad.dtype)
    num.assert_close(ref_grads[name], grad, tolerance(grad), f"d{name}")


CUDNN_CASES = {  # id: (implementation, time, value_dim, with query_positions)
    "causal": ("cudnn", 16, 64, False),
    "narrow_values": ("cudnn", 16, 32, False),
    "cache_mask": ("cudnn", 16, 64, True),
    "default_even": (None, 16, 64, False),
    "default_odd": (None, 17, 64, False),  # None must not pick cuDNN here
}


@pytest.mark.gpu
@pytest.mark.parametrize("implementation, time, value_dim, with_positions", CUDNN_CASES.values(),
                         ids=CUDNN_CASES.keys())
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_cudnn_matches_reference(kv_heads, implementation, time, value_dim, with_positions):
  """bfloat16, D = 64: output and the gradients of q, k and v."""
  case = Case(time=time, kv_heads=kv_heads, head_dim=64, value_dim=value_dim,
              dtype="bfloat16", seed=11)
  arrays, cotangent = case.arrays(), case.cotangent()
  if with_positions:
    arrays["query_positions"] = jnp.broadcast_to(jnp.arange(time, dtype=jnp.int32),
                                                 (case.batch, time))
  ref_o, ref_grads = _forward_and_vjp(arrays, cotangent, implementation="reference")
  o, grads = _forward_and_vjp(arrays, cotangent, implementation=implementation)
  num.assert_close(ref_o, o, num.TOL_BF16, "o")
  for name in DIFFERENTIABLE:
    num.assert_close(ref_grads[name], grads[name], num.TOL_BF16, f"d{name}")


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_heads_equal_repeated_heads(kv_heads):
  """GQA / MQA ("xla") equals multi-head attention ("reference") with k and v repeated so that
  query head h reads key head h // (H // KH)."""
  arrays = Case(time=17, kv_heads=kv_heads, with_segment_ids=True, seed=4).arrays()
  o = _forward(arrays, implementation="xla")
  group = arrays["q"].shape[2] // kv_heads
  repeated = {**arrays, "k": jnp.repeat(arrays["k"], group, axis=2),
              "v": jnp.repeat(arrays["v"], group, axis=2)}
  num.assert_close(_forward(repeated, implementation="reference"), o, TOL_F32, "o")


def test_default_implementation_is_xla_where_cudnn_does_not_apply():
  """float32 inputs (cuDNN needs 16-bit ones) on any platform, and bf16 off GPU."""
  dtype = "float32" if jax.default_backend() == "gpu" else "bfloat16"
  arrays = Case(dtype=dtype, head_dim=16, value_dim=16, seed=5).arrays()
  np.testing.assert_array_equal(_forward(arrays, implementation=None),
                                _forward(arrays, implementation="xla"))


# --- decoding over a preallocated cache ---------------------------------------------------------

def _step(q, k, v, cache_k, cache_v, position, implementation):
  """Writes one token's k, v at ``position`` and attends its query over the cache."""
  cache_k = update_cache(cache_k, k, position)
  cache_v = update_cache(cache_v, v, position)
  positions = jnp.full((q.shape[0], 1), position, jnp.int32)
  o = attention(q, cache_k, cache_v, query_positions=positions, implementation=implementation)
  return o, cache_k, cache_v


class DecodeTest(chex.TestCase):
  """Prefill (or not) then decode one token at a time equals the full causal forward."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(("reference", 7, 0), ("xla", 17, 9))
  def test_decode_equals_forward(self, implementation, time, prefix):
    case = Case(time=time, seed=6)
    arrays = case.arrays()
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    full = _forward(arrays, implementation="reference")
    slots = time + 3  # unwritten slots hold random values, which the mask must hide
    rng = np.random.default_rng(7)
    cache_k = num.normal(rng, (case.batch, slots) + k.shape[2:])
    cache_v = num.normal(rng, (case.batch, slots) + v.shape[2:])
    outputs = []
    if prefix:
      cache_k, cache_v = update_cache(cache_k, k[:, :prefix], 0), update_cache(
          cache_v, v[:, :prefix], 0)
      positions = jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (case.batch, prefix))
      outputs.append(attention(q[:, :prefix], cache_k, cache_v, query_positions=positions,
                               implementation=implementation))
    step = self.variant(functools.partial(_step, implementation=implementation))
    for t in range(prefix, time):
      o, cache_k, cache_v = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache_k, cache_v,
                                 jnp.int32(t))
      outputs.append(o)
    num.assert_close(full, jnp.concatenate(outputs, axis=1), TOL_F32, "o")
    num.assert_close(k, cache_k[:, :time], 0.0, "cached k")


def test_rows_at_different_positions():
  """One decode call with a different cache position per row equals each row's forward."""
  case = Case(time=17, seed=8)
  arrays = case.arrays()
  full = _forward(arrays, implementation="reference")
  positions = jnp.asarray([[3], [16]], jnp.int32)
  o = attention(arrays["q"][jnp.arange(2), positions[:, 0]][:, None], arrays["k"], arrays["v"],
                query_positions=positions, implementation="xla")
  num.assert_close(full[jnp.arange(2), positions[:, 0]][:, None], o, TOL_F32, "o")


def test_update_cache_writes_and_casts():
  rng = np.random.default_rng(9)
  cache = num.normal(rng, (2, 6, 3, 4), "bfloat16")
  values = num.normal(rng, (2, 2, 3, 4))
  write = jax.jit(update_cache)
  for position in (0, 3, 4):
    out = write(cache, values, jnp.int32(position))
    assert out.dtype == jnp.bfloat16 and out.shape == cache.shape
    expected = np.asarray(cache).copy()
    expected[:, position:position + 2] = np.asarray(values.astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(out), expected)


# --- RoPE and YaRN ------------------------------------------------------------------------------

def rope_oracle(x, positions, inv_freq) -> np.ndarray:
  """Rotate-half RoPE in float64: pair (i, i + D/2) turned by positions * inv_freq[i]."""
  x, inv_freq = num.to_f64(x), num.to_f64(inv_freq)
  half = x.shape[-1] // 2
  out = np.empty_like(x)
  for i in range(half):
    angle = np.asarray(positions, np.float64)[:, :, None] * inv_freq[i]
    a, b = x[..., i], x[..., i + half]
    out[..., i] = a * np.cos(angle) - b * np.sin(angle)
    out[..., i + half] = b * np.cos(angle) + a * np.sin(angle)
  return out


def _positions(rng, batch: int, time: int, high: int = 64):
  return jnp.asarray(rng.integers(0, high, (batch, time)), jnp.int32)


@pytest.mark.parametrize("yarn_factor", [1.0, 8.0])
@pytest.mark.parametrize("dtype", num.FLOAT_DTYPES)
def test_apply_rope_matches_formula_and_keeps_norms(yarn_factor, dtype):
  rng = np.random.default_rng(10)
  x = num.normal(rng, (2, 17, 3, 32), dtype)
  positions = _positions(rng, 2, 17)
  inv_freq = rope_frequencies(32, yarn_factor=yarn_factor, original_max_length=64)
  y = apply_rope(x, positions, inv_freq)
  assert y.dtype == x.dtype and y.shape == x.shape
  num.assert_close(rope_oracle(x, positions, inv_freq), y, tolerance(y), "rotated x")
  norm = lambda a: np.linalg.norm(num.to_f64(a), axis=-1)
  num.assert_close(norm(x), norm(y), tolerance(y), "norms")


@given(seed=num.seeds(), shift=st.integers(1, 64), yarn_factor=st.sampled_from((1.0, 4.0)))
def test_rope_scores_depend_on_relative_position(seed, shift, yarn_factor):
  """q_t . k_s after RoPE is unchanged when both positions move by the same amount."""
  rng = np.random.default_rng(seed)
  q, k = num.normal(rng, (1, 7, 2, 16)), num.normal(rng, (1, 7, 2, 16))
  q_pos, k_pos = _positions(rng, 1, 7), _positions(rng, 1, 7)
  inv_freq = rope_frequencies(16, yarn_factor=yarn_factor, original_max_length=128)
  scores = lambda dq, dk: jnp.einsum("bthd,bshd->bhts", apply_rope(q, q_pos + dq, inv_freq),
                                     apply_rope(k, k_pos + dk, inv_freq))
  # The float32 angles of positions up to ~130 are off by up to ~1e-5 rad.
  num.assert_close(scores(0, 0), scores(shift, shift), 1e-4, "scores")


@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_yarn_factor_one_is_plain_rope(head_dim):
  plain = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
  for inv_freq in (rope_frequencies(head_dim), rope_frequencies(head_dim, yarn_factor=1.0,
                                                                original_max_length=16)):
    assert inv_freq.dtype == jnp.float32 and inv_freq.shape == (head_dim // 2,)
    np.testing.assert_array_equal(np.asarray(inv_freq), plain.astype(np.float32))


@pytest.mark.parametrize("factor", [2.0, 40.0])
def test_yarn_frequency_ramp(factor):
  """D = 64, theta = 1e4, 4096 trained tokens: the pair that turns r times in 4096 tokens is
  i(r) = 64 ln(4096 / (2 pi r)) / (2 ln 1e4): i(32) = 10.5, i(1) = 22.5, so pairs 0..10 keep
  their frequency, pairs 23..31 are divided by the factor, and those between lie in between,
  ever closer to the divided frequency."""
  assert math.floor(64 * math.log(4096 / (2 * math.pi * 32)) / (2 * math.log(1e4))) == 10
  assert math.ceil(64 * math.log(4096 / (2 * math.pi)) / (2 * math.log(1e4))) == 23
  plain = np.asarray(rope_frequencies(64), np.float64)
  yarn = np.asarray(rope_frequencies(64, yarn_factor=factor, original_max_length=4096),
                    np.float64)
  np.testing.assert_allclose(yarn[:11], plain[:11], rtol=1e-6)
  np.testing.assert_allclose(yarn[23:], plain[23:] / factor, rtol=1e-6)
  kept = (yarn[11:23] - plain[11:23] / factor) / (plain[11:23] - plain[11:23] / factor)
  assert (np.diff(kept) < 0).all() and (kept > 0).all() and (kept < 1).all(), kept
  assert yarn[0] == plain[0] == 1.0  # the highest frequency unchanged
  np.testing.assert_allclose(yarn[-1], plain[-1] / factor, rtol=1e-6)  # the lowest divided


def test_yarn_attention_factor():
  assert yarn_attention_factor(1.0) == 1.0 and yarn_attention_factor(0.5) == 1.0
  np.testing.assert_allclose(yarn_attention_factor(40.0), 0.1 * math.log(40.0) + 1.0)
  np.testing.assert_allclose(yarn_attention_factor(40.0, mscale=0.707),
                             0.0707 * math.log(40.0) + 1.0)


BAD_ROPE = {  # id: (call, regex)
    "odd_head_dim": (lambda: rope_frequencies(7), r"\bhead_dim\b"),
    "yarn_factor_below_one": (lambda: rope_frequencies(8, yarn_factor=0.5), r"\byarn_factor\b"),
    "odd_x_dim": (lambda: apply_rope(jnp.zeros((1, 2, 1, 7)), jnp.zeros((1, 2), jnp.int32),
                                     jnp.zeros(3)), r"\bx\b"),
    "x_rank": (lambda: apply_rope(jnp.zeros((2, 1, 8)), jnp.zeros((1, 2), jnp.int32),
                                  jnp.zeros(4)), r"\bx\b"),
    "positions_shape": (lambda: apply_rope(jnp.zeros((1, 2, 1, 8)), jnp.zeros((1, 3), jnp.int32),
                                           jnp.zeros(4)), r"\bpositions\b"),
    "inv_freq_shape": (lambda: apply_rope(jnp.zeros((1, 2, 1, 8)), jnp.zeros((1, 2), jnp.int32),
                                          jnp.zeros(8)), r"\binv_freq\b"),
}


@pytest.mark.parametrize("call, pattern", BAD_ROPE.values(), ids=BAD_ROPE.keys())
def test_bad_rope_argument_raises(call, pattern):
  with pytest.raises(ValueError, match=pattern):
    call()


# --- malformed arguments ----------------------------------------------------------------------

def _valid_arguments() -> dict:
  """B = 2, T = S = 5, H = 4, KH = 2, D = 8, Dv = 6, with segment_ids."""
  return Case(time=5, head_dim=8, value_dim=6, with_segment_ids=True).arrays()


def _replace(name: str, make):
  return lambda args: {**args, name: make(args[name])}


def _grow(axis: int):
  return lambda x: jnp.concatenate([x, jnp.take(x, jnp.array([0]), axis)], axis)


def _with_positions(args):
  return {**args, "query_positions": jnp.zeros((2, 5), jnp.int32)}


BAD_ARGUMENTS = {  # id: (change, regex the message must match)
    "q_rank": (_replace("q", lambda x: x[0]), r"\bq\b"),
    "k_batch": (_replace("k", _grow(0)), r"\bk\b"),
    "k_head_dim": (_replace("k", _grow(3)), r"\bk\b"),
    "v_time": (_replace("v", _grow(1)), r"\bv\b"),
    "v_heads": (_replace("v", _grow(2)), r"\bv\b"),
    "heads_not_multiple": (lambda a: {**a, "k": a["k"][:, :, :1].repeat(3, 2),
                                      "v": a["v"][:, :, :1].repeat(3, 2)}, r"\bk\b"),
    "keys_not_queries": (lambda a: {**a, "k": _grow(1)(a["k"]), "v": _grow(1)(a["v"]),
                                    "segment_ids": None}, r"\bquery_positions\b"),
    "segment_ids_with_positions": (_with_positions,
                                   r"(?s)(?=.*\bsegment_ids\b)(?=.*\bquery_positions\b)"),
    "segment_ids_shape": (_replace("segment_ids", lambda x: x[:, :4]), r"\bsegment_ids\b"),
    "segment_ids_float": (_replace("segment_ids", lambda x: x.astype(jnp.float32)),
                          r"\bsegment_ids\b"),
    "query_positions_shape": (
        lambda a: {**a, "segment_ids": None, "query_positions": jnp.zeros((2, 4), jnp.int32)},
        r"\bquery_positions\b"),
    "unknown_implementation": (lambda a: {**a, "implementation": "flash"}, r"\bimplementation\b"),
}


@pytest.mark.parametrize("change, pattern", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bad_argument_raises(implementation, change, pattern):
  with pytest.raises(ValueError, match=pattern):
    attention(**change({**_valid_arguments(), "implementation": implementation}))


def test_bad_mask_argument_raises():
  with pytest.raises(ValueError, match=r"\bquery_positions\b"):
    attention_mask(2, 3, 4)
  with pytest.raises(ValueError, match=r"\bsegment_ids\b"):
    attention_mask(2, 3, 3, segment_ids=jnp.zeros((1, 3), jnp.int32))


def test_cudnn_needs_a_gpu_and_half_precision():
  args = _valid_arguments()
  del args["segment_ids"]
  pattern = r"cudnn" if jax.default_backend() != "gpu" else r"float16 or bfloat16"
  with pytest.raises(ValueError, match=pattern):
    attention(**args, implementation="cudnn")


BAD_CACHE = {  # id: (cache shape, values shape, position, regex)
    "more_tokens_than_slots": ((2, 4, 3), (2, 5, 3), 0, r"\bvalues\b.*\bS=4"),
    "trailing_shape": ((2, 4, 3), (2, 1, 2), 0, r"\bvalues\b"),
    "batch": ((2, 4, 3), (1, 1, 3), 0, r"\bvalues\b"),
    "cache_rank": ((2,), (2,), 0, r"\bcache\b"),
    "position_not_scalar": ((2, 4, 3), (2, 1, 3), np.zeros(2, np.int32), r"\bposition\b"),
    "position_float": ((2, 4, 3), (2, 1, 3), 1.0, r"\bposition\b"),
    "position_past_end": ((2, 4, 3), (2, 2, 3), 3, r"\bposition\b"),
    "position_negative": ((2, 4, 3), (2, 2, 3), -1, r"\bposition\b"),
}


@pytest.mark.parametrize("cache, values, position, pattern", BAD_CACHE.values(),
                         ids=BAD_CACHE.keys())
def test_bad_update_cache_raises(cache, values, position, pattern):
  with pytest.raises(ValueError, match=pattern):
    update_cache(jnp.zeros(cache), jnp.zeros(values), position)
