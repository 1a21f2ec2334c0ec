"""Sampling filters and decoding: greedy decoding with the state equals re-running the prefix."""

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from models.lm import LanguageModel, decode_state_bytes
from train.config import ModelConfig, SampleConfig
from train.generate import generate, print_sample, sample_token

pytestmark = pytest.mark.compile_bound  # conftest: XLA's optimisation passes off

LOGITS = jnp.log(jnp.asarray([[0.05, 0.5, 0.3, 0.1, 0.05]]))


def _draws(n=400, **filters):
  keys = jax.random.split(jax.random.key(0), n)
  return np.asarray(jax.vmap(lambda k: sample_token(LOGITS, k, **filters)[0])(keys))


def test_temperature_zero_is_greedy():
  assert set(_draws(50, temperature=0.0, top_k=0, top_p=1.0)) == {1}


def test_top_k_keeps_the_k_most_likely():
  assert set(_draws(temperature=1.0, top_k=2, top_p=1.0)) == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p():
  # 0.5 + 0.3 = 0.8 >= 0.75: tokens 1 and 2 only.
  assert set(_draws(temperature=1.0, top_k=0, top_p=0.75)) == {1, 2}
  assert set(_draws(temperature=1.0, top_k=0, top_p=1.0)) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("filters", [dict(temperature=-1.0, top_k=0, top_p=1.0),
                                     dict(temperature=1.0, top_k=-1, top_p=1.0),
                                     dict(temperature=1.0, top_k=0, top_p=0.0)])
def test_bad_filters_raise(filters):
  with pytest.raises(ValueError, match="temperature"):
    sample_token(LOGITS, jax.random.key(0), **filters)


MAMBA = LanguageModel(ModelConfig(vocab_size=256, d_model=16, num_layers=2, d_state=4))
# KDA, NoPE MLA with its latent cache, MoE after a dense first layer.
HYBRID = LanguageModel(ModelConfig(
    vocab_size=256, d_model=16, num_layers=3, layer_pattern="KKM", kda_num_heads=2,
    kda_head_dim=8, kda_chunk_size=16, mla_num_heads=2, mla_kv_lora_rank=8,
    mla_qk_nope_head_dim=8, mla_qk_rope_head_dim=4, mla_v_head_dim=8, max_cache_length=16,
    mlp="moe", first_k_dense=1, d_ff=32, moe_num_experts=4, moe_top_k=2, moe_d_ff=8))


# Jitted once a model, so that every test and drawn seed reuses the programs (the hybrid's init
# op by op took about 8 s a test).
INIT = {model: jax.jit(model.init) for model in (MAMBA, HYBRID)}
FORWARD = {model: jax.jit(model.apply) for model in (MAMBA, HYBRID)}


@pytest.mark.parametrize("model", [MAMBA, HYBRID], ids=["mamba", "kimi_linear"])
@given(seed=st.integers(0, 1000))
def test_greedy_generation_equals_the_forward_over_the_whole_text(model, seed):
  """Each greedily decoded token is the argmax of the full (causal) forward over the prompt and
  the tokens before it."""
  params = INIT[model](jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  prompt = b"def f"
  sample = SampleConfig(prompt="", max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0)
  produced = list(generate(model, params, prompt, sample))
  logits, _ = FORWARD[model]({"params": params}, jnp.asarray([list(prompt) + produced]))
  expected = jnp.argmax(logits[0, len(prompt) - 1:-1], axis=-1)
  assert produced == [int(t) for t in expected]


def test_sample_reports_the_cache_in_use_and_checks_its_length():
  """The hybrid's report gives the KDA states plus 12 latent values per token in use; a
  generation longer than the cache stops before it starts."""
  params = INIT[HYBRID](jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  sample = SampleConfig(prompt="ab", max_new_tokens=5, temperature=0.0)
  out = io.StringIO()
  print_sample(HYBRID, params, sample, out)
  in_use = decode_state_bytes(HYBRID.config, 1, 7)
  assert in_use == decode_state_bytes(HYBRID.config, 1) - (16 - 7) * 12 * 4
  assert f"{in_use:,} bytes in use after 7 tokens" in out.getvalue()
  with pytest.raises(ValueError, match="max_cache_length"):
    next(generate(HYBRID, params, b"ab", dataclasses.replace(sample, max_new_tokens=15)))


def test_empty_prompt_is_rejected():
  model = LanguageModel(ModelConfig(d_model=16, num_layers=1, d_state=4))
  with pytest.raises(ValueError, match="prompt"):
    next(generate(model, {}, b"", dataclasses.replace(SampleConfig(), max_new_tokens=1)))
