"""Shared test helpers: the relative RMS error, hypothesis strategies and random input makers.

Forms of one op are compared with ``rel_rms(ref, x) = rms(ref - x) / rms(ref)`` computed in
float64 (DESIGN.md, Numerics). A NaN or an infinity on either side never passes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

# Sequence lengths around the usual chunk sizes (16 to 128): 1, multiples and off-by-ones.
SEQ_LENGTHS = (1, 2, 7, 16, 17, 63, 64, 65, 127, 129, 150)

FLOAT_DTYPES = ("float32", "bfloat16")


def to_f64(x) -> np.ndarray:
  """Any array (JAX or NumPy, bfloat16 included) as a float64 NumPy array, without rounding."""
  return np.asarray(x).astype(np.float64)


def _rms(v: np.ndarray) -> float:
  """Root mean square; 0 for an empty array."""
  return float(np.sqrt(np.mean(np.square(v)))) if v.size else 0.0


def rel_rms(ref, x, floor: float = 0.0) -> float:
  """``rms(ref - x) / max(rms(ref), floor)`` in float64; plain ``rms(ref - x)`` when both are 0.

  NaN or inf anywhere gives NaN or inf, which no tolerance accepts.
  """
  ref, x = to_f64(ref), to_f64(x)
  if ref.shape != x.shape:
    raise AssertionError(f"shape mismatch: reference {ref.shape}, got {x.shape}")
  scale = max(_rms(ref), floor)
  return float(_rms(ref - x) / (scale if scale > 0 else 1.0))


def assert_close(ref, x, tol: float, name: str = "value", floor: float = 0.0) -> None:
  """Fails unless ``rel_rms(ref, x, floor) <= tol``; a NaN or inf error always fails."""
  err = rel_rms(ref, x, floor)
  if not (np.isfinite(err) and err <= tol):
    raise AssertionError(f"{name}: relative RMS error {err:.3e} > tolerance {tol:.1e}")


TOL_F32 = 1e-5
# A chunk's gate gradient (a reverse cumulative sum over the chunk) at strong decay (-20 a token):
# against a float64 evaluation each float32 form is off by about 1e-5 (measured 2026-11-30), so
# two forms may differ by twice that.
TOL_F32_GATE = 3e-5
TOL_BF16 = 1e-2


def sub_chunk_gradient_tolerance(gate: bool, decay: float) -> float:
  """The float32 tolerance between the whole-chunk and the sub-chunk intra backward, for a
  gradient (``gate``: the log gate's) at a per-token decay up to ``decay``. At decay 20 each
  form's weights carry the float32 spacing of cumulative gates near -640, and each is off a
  float64 evaluation (its triangular-inverse products still float32) on its own: on RWKV-7 (seed
  2143 of the sub-chunk test) dw 4.4e-5 (whole chunk) and 1.9e-5 (sub-chunks), db 1.7e-5 and
  7.3e-6, so the two may differ by their sum; over 40 seeds the largest differences were dw
  1.9e-5, db 5.7e-6 (RWKV-7) and dg 1.5e-5, dk 5.3e-6 (KDA). A wrong term shows at 1e-3 or
  more."""
  if decay >= 20:
    return 6e-5 if gate else 3e-5
  return TOL_F32_GATE if gate else TOL_F32


def tolerance(x) -> float:
  """The tolerance for comparing ``x``: ``TOL_BF16`` for a bfloat16 array, else ``TOL_F32``."""
  return TOL_BF16 if x.dtype == jnp.bfloat16 else TOL_F32


def vjp_of(forward, arrays: dict, cotangents, differentiable) -> tuple:
  """(forward(arrays), gradients of the ``differentiable`` entries) for ``cotangents``.

  ``forward`` maps the dict of arrays to the op's outputs; the other entries stay fixed.
  """
  inputs = {k: v for k, v in arrays.items() if k in differentiable}
  fixed = {k: v for k, v in arrays.items() if k not in differentiable}
  outputs, vjp = jax.vjp(lambda x: forward({**x, **fixed}), inputs)
  return outputs, vjp(cotangents)[0]


def assert_forms_agree(run, arrays: dict, differentiable, candidate: str,
                       baseline: str = "reference", output: str = "out",
                       float32_tolerance: float = TOL_F32,
                       gradient_scales: dict | None = None) -> None:
  """Two implementations give the same output, final state and gradients.

  ``run(implementation) -> ((output, final_state), gradients)`` for fixed inputs and cotangents;
  bfloat16 results are held to TOL_BF16 and float32 ones (the state among them) to
  ``float32_tolerance``; each gradient must keep its input's dtype.

  ``gradient_scales`` (input name -> the baseline's gradient for an independent cotangent): a
  gradient's error is then measured against the larger of its own RMS and that one's. A drawn
  cotangent can nearly cancel a gradient (one token: dq = s beta k (v . do), and v . do can be
  1e-4 of |v| |do|), and then every float32 form, the baseline too, is 1e-4 off the exact value
  relative to that tiny gradient; the independent draw gives the gradient's usual size.
  """
  tol = lambda x: TOL_BF16 if x.dtype == jnp.bfloat16 else float32_tolerance
  (ref_out, ref_state), ref_grads = run(baseline)
  (out, final_state), grads = run(candidate)
  assert_close(ref_out, out, tol(out), output)
  assert_close(ref_state, final_state, float32_tolerance, "final_state")
  assert grads.keys() == ref_grads.keys() == {k for k in arrays if k in differentiable}
  for name, grad in grads.items():
    assert grad.dtype == arrays[name].dtype, (name, grad.dtype)
    floor = 0.0 if gradient_scales is None else _rms(to_f64(gradient_scales[name]))
    assert_close(ref_grads[name], grad, tol(grad), f"d{name}", floor)


# --- kernels lowered for hardware this host lacks ----------------------------------------------

def assert_lowers_to_triton(fn, *args) -> None:
  """``fn(*args)`` lowers through Pallas' Triton lowering for CUDA on this host (the Triton
  compiler itself runs on the GPU); an unsupported primitive raises here."""
  assert "triton" in jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def sub_chunk_matrices(module, rows, expected, prims) -> dict:
  """A chunk's matrices from a GPU sub-chunk module (``ops.kda._kernel_subchunk``,
  ``ops.rwkv7._kernel_subchunk``) as whole float32 arrays named and shaped like ``expected``'s
  fields (a ``ChunkMatrices``); an entry the module never stores stays NaN. ``rows``: the
  module's ``Rows`` fields as whole-chunk [C, width] arrays; ``prims``: the kernel's
  ``Primitives``."""
  S, chunk = module.SUB, rows[0].shape[0]
  got = {name: np.full(getattr(expected, name).shape, np.nan, np.float32)
         for name in expected._fields}

  def store(name, value, b, a=None):
    block = lambda i: slice(None) if i is None else slice(i * S, (i + 1) * S)
    got[name][block(b), block(a)] = value

  module.intra_forward(lambda b: module.Rows(*(x[b * S:(b + 1) * S] for x in rows)), chunk // S,
                       prims, store)
  return got


def sub_chunk_gradients(module, tokens, masks, cotangents, prims, scale: float) -> dict:
  """The token gradients from a GPU sub-chunk module's ``intra_backward`` as whole [C, width]
  float32 arrays by name; rows never stored stay NaN. ``tokens``: the chunk's token inputs and
  ``masks`` its (segment, carried, last), each [C, width]; ``cotangents``: a ``ChunkMatrices``
  of whole-chunk cotangents."""
  S, chunk = module.SUB, tokens[0].shape[0]
  block = lambda i: slice(None) if i is None else slice(i * S, (i + 1) * S)
  got = {}

  def cotangent(name, b, a=None):
    x = getattr(cotangents, name)
    return x if b is None else x[block(b), block(a)] if a is not None else x[block(b)]

  def store(name, value, b):
    got.setdefault(name, np.full((chunk, value.shape[1]), np.nan, np.float32))[block(b)] = value

  load = lambda b: module.load_rows([x[block(b)] for x in tokens], *(m[block(b)] for m in masks),
                                    scale)
  module.intra_backward(load, cotangent, chunk // S, prims, store, scale)
  return got


def export_for_tpu(fn, *args):
  """``fn(*args)`` exported for a TPU from this host (``jax.export``: the Pallas -> Mosaic
  lowering accepts every primitive and block; libtpu's layout passes run only on a TPU), its
  kernels Mosaic calls. Returns the ``Exported``."""
  exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
  assert exported.platforms == ("tpu",)
  assert "tpu_custom_call" in exported.mlir_module()
  return exported


# --- hypothesis strategies --------------------------------------------------------------------

def seq_lengths() -> st.SearchStrategy[int]:
  """Sequence lengths from ``SEQ_LENGTHS`` (a bounded set keeps the number of compilations low)."""
  return st.sampled_from(SEQ_LENGTHS)


def float_dtypes() -> st.SearchStrategy[str]:
  """The name of float32 or bfloat16 (names keep hypothesis' reports readable)."""
  return st.sampled_from(FLOAT_DTYPES)


def seeds() -> st.SearchStrategy[int]:
  """Seeds for ``np.random.default_rng``: fresh random inputs for every example."""
  return st.integers(0, 2**32 - 1)


@st.composite
def divisors(draw, n: int) -> int:
  """A divisor of ``n``."""
  return draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))


# --- random inputs ----------------------------------------------------------------------------

def normal(rng: np.random.Generator, shape, dtype=jnp.float32, scale: float = 1.0,
           loc: float = 0.0) -> jnp.ndarray:
  """Normal samples of mean ``loc`` and deviation ``scale``, as a JAX array of ``dtype``."""
  return jnp.asarray(rng.normal(loc, scale, shape), dtype)


def uniform(rng: np.random.Generator, shape, low: float, high: float,
            dtype=jnp.float32) -> jnp.ndarray:
  """Uniform samples in ``[low, high)`` as a JAX array of ``dtype``."""
  return jnp.asarray(rng.uniform(low, high, shape), dtype)


def random_segment_ids(rng: np.random.Generator, batch: int, time: int,
                       max_segments: int = 4) -> jnp.ndarray:
  """int32 ``[batch, time]`` packed-sequence ids: non-decreasing, 1 to ``max_segments`` runs."""
  ids = np.zeros((batch, time), np.int32)
  for row in ids:
    num_cuts = rng.integers(0, min(max_segments, time))
    for cut in rng.choice(np.arange(1, time), size=num_cuts, replace=False):
      row[cut:] += 1
  return jnp.asarray(ids)


def segment_bounds(segment_ids) -> list[list[tuple[int, int]]]:
  """Per batch row, the ``(start, stop)`` of each run of equal ids."""
  ids = np.asarray(segment_ids)
  bounds = []
  for row in ids:
    starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]]
    bounds.append(list(zip(starts, starts[1:] + [len(row)])))
  return bounds
