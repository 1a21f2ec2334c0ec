"""Tests of ``ops.mla`` against SPEC.md 4 (multi-head latent attention).

The ground truth is ``oracle`` below: SPEC 4's per-head keys and values built from the latent in
float64 NumPy (``k^h = [c_kv @ w_uk[:, h] ; k_pe]``, ``v^h = c_kv @ w_uv[:, h]``,
``q^h = [q_nope^h ; q_pe^h]``) and attended with ``tests.test_attention.oracle``. Properties
checked:

* "expanded" and "absorbed" equal the oracle over drawn shapes, dtypes and options;
  "absorbed" and ``None`` also on fixed cases, compiled and op by op;
* "absorbed" equals "expanded" in output and the gradients of all six inputs, with a NoPE-style
  unrotated k_pe and with RoPE-rotated q_pe / k_pe (``ops.attention.rope``), with segment_ids;
* decoding: writing c_kv and k_pe into preallocated latent caches with ``update_cache`` and
  running "absorbed" one token at a time with ``query_positions`` (after a prefill of a prefix or
  not) equals the "expanded" full forward;
* "expanded" through ``attention_implementation`` "reference" and "xla" agree, gradients included;
* malformed arguments raise a ``ValueError`` naming the argument.

Inputs: c_kv ~ N(0, 1) (the latent is RMS-normalised), w_uk, w_uv ~ N(0, 1 / C) so that the
expanded keys and values are about N(0, 1), scale (Dn + R) ** -0.5. Tolerances (relative RMS
error, tests/_numerics.py): 1e-5 for float32 results, 1e-2 for bfloat16 ones.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import assume, given
from hypothesis import strategies as st

from ops.attention import update_cache
from ops.attention.rope import apply_rope, rope_frequencies
from ops.mla import mla
from tests import _numerics as num
from tests.test_attention import TIMES, jit, xla_cpu_cannot_compile
from tests.test_attention import oracle as attention_oracle

pytestmark = pytest.mark.compile_bound  # conftest: XLA's optimisation passes off

TOL_F32, tolerance = num.TOL_F32, num.tolerance
IMPLEMENTATIONS = ("expanded", "absorbed")
INPUTS = ("q_nope", "q_pe", "c_kv", "k_pe", "w_uk", "w_uv")


def oracle(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, scale, segment_ids=None,
           query_positions=None) -> np.ndarray:
  """SPEC 4 in float64 NumPy; shapes as ``mla``. Returns o [B, T, H, Dv]."""
  q_nope, q_pe, c_kv, k_pe, w_uk, w_uv = (num.to_f64(x) for x in
                                          (q_nope, q_pe, c_kv, k_pe, w_uk, w_uv))
  heads = q_nope.shape[2]
  k_nope = np.einsum("bsc,chd->bshd", c_kv, w_uk)
  k_rope = np.repeat(k_pe[:, :, None], heads, axis=2)
  return attention_oracle(np.concatenate([q_nope, q_pe], -1),
                          np.concatenate([k_nope, k_rope], -1),
                          np.einsum("bsc,chd->bshd", c_kv, w_uv), scale=scale,
                          segment_ids=segment_ids, query_positions=query_positions)


# --- problem cases ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
  """Shapes, dtype, options and seed of one MLA self-attention problem (S == T).

  With ``rope`` q_pe and k_pe are rotated by RoPE at each token's position within its segment;
  without it they stay unrotated (Kimi-Linear's NoPE MLA).
  """

  batch: int = 2
  time: int = 7
  heads: int = 3
  nope_dim: int = 16
  rope_dim: int = 8
  latent_dim: int = 32
  value_dim: int = 12
  dtype: str = "float32"
  rope: bool = False
  with_segment_ids: bool = False
  seed: int = 0

  @property
  def scale(self) -> float:
    return (self.nope_dim + self.rope_dim) ** -0.5

  def arrays(self) -> dict:
    rng = np.random.default_rng(self.seed)
    b, t, h, c = self.batch, self.time, self.heads, self.latent_dim
    arrays = dict(
        q_nope=num.normal(rng, (b, t, h, self.nope_dim), self.dtype),
        q_pe=num.normal(rng, (b, t, h, self.rope_dim), self.dtype),
        c_kv=num.normal(rng, (b, t, c), self.dtype),
        k_pe=num.normal(rng, (b, t, self.rope_dim), self.dtype),
        w_uk=num.normal(rng, (c, h, self.nope_dim), self.dtype, scale=c ** -0.5),
        w_uv=num.normal(rng, (c, h, self.value_dim), self.dtype, scale=c ** -0.5))
    positions = np.tile(np.arange(t), (b, 1))
    if self.with_segment_ids:
      arrays["segment_ids"] = num.random_segment_ids(rng, b, t)
      for row, bounds in enumerate(num.segment_bounds(arrays["segment_ids"])):
        for start, stop in bounds:
          positions[row, start:stop] -= start
    if self.rope:
      inv_freq = rope_frequencies(self.rope_dim)
      positions = jnp.asarray(positions, jnp.int32)
      arrays["q_pe"] = apply_rope(arrays["q_pe"], positions, inv_freq)
      arrays["k_pe"] = apply_rope(arrays["k_pe"][:, :, None], positions, inv_freq)[:, :, 0]
    return arrays

  def cotangent(self):
    rng = np.random.default_rng(self.seed + 1)
    return num.normal(rng, (self.batch, self.time, self.heads, self.value_dim), self.dtype)


@st.composite
def cases(draw) -> Case:
  rope = draw(st.booleans())  # RoPE needs an even R; NoPE takes any R >= 1
  case = Case(
      batch=draw(st.integers(1, 2)), time=draw(st.sampled_from(TIMES)),
      heads=draw(st.integers(1, 4)), nope_dim=draw(st.sampled_from((8, 16))),
      rope_dim=draw(st.sampled_from((2, 8) if rope else (1, 8))),
      latent_dim=draw(st.sampled_from((16, 48))), value_dim=draw(st.sampled_from((8, 12, 16))),
      dtype=draw(num.float_dtypes()), rope=rope, with_segment_ids=draw(st.booleans()),
      seed=draw(num.seeds()))
  assume(not xla_cpu_cannot_compile(case.batch, case.time, case.heads, case.dtype))
  return case


# --- jitted runners ---------------------------------------------------------------------------

_STATIC = ("implementation", "attention_implementation", "scale")


def _run(arrays, *, implementation, scale, attention_implementation=None):
  return mla(**arrays, scale=scale, implementation=implementation,
             attention_implementation=attention_implementation)


_forward = functools.partial(jit, static_argnames=_STATIC)(_run)


@functools.partial(jit, static_argnames=_STATIC)
def _forward_and_vjp(arrays, cotangent, **static):
  return num.vjp_of(lambda x: _run(x, **static), arrays, cotangent, INPUTS)


def _assert_agree(ref, out, arrays) -> None:
  """Outputs and gradients ``(o, grads)`` of two forms agree, each to its dtype's tolerance."""
  (ref_o, ref_grads), (o, grads) = ref, out
  num.assert_close(ref_o, o, tolerance(o), "o")
  assert grads.keys() == ref_grads.keys() == set(INPUTS)
  for name, grad in grads.items():
    assert grad.dtype == arrays[name].dtype, (name, grad.dtype)
    num.assert_close(ref_grads[name], grad, tolerance(grad), f"d{name}")


# --- the implementations equal the oracle -------------------------------------------------------

@functools.partial(jit, static_argnames="scale")
def _both_forms(arrays, scale):
  """{implementation: o}: one compilation for both forms."""
  return {i: mla(**arrays, scale=scale, implementation=i) for i in IMPLEMENTATIONS}


@given(case=cases())
def test_forms_match_oracle(case):
  arrays = case.arrays()
  ref = oracle(**arrays, scale=case.scale)
  for implementation, o in _both_forms(arrays, case.scale).items():
    assert o.dtype == jnp.dtype(case.dtype) and o.shape == ref.shape, implementation
    num.assert_close(ref, o, tolerance(o), f"o ({implementation})")


ORACLE_CASES = dict(
    single_token=Case(batch=1, time=1, heads=2, rope_dim=1),
    rope_segments=Case(time=17, rope=True, with_segment_ids=True, seed=1),
)


class OracleTest(chex.TestCase):
  """Fixed cases against the oracle, compiled and op by op ("expanded" is ``ops.attention``'s
  code, checked that way in tests/test_attention.py)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(dict(case_name="rope_segments", implementation="absorbed"),
                            dict(case_name="single_token", implementation=None))
  def test_fixed_case(self, case_name, implementation):
    case = ORACLE_CASES[case_name]
    arrays = case.arrays()
    o = self.variant(functools.partial(mla, scale=case.scale,
                                       implementation=implementation))(**arrays)
    assert o.dtype == jnp.dtype(case.dtype)
    num.assert_close(oracle(**arrays, scale=case.scale), o, TOL_F32, "o")


# --- "absorbed" equals "expanded", gradients included -------------------------------------------

GRADIENT_CASES = {
    "nope-float32": Case(time=17, seed=2),
    "rope-float32-segments": Case(time=17, rope=True, with_segment_ids=True, seed=3),
    "nope-bfloat16-segments": Case(time=17, dtype="bfloat16", with_segment_ids=True, seed=4),
}


@pytest.mark.parametrize("case", GRADIENT_CASES.values(), ids=GRADIENT_CASES.keys())
def test_absorbed_matches_expanded(case):
  """Output and the gradients of q_nope, q_pe, c_kv, k_pe, w_uk and w_uv."""
  arrays, cotangent = case.arrays(), case.cotangent()
  expanded = _forward_and_vjp(arrays, cotangent, scale=case.scale, implementation="expanded",
                              attention_implementation="xla")
  _assert_agree(expanded, _forward_and_vjp(arrays, cotangent, scale=case.scale,
                                           implementation="absorbed"), arrays)


def test_expanded_attention_implementations_agree():
  """"expanded" through the "reference" and "xla" attention: output and gradients."""
  case = GRADIENT_CASES["rope-float32-segments"]
  arrays, cotangent = case.arrays(), case.cotangent()
  run = lambda attention: _forward_and_vjp(arrays, cotangent, scale=case.scale,
                                           implementation="expanded",
                                           attention_implementation=attention)
  _assert_agree(run("reference"), run("xla"), arrays)


# --- decoding from latent caches ----------------------------------------------------------------

def _step(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, cache_c, cache_pe, position, scale):
  """Writes one token's latent and k_pe at ``position``; "absorbed" over the caches."""
  cache_c = update_cache(cache_c, c_kv, position)
  cache_pe = update_cache(cache_pe, k_pe, position)
  positions = jnp.full((q_nope.shape[0], 1), position, jnp.int32)
  o = mla(q_nope, q_pe, cache_c, cache_pe, w_uk, w_uv, scale=scale, query_positions=positions,
          implementation="absorbed")
  return o, cache_c, cache_pe


class DecodeTest(chex.TestCase):
  """A prefill ("expanded" over the caches) or none, then one "absorbed" token at a time,
  equals the "expanded" full forward."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((9, 4, True), (5, 0, False))
  def test_decode_equals_forward(self, time, prefix, rope):
    case = Case(time=time, rope=rope, seed=5)
    arrays = case.arrays()
    full = _forward(arrays, implementation="expanded", scale=case.scale)
    slots = time + 3  # unwritten slots hold random values, which the mask must hide
    rng = np.random.default_rng(6)
    cache_c = num.normal(rng, (case.batch, slots, case.latent_dim))
    cache_pe = num.normal(rng, (case.batch, slots, case.rope_dim))
    weights = arrays["w_uk"], arrays["w_uv"]
    outputs = []
    if prefix:
      cache_c = update_cache(cache_c, arrays["c_kv"][:, :prefix], 0)
      cache_pe = update_cache(cache_pe, arrays["k_pe"][:, :prefix], 0)
      positions = jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (case.batch, prefix))
      outputs.append(mla(arrays["q_nope"][:, :prefix], arrays["q_pe"][:, :prefix], cache_c,
                         cache_pe, *weights, scale=case.scale, query_positions=positions,
                         implementation="expanded"))
    step = self.variant(functools.partial(_step, scale=case.scale))
    for t in range(prefix, time):
      token = [arrays[name][:, t:t + 1] for name in INPUTS[:4]]
      o, cache_c, cache_pe = step(*token, *weights, cache_c, cache_pe, jnp.int32(t))
      outputs.append(o)
    num.assert_close(full, jnp.concatenate(outputs, axis=1), TOL_F32, "o")


# --- malformed arguments ----------------------------------------------------------------------

def _valid_arguments() -> dict:
  """B = 2, T = S = 5, H = 3, Dn = 16, R = 8, C = 32, Dv = 12, with segment_ids."""
  return {**Case(time=5, with_segment_ids=True).arrays(), "scale": 0.2}


def _replace(name: str, make):
  return lambda args: {**args, name: make(args[name])}


def _grow(axis: int):
  return lambda x: jnp.concatenate([x, jnp.take(x, jnp.array([0]), axis)], axis)


BAD_ARGUMENTS = {  # id: (change, regex the message must match)
    "q_nope_rank": (_replace("q_nope", lambda x: x[0]), r"\bq_nope\b"),
    "q_pe_heads": (_replace("q_pe", _grow(2)), r"\bq_pe\b"),
    "q_pe_empty": (lambda a: {**a, "q_pe": a["q_pe"][..., :0], "k_pe": a["k_pe"][..., :0]},
                   r"\bq_pe\b.*R >= 1"),
    "c_kv_batch": (_replace("c_kv", _grow(0)), r"\bc_kv\b"),
    "c_kv_rank": (_replace("c_kv", lambda x: x[..., None]), r"\bc_kv\b"),
    "k_pe_dim": (_replace("k_pe", _grow(2)), r"\bk_pe\b"),
    "k_pe_time": (_replace("k_pe", _grow(1)), r"\bk_pe\b"),
    "k_pe_per_head": (_replace("k_pe", lambda x: x[:, :, None]), r"\bk_pe\b"),
    "w_uk_latent": (_replace("w_uk", _grow(0)), r"\bw_uk\b"),
    "w_uk_nope_dim": (_replace("w_uk", _grow(2)), r"\bw_uk\b"),
    "w_uv_heads": (_replace("w_uv", _grow(1)), r"\bw_uv\b"),
    "keys_not_queries": (lambda a: {**a, "c_kv": _grow(1)(a["c_kv"]),
                                    "k_pe": _grow(1)(a["k_pe"]), "segment_ids": None},
                         r"\bquery_positions\b"),
    "segment_ids_with_positions": (
        lambda a: {**a, "query_positions": jnp.zeros((2, 5), jnp.int32)},
        r"(?s)(?=.*\bsegment_ids\b)(?=.*\bquery_positions\b)"),
    "segment_ids_shape": (_replace("segment_ids", lambda x: x[:, :4]), r"\bsegment_ids\b"),
    "unknown_implementation": (lambda a: {**a, "implementation": "naive"}, r"\bimplementation\b"),
}


@pytest.mark.parametrize("change, pattern", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bad_argument_raises(implementation, change, pattern):
  with pytest.raises(ValueError, match=pattern):
    mla(**change({**_valid_arguments(), "implementation": implementation}))


def test_bad_attention_implementation_raises():
  with pytest.raises(ValueError, match=r"\bimplementation\b"):
    mla(**_valid_arguments(), implementation="expanded", attention_implementation="flash")
