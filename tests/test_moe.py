"""Tests of ``models.moe`` against SPEC 5 (the Kimi-Linear / DeepSeek-V3 mixture of experts).

* "dropless" (sorted assignments, ragged matmuls) equals "dense" (every expert on every token)
  in output and in the gradients of every parameter and of x, over drawn expert counts, top-k,
  shared experts, renormalisation and batch/time sizes (time 1 included);
* both equal a float64 NumPy transcription of the router and the experts, token by token;
* the correction bias decides the choice but never the weights, and its gradient is exactly 0;
* the sown load statistics, ``load_balance_stats`` and ``update_router_bias``;
* bfloat16 compute stays within 1e-2 of float32; each expert's initialisation uses its own
  fan-in; malformed configs and inputs raise a ``ValueError`` naming the field.

Tolerances (relative RMS error, tests/_numerics.py): 1e-5 for float32 (both dispatches route
identically and differ only in summation order), 1e-2 for bfloat16.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.moe import MoE, load_balance_stats, update_router_bias
from tests import _numerics as num
from train.config import ModelConfig

pytestmark = pytest.mark.compile_bound  # conftest: XLA's optimisation passes off


CONFIG = ModelConfig(d_model=16, mlp="moe", moe_num_experts=6, moe_top_k=2,
                     moe_num_shared_experts=1, moe_d_ff=8, moe_routed_scaling_factor=2.446,
                     moe_renormalize=True, moe_dispatch="dropless")


def _init(config, x, seed: int = 0, bias_scale: float = 0.0):
  """Fresh random parameters of ``MoE(config)`` for x, drawn in NumPy (no compilation per shape):
  matrices N(0, 1 / fan_in), the correction bias N(0, bias_scale)."""
  shapes = nn.meta.unbox(jax.eval_shape(MoE(config).init, jax.random.key(0), x))["params"]
  rng = np.random.default_rng(seed)
  scale = lambda shape: shape[-2]**-0.5 if len(shape) > 1 else bias_scale
  return jax.tree.map(lambda s: num.normal(rng, s.shape, scale=scale(s.shape)), shapes)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(config, params, x, dispatch: str):
  return MoE(dataclasses.replace(config, moe_dispatch=dispatch)).apply({"params": params}, x)


# --- the float64 oracle -----------------------------------------------------------------------

def _swiglu(x, gate, up, down):
  g = x @ gate
  return (g / (1 + np.exp(-g)) * (x @ up)) @ down


def oracle(config, params, x) -> np.ndarray:
  """SPEC 5's MoE token by token in float64: [batch, time, d_model] -> same."""
  p = jax.tree.map(num.to_f64, params)
  tokens = num.to_f64(x).reshape(-1, config.d_model)
  out = np.zeros_like(tokens)
  for n, t in enumerate(tokens):
    scores = 1 / (1 + np.exp(-(t @ p["router"])))
    chosen = np.argsort(-(scores + p["e_score_correction_bias"]))[:config.moe_top_k]
    weights = scores[chosen]
    if config.moe_renormalize:
      weights = weights / weights.sum()
    for e, w in zip(chosen, weights * config.moe_routed_scaling_factor):
      out[n] += w * _swiglu(t, p["gate"][e], p["up"][e], p["down"][e])
  if config.moe_num_shared_experts:
    shared = p["shared_experts"]
    out += _swiglu(tokens, *(shared[name]["kernel"] for name in ("gate", "up", "down")))
  return out.reshape(x.shape)


# --- dispatches against each other and against the oracle -------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _outputs_and_gradients(config, params, x, cotangent):
  """Per dispatch, MoE's output and the gradients (params, x) of <output, cotangent>."""
  results = {}
  for dispatch in ("dense", "dropless"):
    out, vjp = jax.vjp(lambda p, x: _apply(config, p, x, dispatch), params, x)
    results[dispatch] = out, vjp(cotangent)
  return results


@given(num_experts=st.integers(1, 6), top_k_fraction=st.floats(0, 1),
       shared=st.sampled_from([0, 1]), renormalize=st.booleans(), batch=st.integers(1, 3),
       time=st.sampled_from([1, 2, 7, 17]), seed=num.seeds())
def test_dropless_equals_dense(num_experts, top_k_fraction, shared, renormalize, batch, time,
                               seed):
  """Same output and same gradients (all parameters and x) from fresh random parameters."""
  config = dataclasses.replace(
      CONFIG, moe_num_experts=num_experts, moe_top_k=1 + round(top_k_fraction * (num_experts - 1)),
      moe_num_shared_experts=shared, moe_renormalize=renormalize)
  rng = np.random.default_rng(seed)
  x = num.normal(rng, (batch, time, config.d_model))
  params = _init(config, x, seed + 1, bias_scale=0.1)
  cotangent = num.normal(rng, x.shape)
  results = _outputs_and_gradients(config, params, x, cotangent)
  (ref, ref_grads), (out, grads) = results["dense"], results["dropless"]
  num.assert_close(ref, out, num.TOL_F32, "output")
  if config.moe_top_k == 1 and renormalize:
    # The one weight is the scaling factor: the router's gradient is 0 up to rounding noise.
    for g_params, g_x in (ref_grads, grads):
      assert float(jnp.max(jnp.abs(g_params.pop("router")))) < 1e-5 * float(jnp.max(jnp.abs(g_x)))
  jax.tree.map(lambda a, b: num.assert_close(a, b, num.TOL_F32, "gradient"), ref_grads, grads)


@pytest.mark.parametrize("dispatch", ["dropless", "dense"])
@pytest.mark.parametrize("shared, renormalize", [(1, True), (0, False)])
def test_matches_numpy_oracle(dispatch, shared, renormalize):
  config = dataclasses.replace(CONFIG, moe_num_shared_experts=shared,
                               moe_renormalize=renormalize)
  x = num.normal(np.random.default_rng(1), (2, 3, config.d_model))
  params = _init(config, x, seed=2, bias_scale=0.2)
  num.assert_close(oracle(config, params, x), _apply(config, params, x, dispatch), num.TOL_F32)


# --- the correction bias ----------------------------------------------------------------------

@pytest.mark.parametrize("dispatch", ["dropless", "dense"])
def test_bias_chooses_but_does_not_weigh(dispatch):
  """A large bias on one expert makes every token choose it, weighted by its unbiased score."""
  config = dataclasses.replace(CONFIG, moe_top_k=1, moe_num_shared_experts=0,
                               moe_renormalize=False, moe_routed_scaling_factor=1.0)
  x = num.normal(np.random.default_rng(3), (2, 5, config.d_model))
  params = _init(config, x, seed=4)
  params["e_score_correction_bias"] = params["e_score_correction_bias"].at[3].set(10.0)
  y, state = MoE(dataclasses.replace(config, moe_dispatch=dispatch)).apply(
      {"params": params}, x, mutable=["intermediates"])
  np.testing.assert_array_equal(state["intermediates"]["expert_load"][0], np.eye(6)[3])
  p = jax.tree.map(num.to_f64, params)
  tokens = num.to_f64(x)
  score = 1 / (1 + np.exp(-(tokens @ p["router"][:, 3])))
  expected = score[..., None] * _swiglu(tokens, p["gate"][3], p["up"][3], p["down"][3])
  num.assert_close(expected, y, num.TOL_F32)


@pytest.mark.parametrize("dispatch", ["dropless", "dense"])
def test_bias_gradient_is_exactly_zero(dispatch):
  x = num.normal(np.random.default_rng(5), (2, 7, CONFIG.d_model))
  params = _init(CONFIG, x, seed=6, bias_scale=0.3)
  grads = jax.grad(lambda p: jnp.sum(_apply(CONFIG, p, x, dispatch) ** 2))(params)
  assert np.all(np.asarray(grads["e_score_correction_bias"]) == 0)
  assert np.any(np.asarray(grads["router"]) != 0)


# --- load statistics and the bias update ------------------------------------------------------

def test_sown_statistics():
  """The load is each expert's share of the N k choices; the router probability is the mean
  of the per-token normalised scores; both computed here in NumPy."""
  config = dataclasses.replace(CONFIG, moe_top_k=3)
  x = num.normal(np.random.default_rng(7), (3, 11, config.d_model))
  params = _init(config, x, seed=8, bias_scale=0.2)
  _, state = MoE(config).apply({"params": params}, x, mutable=["intermediates"])
  (load,), (prob,) = state["intermediates"].values()
  assert load.shape == prob.shape == (6,) and load.dtype == prob.dtype == jnp.float32
  scores = 1 / (1 + np.exp(-(num.to_f64(x).reshape(-1, 16) @ num.to_f64(params["router"]))))
  chosen = np.argsort(-(scores + num.to_f64(params["e_score_correction_bias"])), -1)[:, :3]
  np.testing.assert_allclose(load, np.bincount(chosen.ravel(), minlength=6) / 99, rtol=1e-6)
  np.testing.assert_allclose(np.sum(load), 1.0, rtol=1e-6)
  np.testing.assert_allclose(prob, np.mean(scores / scores.sum(-1, keepdims=True), 0), rtol=1e-5)


def test_load_balance_stats():
  load0, prob0 = jnp.array([0.5, 0.25, 0.25, 0.0]), jnp.array([0.4, 0.3, 0.2, 0.1])
  load1 = prob1 = jnp.full((4,), 0.25)
  tree = {"layer_0": {"mlp": {"expert_load": (load0,), "router_probability": (prob0,)}},
          "layer_1": {"mixer": {"other": (jnp.ones(3),)},
                      "mlp": {"expert_load": (load1,), "router_probability": (prob1,)}}}
  stats = load_balance_stats({"intermediates": tree})
  np.testing.assert_allclose(stats["moe_max_load"], (4 * 0.5 + 1.0) / 2, rtol=1e-6)
  np.testing.assert_allclose(stats["moe_balance_loss"],
                             (4 * (0.2 + 0.075 + 0.05) + 1.0) / 2, rtol=1e-6)
  assert load_balance_stats({"layer_0": {"mixer": {"other": (jnp.ones(3),)}}}) == {}


def test_update_router_bias():
  """Under-loaded experts gain ``rate``, over-loaded ones lose it; nothing else changes."""
  bias0, bias1 = jnp.array([0.0, 1.0, 2.0, 3.0]), jnp.zeros(4)
  params = {"layer_0": {"mlp": {"e_score_correction_bias": bias0, "router": jnp.ones((2, 4))}},
            "layer_1": {"mlp": {"e_score_correction_bias": bias1}, "norm": {"scale": jnp.ones(2)}}}
  stats = lambda load: {"expert_load": (jnp.array(load),), "router_probability": (jnp.ones(4),)}
  intermediates = {"layer_0": {"mlp": stats([0.5, 0.25, 0.25, 0.0])},
                   "layer_1": {"mlp": stats([0.1, 0.4, 0.25, 0.25])}}
  new = update_router_bias(params, intermediates, rate=0.01)
  assert jax.tree.structure(new) == jax.tree.structure(params)
  np.testing.assert_allclose(new["layer_0"]["mlp"]["e_score_correction_bias"],
                             bias0 + jnp.array([-0.01, 0.0, 0.0, 0.01]))
  np.testing.assert_allclose(new["layer_1"]["mlp"]["e_score_correction_bias"],
                             jnp.array([0.01, -0.01, 0.0, 0.0]))
  assert new["layer_0"]["mlp"]["router"] is params["layer_0"]["mlp"]["router"]
  assert new["layer_1"]["norm"]["scale"] is params["layer_1"]["norm"]["scale"]
  unchanged = update_router_bias(params, intermediates, rate=0.0)
  jax.tree.map(np.testing.assert_array_equal, unchanged, params)
  with pytest.raises(ValueError, match="layer_2/mlp"):
    update_router_bias(params, {**intermediates, "layer_2": {"mlp": stats([1, 0, 0, 0])}}, 0.01)


def test_update_router_bias_on_a_model():
  """Variables and sown state straight from ``apply``: the bias moves against the load."""
  x = num.normal(np.random.default_rng(9), (2, 9, CONFIG.d_model))
  variables = {"params": _init(CONFIG, x, seed=10)}
  _, state = MoE(CONFIG).apply(variables, x, mutable=["intermediates"])
  new = update_router_bias(variables, state, rate=0.5)
  load = state["intermediates"]["expert_load"][0]
  np.testing.assert_array_equal(new["params"]["e_score_correction_bias"],
                                0.5 * np.sign(1 / 6 - load))


# --- precision, initialisation, errors --------------------------------------------------------

@pytest.mark.parametrize("dispatch", ["dropless", "dense"])
def test_bfloat16_close_to_float32(dispatch):
  x = num.normal(np.random.default_rng(11), (2, 13, CONFIG.d_model))
  params = _init(CONFIG, x, seed=12, bias_scale=0.1)
  ref = _apply(CONFIG, params, x, dispatch)
  y = _apply(dataclasses.replace(CONFIG, dtype="bfloat16"), params, x, dispatch)
  assert ref.dtype == jnp.float32 and y.dtype == jnp.bfloat16
  num.assert_close(ref, y, num.TOL_BF16)
  assert _apply(CONFIG, params, x.astype(jnp.bfloat16), dispatch).dtype == jnp.float32


def test_expert_initialisation():
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with each expert's own fan-in; down scaled by
  1/sqrt(num_layers); the stacked weights carry the "expert" logical axis."""
  config = dataclasses.replace(CONFIG, moe_num_experts=8, moe_d_ff=64, d_model=32)
  x = jnp.zeros((1, 1, config.d_model))
  boxed = jax.jit(MoE(config, num_layers=4).init)(jax.random.key(13), x)["params"]
  params = nn.meta.unbox(boxed)
  for name, bound in (("gate", 32**-0.5), ("up", 32**-0.5), ("down", 64**-0.5 / 2)):
    limit = float(jnp.max(jnp.abs(params[name])))
    assert 0.95 * bound < limit <= bound, (name, limit, bound)
  assert MoE.EXPERT_WEIGHTS == ("gate", "up", "down")
  assert boxed["gate"].names == ("expert", "embed", "mlp")
  assert boxed["down"].names == ("expert", "mlp", "embed")
  assert boxed["router"].names == ("embed", None)
  assert params["shared_experts"]["up"]["kernel"].shape == (32, 64)


@pytest.mark.parametrize("change, x_shape, match", [
    ({"moe_top_k": 0}, (1, 2, 16), "moe_top_k"),
    ({"moe_top_k": 7}, (1, 2, 16), "moe_top_k"),
    ({"moe_dispatch": "capacity"}, (1, 2, 16), "moe_dispatch"),
    ({}, (2, 16), "x must have shape"),
    ({}, (1, 2, 8), "x must have shape"),
])
def test_errors(change, x_shape, match):
  with pytest.raises(ValueError, match=match):
    MoE(dataclasses.replace(CONFIG, **change)).init(jax.random.key(0), jnp.zeros(x_shape))
