"""Sampling filters and decoding: greedy decoding with the state equals re-running the prefix."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from models.lm import LanguageModel
from train.config import ModelConfig, SampleConfig
from train.generate import generate, sample_token

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


MODEL = LanguageModel(ModelConfig(vocab_size=256, d_model=16, num_layers=2, d_state=4))
FORWARD = jax.jit(MODEL.apply)


@given(seed=st.integers(0, 1000))
def test_greedy_generation_equals_rerunning_the_whole_prefix(seed):
  params = MODEL.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  prompt = b"def f"
  sample = SampleConfig(prompt="", max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0)
  produced = list(generate(MODEL, params, prompt, sample))
  tokens = list(prompt)
  for _ in range(6):
    logits, _ = FORWARD({"params": params}, jnp.asarray([tokens]))
    tokens.append(int(jnp.argmax(logits[0, -1])))
  assert produced == tokens[len(prompt):]


def test_empty_prompt_is_rejected():
  model = LanguageModel(ModelConfig(d_model=16, num_layers=1, d_state=4))
  with pytest.raises(ValueError, match="prompt"):
    next(generate(model, {}, b"", dataclasses.replace(SampleConfig(), max_new_tokens=1)))
