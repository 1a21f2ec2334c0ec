"""Tests of ``ops.rwkv7`` against SPEC.md 2.5 (RWKV-7's diagonal-plus-low-rank state update).

The ground truth is ``oracle`` below: SPEC 2.5 transcribed token by token in float64 NumPy in
the official VALUE-MAJOR convention (state [V, K], the CUDA kernel's thread-row form
``sa_i = sum_j a_j S_ij; S_ij <- S_ij w_j + k_j v_i + sa_i b_j; y_i = sum_j S_ij r_j``), so a
transposition error in the op's key-major code (fla's layout) cannot cancel. Properties checked:

* every faster form, "xla" (the chunkwise generalised delta rule), "pallas_gpu" and "pallas_tpu"
  (its Pallas kernels, in their interpret modes on CPU), equals the oracle in output and final
  state (transposed), and "reference" (itself checked against the oracle) in output, final state
  and the gradients of r, w, k, v, a, b and initial_state, over drawn lengths, dtypes, scales and
  packed rows, through one test base (``AgreementBase``) that each form's test class subclasses;
* strong decay (down to -20 per token) stays finite and correct, gradients included;
* the kernels lower for their hardware from this CPU machine (Triton for CUDA, Mosaic for TPU),
  and ``implementation=None`` resolves to them on their platform, falling back with a warning
  where they cannot run;
* a fixed case equals the oracle compiled and op by op (chex variants); other chunk sizes too;
* KDA is the special case w = g, b = k, a = -beta exp(g) k with the key beta k: ``rwkv7``
  equals ``ops.kda.kda``;
* ``rwkv7_step`` token by token, from the start or after a prefill, equals the full forward;
* packed rows (``segment_ids``) equal each segment run alone;
* malformed arguments raise a ``ValueError`` that names the argument.

Inputs are RWKV-7's (SPEC 2.3): kappa L2-normalised per head, a_icl = sigmoid(N) in (0, 1),
a = -kappa, b = kappa a_icl (a contractive transition), w = -0.6065306597126334 sigmoid(N) (the
layer's range); "strong": in half of the (batch, head, key channel) lanes w = -U(0, 20).

Tolerances (relative RMS error, tests/_numerics.py). A float32 result, value or gradient: 1e-5
(measured over 48 cases of the drawn kind: o 3.6e-7, final state 7.9e-7 against the oracle,
gradients at most 8.1e-7 (dw) between the forms; the kernels in interpret mode over 20 cases
each: o 1.7e-7 and gradients at most 3.5e-7 (dw) against "reference"). A bfloat16 result: 1e-2
(measured o 1.8e-3 against the oracle, gradients 2.4e-4 (da) between the forms; the GPU
kernels, which store their chunk matrices in bfloat16, over 20 cases: o 3.1e-3, final state
1.5e-3 and gradients at most 2.8e-3 (db) against "reference"). Strong decay uses 3e-5; its
reason is given where it is used.
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

import ops.rwkv7 as rwkv7_module
from ops._validate import resolve_implementation
from ops.kda import _segment_index, kda
from ops.rwkv7 import pallas_gpu, pallas_tpu, rwkv7, rwkv7_step
from tests import _numerics as num

pytestmark = pytest.mark.compile_bound  # conftest: XLA's optimisation passes off

TOL_F32, tolerance = num.TOL_F32, num.tolerance
PLAIN_FORMS = ("reference", "xla")
IMPLEMENTATIONS = PLAIN_FORMS + ("pallas_gpu", "pallas_tpu")
DIFFERENTIABLE = ("r", "w", "k", "v", "a", "b", "initial_state")
TIME_MAJOR = ("r", "w", "k", "v", "a", "b", "segment_ids")  # the arguments with a time axis (1)
LOG_DECAY_BOUND = -0.6065306597126334  # -exp(-1/2): RWKV-7's w = bound * sigmoid(.)


# --- the float64 oracle (SPEC 2.5, value-major) -----------------------------------------------

def oracle(r, w, k, v, a, b, scale=1.0, initial_state=None, segment_ids=None):
  """SPEC 2.5 in float64 NumPy, one token at a time, in the official value-major layout.

  Args:
    r, w, k, a, b: [B, T, H, K] (w the log decay); v: [B, T, H, V].
    initial_state: optional VALUE-MAJOR [B, H, V, K].
    segment_ids: optional [B, T]; the state restarts from zero where the id changes.

  Returns:
    (o [B, T, H, V], final state VALUE-MAJOR [B, H, V, K]), both float64.
  """
  r, w, k, v, a, b = (num.to_f64(x) for x in (r, w, k, v, a, b))
  batch, time, heads, key_dim = r.shape
  value_dim = v.shape[-1]
  state = (np.zeros((batch, heads, value_dim, key_dim)) if initial_state is None
           else num.to_f64(initial_state).copy())  # state[..., i, j]: value i, key j
  o = np.zeros((batch, time, heads, value_dim))
  ids = None if segment_ids is None else np.asarray(segment_ids)
  for t in range(time):
    if ids is not None and t > 0:
      state = np.where((ids[:, t] != ids[:, t - 1])[:, None, None, None], 0.0, state)
    row = lambda x: x[:, t, :, None, :]  # a key vector along j, broadcast over rows i
    column = lambda x: x[:, t, :, :, None]  # a value vector along i
    sa = np.einsum("bhij,bhj->bhi", state, a[:, t])  # uses the old state
    state = state * np.exp(row(w)) + column(v) * row(k) + sa[..., None] * row(b)
    o[:, t] = np.einsum("bhij,bhj->bhi", state, scale * r[:, t])  # read after the update
  return o, state


def key_major(state: np.ndarray) -> np.ndarray:
  """The oracle's value-major state [.., V, K] in the op's key-major layout [.., K, V]."""
  return np.swapaxes(state, -1, -2)


def test_oracle_matches_closed_form():
  """The oracle itself, K = V = 1: S_t = S_{t-1} (exp(w) + a b) + k v, o_t = scale r S_t.
  With w = log(1/2), a = -1, b = 1/4, k = 1, v = (1, 2), S_0 = 4: S = 1 + 1 = 2, then
  1/2 + 2 = 5/2."""
  ones = np.ones((1, 2, 1, 1))
  o, state = oracle(3.0 * ones, np.log(0.5) * ones, ones, np.array([1.0, 2.0]).reshape(ones.shape),
                    -ones, 0.25 * ones, scale=0.5, initial_state=np.full((1, 1, 1, 1), 4.0))
  np.testing.assert_allclose(o.ravel(), [1.5 * 2.0, 1.5 * 2.5])
  np.testing.assert_allclose(state.ravel(), [2.5])


def test_oracle_layout_is_the_transpose_of_fla():
  """One token of the value-major oracle equals fla's key-major matrix form (SPEC 2.5)
  ``S_t = diag(exp(w)) S + b (a^T S) + k v^T``, ``o = S_t^T r`` with K != V."""
  rng = np.random.default_rng(0)
  r, w, k, a, b = rng.normal(size=(5, 1, 1, 1, 3))
  w = -np.abs(w)
  v = rng.normal(size=(1, 1, 1, 2))
  S = rng.normal(size=(3, 2))  # key-major
  o, state = oracle(r, w, k, v, a, b, initial_state=S.T[None, None])
  x = lambda z: z[0, 0, 0]
  expected = np.diag(np.exp(x(w))) @ S + np.outer(x(b), x(a) @ S) + np.outer(x(k), x(v))
  np.testing.assert_allclose(key_major(state)[0, 0], expected, rtol=1e-12)
  np.testing.assert_allclose(o[0, 0, 0], expected.T @ x(r), rtol=1e-12)


# --- problem cases ----------------------------------------------------------------------------

def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * x))


@dataclasses.dataclass(frozen=True)
class Case:
  """One problem: shapes, the inputs' dtype, options, the gate's distribution and the seed.

  Gates (log space): "rwkv7": ``-0.6065 sigmoid(N(0, 1))``; "strong": the same, but in half of
  the (batch, head, key channel) lanes ``-U(0, 20)`` at every token (a cumulative gate down to
  about -640 within a chunk of 64). ``segments``: "none" (no segment_ids), "one" (segment_ids
  of one segment, all zero) or "packed" (random packed-row ids, up to 6 segments a row, so
  several can share a chunk).
  """

  batch: int = 2
  time: int = 70
  heads: int = 2
  key_dim: int = 16
  value_dim: int = 32
  dtype: str = "float32"
  gate: str = "rwkv7"
  scale: float = 1.0
  with_initial_state: bool = True
  segments: str = "none"
  seed: int = 0

  def gates(self, rng: np.random.Generator) -> np.ndarray:
    shape = (self.batch, self.time, self.heads, self.key_dim)
    w = LOG_DECAY_BOUND * _sigmoid(rng.normal(size=shape))
    if self.gate == "strong":
      lanes = rng.random((self.batch, 1, self.heads, self.key_dim)) < 0.5
      w = np.where(lanes, -rng.uniform(0.0, 20.0, shape), w)
    else:
      assert self.gate == "rwkv7", self.gate
    return w

  def arrays(self) -> dict:
    """The array arguments of ``rwkv7`` (initial_state and segment_ids as switched on)."""
    rng = np.random.default_rng(self.seed)
    shape = (self.batch, self.time, self.heads, self.key_dim)
    kappa = rng.normal(size=shape)
    kappa /= np.linalg.norm(kappa, axis=-1, keepdims=True)
    a_icl = _sigmoid(rng.normal(size=shape))
    as_dtype = lambda x: jnp.asarray(x, self.dtype)
    arrays = dict(
        r=num.normal(rng, shape, self.dtype), w=as_dtype(self.gates(rng)),
        k=num.normal(rng, shape, self.dtype, scale=self.key_dim ** -0.5),
        v=num.normal(rng, shape[:-1] + (self.value_dim,), self.dtype),
        a=as_dtype(-kappa), b=as_dtype(kappa * a_icl),
        initial_state=num.normal(rng, (self.batch, self.heads, self.key_dim, self.value_dim)))
    if not self.with_initial_state:
      del arrays["initial_state"]
    if self.segments == "packed":
      arrays["segment_ids"] = num.random_segment_ids(rng, self.batch, self.time, max_segments=6)
    elif self.segments == "one":
      arrays["segment_ids"] = jnp.zeros((self.batch, self.time), jnp.int32)
    else:
      assert self.segments == "none", self.segments
    return arrays

  def cotangents(self, stream: int = 1):
    """Random cotangents for (o [v's dtype], final_state [float32]); ``stream`` picks an
    independent draw."""
    rng = np.random.default_rng([self.seed, stream])
    return (num.normal(rng, (self.batch, self.time, self.heads, self.value_dim), self.dtype),
            num.normal(rng, (self.batch, self.heads, self.key_dim, self.value_dim)))


def case_oracle(case: Case, arrays: dict):
  """The oracle on a case's arrays, with the states moved between the two layouts: returns
  (o, final state KEY-MAJOR [B, H, K, V])."""
  arrays = dict(arrays)
  if "initial_state" in arrays:
    arrays["initial_state"] = key_major(num.to_f64(arrays["initial_state"]))
  o, state = oracle(**arrays, scale=case.scale)
  return o, key_major(state)


def _check_against_oracle(case: Case, arrays: dict, o, final_state, name: str = "",
                          state_tolerance: float = TOL_F32) -> None:
  ref_o, ref_state = case_oracle(case, arrays)
  assert o.dtype == jnp.dtype(case.dtype), o.dtype
  assert final_state.dtype == jnp.float32, final_state.dtype
  num.assert_close(ref_o, o, tolerance(o), f"o vs oracle {name}")
  num.assert_close(ref_state, final_state, state_tolerance, f"final_state vs oracle {name}")


# --- jitted runners (module level, so equal shapes reuse the compilation) ---------------------

# The tests compile many small programs; LLVM's optimisations take about half of each
# compilation on CPU and change nothing the tests check (as in tests/test_attention.py).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
_STATIC = ("implementation", "scale", "chunk_size")


def _run(arrays, *, implementation, scale=1.0, chunk_size=64):
  """(o, final_state) of ``rwkv7``."""
  return rwkv7(**arrays, scale=scale, return_final_state=True, implementation=implementation,
               chunk_size=chunk_size)


_forward = functools.partial(jit, static_argnames=_STATIC)(_run)


@functools.partial(jit, static_argnames=_STATIC)
def _forward_and_vjp(arrays, cotangents, **static):
  """((o, final_state), gradients of every float array) for the cotangents of both outputs."""
  return num.vjp_of(lambda x: _run(x, **static), arrays, cotangents, DIFFERENTIABLE)


def _run_forms(case: Case, arrays: dict, implementation: str, chunk_size: int) -> dict:
  """{form: ((o, final_state), gradients)} of "reference" and ``implementation`` for the case's
  cotangents (the chunk size is the faster form's)."""
  run = lambda name, **static: _forward_and_vjp(arrays, case.cotangents(), implementation=name,
                                                scale=case.scale, **static)
  return {"reference": run("reference"), implementation: run(implementation,
                                                             chunk_size=chunk_size)}


# --- every faster form equals the oracle and "reference", gradients included -------------------

# Lengths below and past the chunk of 64, none a multiple of it (1 token included).
RWKV7_SEQ_LENGTHS = (1, 7, 17, 63, 65, 100)
# The kernels' lengths for chunks of 16 (interpret mode is slow): one partial chunk, and two
# full chunks and a part.
KERNEL_SEQ_LENGTHS = (7, 37)


@st.composite
def cases(draw, lengths=RWKV7_SEQ_LENGTHS, value_dim=32) -> Case:
  """Drawn lengths, dtypes, scales, packed rows and seeds, with RWKV-7's gates. The shapes and
  the argument structure stay fixed (an initial state and segment ids always given), so that
  the drawn cases share a few compilations; the None paths are the fixed cases' below."""
  return Case(time=draw(st.sampled_from(lengths)), value_dim=value_dim,
              dtype=draw(num.float_dtypes()), scale=draw(st.sampled_from((1.0, 0.5))),
              segments=draw(st.sampled_from(("one", "packed"))), seed=draw(num.seeds()))


# Float32 error of the chunked forms under strong decay: 3e-5 (KDA's bound, tests/test_kda.py).
# Within a chunk the cumulative gate falls to about -640 in the strong lanes; the pair weights
# exp(G_r - G_i) of nearby tokens are built from such numbers, whose float32 spacing (6e-5 at
# 640) becomes a relative error of the weight. The token-by-token recurrence never forms them.
# Measured at most 6e-6 (o, dv) over 24 seeds, against 8e-7 with RWKV-7's gates; the kernels at
# most 5.5e-6 (final state) over 24 seeds, as "xla". A form that exponentiated an unreferenced
# cumulative gate would overflow to inf or nan and fail.
TOL_STRONG_DECAY = 3e-5


class AgreementBase:
  """The properties every faster implementation shares with "reference" and the oracle; one
  subclass each (the subclasses are what pytest collects).

  ``implementation`` names the form under test, ``chunk_size`` and ``lengths`` its drawn cases'
  chunk and sequence lengths, ``value_dim`` their V.
  """

  implementation: str
  chunk_size = 64
  lengths = RWKV7_SEQ_LENGTHS
  value_dim = 32
  # Whether the form reads its inputs in their own dtype (the Pallas kernels; the GPU kernels
  # also store their chunk matrices in it): then float32 results (the final state, float32
  # gradients) from bfloat16 inputs carry bfloat16 rounding and are held to 1e-2, not 1e-5.
  keeps_input_dtype = False

  @given(data=st.data())
  def test_matches_oracle_and_reference(self, data):
    case = data.draw(cases(self.lengths, self.value_dim), label="case")
    arrays = case.arrays()
    results = _run_forms(case, arrays, self.implementation, self.chunk_size)
    narrow = self.keeps_input_dtype and case.dtype == "bfloat16"
    float32_tolerance = num.TOL_BF16 if narrow else TOL_F32
    for implementation, ((o, final_state), _) in results.items():
      _check_against_oracle(case, arrays, o, final_state, implementation,
                            TOL_F32 if implementation == "reference" else float32_tolerance)
    # The gradients' usual size, for a draw whose cotangent cancels one (see _numerics).
    _, scales = _forward_and_vjp(arrays, case.cotangents(stream=2), implementation="reference",
                                 scale=case.scale)
    num.assert_forms_agree(results.get, arrays, DIFFERENTIABLE, self.implementation, output="o",
                           float32_tolerance=float32_tolerance, gradient_scales=scales)

  @pytest.mark.parametrize("seed", [10, 11])
  def test_strong_decay_is_finite_and_correct(self, seed):
    """Half of the lanes decay by up to exp(-20) per token over a chunk of 64 and a part, no
    segment ids: the form stays finite and equals the oracle and "reference", gradients
    included."""
    case = Case(time=100, gate="strong", segments="none", seed=seed)
    arrays = case.arrays()
    assert float(arrays["w"].min()) < -19.5  # the decay is as strong as stated
    results = _run_forms(case, arrays, self.implementation, chunk_size=64)
    oracle_o, oracle_state = case_oracle(case, arrays)
    for implementation, ((o, final_state), _) in results.items():
      num.assert_close(oracle_o, o, TOL_STRONG_DECAY, f"o ({implementation}) vs oracle")
      num.assert_close(oracle_state, final_state, TOL_STRONG_DECAY,
                       f"final_state ({implementation}) vs oracle")
    ref_grads, grads = results["reference"][1], results[self.implementation][1]
    for name, grad in grads.items():
      num.assert_close(ref_grads[name], grad, TOL_STRONG_DECAY, f"d{name}")


class TestXla(AgreementBase):
  """The chunkwise generalised delta rule in plain JAX (``ops.rwkv7.chunk``)."""

  implementation = "xla"


class KernelAgreement(AgreementBase):
  """The kernels' drawn cases: chunks of 16, and V = 24, which the GPU kernels pad to 32."""

  chunk_size = 16
  lengths = KERNEL_SEQ_LENGTHS
  value_dim = 24
  keeps_input_dtype = True


class TestPallasGpu(KernelAgreement):
  """The Pallas Triton kernels (``ops.rwkv7.pallas_gpu``), in interpret mode off a GPU."""

  implementation = "pallas_gpu"


class TestPallasTpu(KernelAgreement):
  """The Pallas TPU kernels (``ops.rwkv7.pallas_tpu``), in TPU interpret mode off a TPU. They
  share every formula with the GPU kernels (``ops.rwkv7._kernel_chunk``), which
  ``TestPallasGpu`` draws more examples of; here the drawn cases check the TPU plumbing
  (primitives, blocks, the reversed walk, the VMEM state), and the TPU interpreter is slow."""

  implementation = "pallas_tpu"

  # Its own wrapper: ``settings(...)`` applied to the inherited test would set the shared function
  # object's settings, every subclass's draws with it.
  @settings(max_examples=2)
  @given(data=st.data())
  def test_matches_oracle_and_reference(self, data):
    AgreementBase.test_matches_oracle_and_reference.hypothesis.inner_test(self, data)


# --- the kernels lower for their hardware without it ------------------------------------------

def _kernel_functions(kernels, dtype):
  """(forward, gradient) of ``kernels.scan`` compiled for hardware (interpret off), and args:
  RWKV-7's heads of 64, packed rows, a chunk of 64 and a part."""
  case = Case(batch=1, time=70, key_dim=64, value_dim=64, dtype=dtype, segments="packed")
  arrays = case.arrays()
  index = _segment_index(arrays["segment_ids"])
  forward = lambda r, w, k, v, a, b, h0: kernels.scan(r, w, k, v, a, b, h0, index, scale=0.5,
                                                      interpret=False)
  loss = lambda *args: sum(jnp.sum(x.astype(jnp.float32)) for x in forward(*args))
  args = tuple(arrays[name] for name in DIFFERENTIABLE)
  return forward, jax.grad(loss, argnums=tuple(range(len(args)))), args



def _sub_chunk_case(rng, chunk: int, decay: float, K: int = 32, V: int = 16):
  """One chunk's random token inputs (r, w, k, a, b, v) as [chunk, width] float32, its packed-row
  masks (one to three segments drawn: with three, pairs two sub-chunks apart nearly always
  straddle a segment and are masked) and the interpret-mode GPU primitives, for the sub-chunk
  tests."""
  from ops.kda import _kernel_chunk as kda_chunk
  from ops.kda import pallas_gpu as kda_gpu
  r, k, a, b = (num.normal(rng, (chunk, K), scale=0.3) for _ in range(4))
  w = -num.uniform(rng, (chunk, K), 0.0, decay)
  v = num.normal(rng, (chunk, V))
  index = jnp.asarray(np.sort(rng.integers(0, rng.integers(1, 4), (1, chunk))), jnp.int32)
  masks = [m[0] for m in kda_chunk.packed_row_masks(index, 1, chunk, chunk)]
  prims = pallas_gpu.RWKV7.primitives(kda_gpu.precision_for(jnp.float32, interpret=True))
  return (r, w, k, a, b, v), masks, prims


@pytest.mark.parametrize("chunk, decay", [(64, 0.1), (64, 20.0), (16, 1.0)])
@given(seed=num.seeds())
def test_sub_chunk_intra_forward_equals_the_level_split(seed, chunk, decay):
  """The GPU intra forward's 16-row sub-chunk form (``ops.rwkv7._kernel_subchunk``) gives the
  chunk matrices of the whole-chunk form (``_kernel_chunk.intra_forward``): packed segments,
  weak decay (large products across sub-chunks) and strong (up to -20 a token)."""
  from ops.rwkv7 import _kernel_chunk, _kernel_subchunk
  rng = np.random.default_rng(seed)
  K, V = 32, 16
  (r, w, k, a, b, v), masks, prims = _sub_chunk_case(rng, chunk, decay, K, V)
  expected = _kernel_chunk.intra_forward(_kernel_chunk.Chunk(r, w, k, a, b, *masks, prims), v)
  got = num.sub_chunk_matrices(_kernel_subchunk, (r, w, k, a, b, v, *masks), expected, prims)
  for name in expected._fields:  # every stored entry written (NaN otherwise) and equal
    if name != "values":  # v itself: the state kernels read the input
      num.assert_close(getattr(expected, name), got[name], num.TOL_F32, name, floor=1e-30)


@pytest.mark.parametrize("chunk, decay", [(64, 0.1), (64, 20.0), (32, 1.0)])
@given(seed=num.seeds())
def test_sub_chunk_intra_backward_equals_the_level_split(seed, chunk, decay):
  """The GPU intra backward's 16-row sub-chunk form (``ops.rwkv7._kernel_subchunk``) gives the
  token gradients of the whole-chunk form (``_kernel_chunk.token_gradients``) from random
  cotangents of every chunk matrix: packed segments, weak and strong decay."""
  from ops.rwkv7 import _kernel_chunk, _kernel_subchunk
  rng = np.random.default_rng(seed)
  K, V = 32, 16
  (r, w, k, a, b, v), masks, prims = _sub_chunk_case(rng, chunk, decay, K, V)
  widths = dict(W=K, U=V, Rg=K, A=chunk, Y=V, Bg=K, Kg=K, values=V)
  cotangents = _kernel_chunk.ChunkMatrices(
      **{name: num.normal(rng, (chunk, width)) for name, width in widths.items()},
      decay=num.normal(rng, (1, K)))
  scale = 0.7
  tokens = (r, w, k, a, b, v)
  expected = _kernel_chunk.token_gradients(_kernel_chunk.load(tokens, *masks, prims, scale), v,
                                           cotangents, scale)
  got = num.sub_chunk_gradients(_kernel_subchunk, tokens, masks, cotangents, prims, scale)
  for name, value in zip(_kernel_subchunk.GRADIENTS, expected):
    num.assert_close(value, got[name], num.sub_chunk_gradient_tolerance(name == "dw", decay),
                     name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_kernels_lower_to_triton(dtype):
  """Forward and backward lower through Pallas' Triton lowering for CUDA on this CPU machine
  (the Triton compiler itself runs on the GPU); an unsupported primitive would raise here."""
  forward, gradient, args = _kernel_functions(pallas_gpu, dtype)
  for fn in (forward, gradient):
    num.assert_lowers_to_triton(fn, *args)


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
    assert resolve_implementation(None, rwkv7_module.IMPLEMENTATIONS,
                                  rwkv7_module.DEFAULT_BY_PLATFORM) == expected
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  case = Case(time=20)
  arrays = case.arrays()
  with pytest.warns(UserWarning, match="pallas_tpu.*power of two.*using 'xla'"):
    o, _ = rwkv7(**arrays, chunk_size=48)
  num.assert_close(case_oracle(case, arrays)[0], o, TOL_F32, "o")
  with pytest.raises(ValueError, match="pallas_tpu.*power of two"):
    rwkv7(**arrays, chunk_size=48, implementation="pallas_tpu")


# --- chunk sizes and fixed cases ----------------------------------------------------------------

def test_chunk_sizes_without_segments():
  """No segment_ids (the None path) at other chunk sizes: full chunks of 16 or 64 tokens and a
  part, or one partial chunk of 128."""
  case = Case(seed=1)
  arrays = case.arrays()
  ref = _forward(arrays, implementation="reference")
  _check_against_oracle(case, arrays, *ref)
  for chunk_size in (16, 64, 128):
    o, final_state = _forward(arrays, implementation="xla", chunk_size=chunk_size)
    num.assert_close(ref[0], o, TOL_F32, f"o (chunk_size {chunk_size})")
    num.assert_close(ref[1], final_state, TOL_F32, f"final_state (chunk_size {chunk_size})")


# Packed rows without an initial state (its None path), past one chunk.
FIXED_CASE = Case(scale=0.5, segments="packed", with_initial_state=False, seed=3)


class OracleTest(chex.TestCase):
  """A fixed case against the oracle, run compiled and op by op (chex variants)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*PLAIN_FORMS)
  def test_fixed_case(self, implementation):
    run = self.variant(functools.partial(rwkv7, scale=FIXED_CASE.scale, return_final_state=True,
                                         implementation=implementation))
    arrays = FIXED_CASE.arrays()
    _check_against_oracle(FIXED_CASE, arrays, *run(**arrays))


@pytest.mark.parametrize("implementation", (None,) + PLAIN_FORMS)
def test_without_final_state_returns_none(implementation):
  """``return_final_state=False`` gives ``(o, None)``; ``implementation=None`` runs too."""
  case = FIXED_CASE
  arrays = case.arrays()
  o, final_state = rwkv7(**arrays, scale=case.scale, implementation=implementation)
  assert final_state is None
  num.assert_close(case_oracle(case, arrays)[0], o, TOL_F32, "o")


# --- KDA as a special case --------------------------------------------------------------------

@pytest.mark.parametrize("implementation", PLAIN_FORMS)
def test_kda_is_a_special_case(implementation):
  """KDA, ``S_t = (I - beta k k^T) diag(exp g) S_{t-1} + beta k v^T``, expands to
  ``diag(exp g) S_{t-1} + k ((-beta exp(g) k)^T S_{t-1}) + (beta k) v^T``: RWKV-7 with w = g,
  b = k, a = -beta exp(g) k and key beta k (KDA's low-rank term reads the decayed state,
  RWKV-7's the undecayed one, hence exp(g) in a). Same query scale, no in-kernel norm."""
  case = Case(segments="packed", seed=5)
  arrays = case.arrays()
  rng = np.random.default_rng(6)
  k = arrays["b"] / jnp.linalg.norm(arrays["b"], axis=-1, keepdims=True)  # unit keys
  beta = num.uniform(rng, k.shape[:-1], 0.0, 1.0)
  g = arrays["w"]
  shared = {n: arrays[n] for n in ("v", "initial_state", "segment_ids")}
  ref_o, ref_state = kda(q=arrays["r"], k=k, g=g, beta=beta, scale=0.5, return_final_state=True,
                         implementation="reference", **shared)
  write = beta[..., None] * k
  o, final_state = rwkv7(r=arrays["r"], w=g, k=write, a=-jnp.exp(g) * write, b=k, scale=0.5,
                         return_final_state=True, implementation=implementation, **shared)
  num.assert_close(ref_o, o, TOL_F32, "o vs kda")
  num.assert_close(ref_state, final_state, TOL_F32, "final_state vs kda")


# --- decoding token by token ------------------------------------------------------------------

_step = jax.jit(rwkv7_step, static_argnames=("scale",))


@pytest.mark.parametrize("implementation, prefill, dtype", [
    ("reference", 0, "float32"), ("xla", 0, "bfloat16"), ("reference", 65, "bfloat16"),
    ("xla", 65, "float32")])
def test_prefill_then_steps_equals_full(implementation, prefill, dtype):
  """``rwkv7`` over the first ``prefill`` tokens, then ``rwkv7_step`` token by token, equals
  the full forward (from an initial state)."""
  case = Case(dtype=dtype, scale=0.5, seed=7)
  arrays = case.arrays()
  o, final_state = _forward(arrays, implementation=implementation, scale=case.scale)
  state = arrays["initial_state"]
  if prefill:
    head = {n: x[:, :prefill] if n in TIME_MAJOR else x for n, x in arrays.items()}
    o_head, state = _forward(head, implementation=implementation, scale=case.scale)
    num.assert_close(o[:, :prefill], o_head, tolerance(o_head), "o of the prefill")
  for t in range(prefill, case.time):
    token = {n: x[:, t] for n, x in arrays.items() if n in TIME_MAJOR}
    o_t, state = _step(**token, state=state, scale=case.scale)
    assert o_t.dtype == o.dtype and state.dtype == jnp.float32
    num.assert_close(o[:, t], o_t, tolerance(o_t), f"o[{t}]")
  num.assert_close(final_state, state, TOL_F32, "final_state")


def test_step_without_state_starts_from_zero():
  case = Case(batch=1, time=1, with_initial_state=False, seed=8)
  arrays = case.arrays()
  ref_o, ref_state = case_oracle(case, arrays)
  o, state = rwkv7_step(**{n: x[:, 0] for n, x in arrays.items()})
  assert state.shape == ref_state.shape and state.dtype == jnp.float32
  num.assert_close(ref_o[:, 0], o, TOL_F32, "o")
  num.assert_close(ref_state, state, TOL_F32, "state")


# --- packed sequences -------------------------------------------------------------------------

# Per row: segment labels and lengths (70 tokens). A reset is any change of id, not only
# upward; boundaries fall exactly on the chunk edge t = 64 and beside it (t = 63, t = 65).
PACKED_ROWS = (((7, 64), (3, 1), (7, 5)), ((2, 63), (5, 2), (1, 5)))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_segments_equal_separate_runs(implementation):
  """Packed rows equal each segment run alone (the oracle per segment): the first segment from
  the row's initial state, the others from zero; the final state is the last segment's."""
  ids = jnp.asarray([np.repeat(*zip(*row)) for row in PACKED_ROWS], jnp.int32)
  case = Case(seed=9)
  arrays = {**case.arrays(), "segment_ids": ids}
  o, final_state = _forward(arrays, implementation=implementation)
  for b, row_bounds in enumerate(num.segment_bounds(ids)):
    state = arrays["initial_state"][b:b + 1]
    for i, (start, stop) in enumerate(row_bounds):
      piece = {n: x[b:b + 1, start:stop] for n, x in arrays.items() if n in TIME_MAJOR[:-1]}
      if i == 0:
        piece["initial_state"] = state
      seg_o, state = case_oracle(case, piece)
      num.assert_close(seg_o, o[b:b + 1, start:stop], TOL_F32, f"o row {b} segment {i}")
    num.assert_close(state, final_state[b:b + 1], TOL_F32, f"final_state row {b}")


# --- malformed arguments ----------------------------------------------------------------------

def _valid_arguments() -> dict:
  """Well-formed arguments: batch 2, time 5, 2 heads, K = 16, V = 32."""
  return Case(time=5).arrays()


def _replace(name: str, make):
  """A change of the valid arguments that sets ``name`` to ``make(old value)``."""
  return lambda args: {**args, name: make(args[name])}


def _grow(axis: int):
  """A change that lengthens ``axis`` by one (repeating its first entry)."""
  return lambda x: jnp.concatenate([x, jnp.take(x, jnp.array([0]), axis)], axis)


BAD_ARGUMENTS = {  # id: (change, regex the message must match)
    "r_rank": (_replace("r", lambda x: x[0]), r"\br\b"),
    "r_integer": (_replace("r", lambda x: x.astype(jnp.int32)), r"\br\b"),
    "w_key_dim": (_replace("w", _grow(3)), r"\bw\b"),
    "k_heads": (_replace("k", _grow(2)), r"\bk\b"),
    "a_time": (_replace("a", _grow(1)), r"\ba\b"),
    "b_batch": (_replace("b", _grow(0)), r"\bb\b"),
    "v_time": (_replace("v", _grow(1)), r"\bv\b"),
    "v_heads": (_replace("v", _grow(2)), r"\bv\b"),
    "v_rank": (_replace("v", lambda x: x[0]), r"\bv\b"),
    "w_positive": (_replace("w", lambda x: x.at[1, 2, 1, 4].set(0.25)), r"\bw\b"),
    "initial_state_bfloat16": (_replace("initial_state", lambda x: x.astype(jnp.bfloat16)),
                               r"\binitial_state\b"),
    "initial_state_value_dim": (_replace("initial_state", _grow(3)), r"\binitial_state\b"),
    "initial_state_key_dim": (_replace("initial_state", _grow(2)), r"\binitial_state\b"),
    "initial_state_batch": (_replace("initial_state", _grow(0)), r"\binitial_state\b"),
    "initial_state_rank": (_replace("initial_state", lambda x: x[0]), r"\binitial_state\b"),
    "segment_ids_shape": (lambda a: {**a, "segment_ids": jnp.zeros((2, 6), jnp.int32)},
                          r"\bsegment_ids\b"),
    "unknown_implementation": (lambda a: {**a, "implementation": "cuda"}, r"\bimplementation\b"),
    "chunk_size_zero": (lambda a: {**a, "chunk_size": 0}, r"\bchunk_size\b"),
    "chunk_size_not_multiple": (lambda a: {**a, "chunk_size": 24}, r"\bchunk_size\b"),
    "chunk_size_negative": (lambda a: {**a, "chunk_size": -16}, r"\bchunk_size\b"),
}


@pytest.mark.parametrize("change, pattern", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_argument_raises(change, pattern):
  with pytest.raises(ValueError, match=pattern):
    rwkv7(**change(_valid_arguments()))


def test_unknown_implementation_names_the_choices():
  with pytest.raises(ValueError, match=r"implementation") as info:
    rwkv7(**_valid_arguments(), implementation="cuda")
  for allowed in IMPLEMENTATIONS:
    assert allowed in str(info.value), str(info.value)


def test_positive_decay_is_not_checked_under_jit():
  """Under jit w is abstract: no value check (and no error) there."""
  args = _valid_arguments()
  args["w"] = args["w"].at[0, 0, 0, 0].set(0.25)
  o, _ = jax.jit(lambda x: rwkv7(**x, implementation="reference"))(args)
  assert o.shape == args["v"].shape


def _valid_step_arguments() -> dict:
  """Well-formed ``rwkv7_step`` arguments: one token of ``_valid_arguments``."""
  args = _valid_arguments()
  args["state"] = args.pop("initial_state")
  return {n: x[:, 0] if n in TIME_MAJOR else x for n, x in args.items()}


BAD_STEP_ARGUMENTS = {
    "state_value_dim": (_replace("state", _grow(3)), r"\bstate\b"),
    "state_batch": (_replace("state", _grow(0)), r"\bstate\b"),
    "state_bfloat16": (_replace("state", lambda x: x.astype(jnp.bfloat16)), r"\bstate\b"),
    "r_rank": (_replace("r", lambda x: x[:, None]), r"\br\b"),
    "a_key_dim": (_replace("a", _grow(2)), r"\ba\b"),
    "v_heads": (_replace("v", _grow(1)), r"\bv\b"),
    "w_positive": (_replace("w", lambda x: x.at[0, 1, 2].set(0.5)), r"\bw\b"),
}


@pytest.mark.parametrize("change, pattern", BAD_STEP_ARGUMENTS.values(),
                         ids=BAD_STEP_ARGUMENTS.keys())
def test_bad_step_argument_raises(change, pattern):
  with pytest.raises(ValueError, match=pattern):
    rwkv7_step(**change(_valid_step_arguments()))
