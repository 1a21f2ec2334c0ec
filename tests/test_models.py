"""Mixers and the language model: decoding token by token equals the full forward."""

import dataclasses
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from models.lm import LanguageModel, MIXERS, decode_state_bytes, init_decode_state, layer_letters
from models.mlp import d_ff
from tests._numerics import assert_close
from train.config import ModelConfig

# Small enough to be fast; KDA with grouped value heads (HV = 2 H), V != K and a chunk shorter
# than the sequences, so the chunkwise form crosses chunk boundaries.
TINY = ModelConfig(vocab_size=64, d_model=16, num_layers=2, d_state=4, expand=2, kda_num_heads=2,
                   kda_head_dim=4, kda_num_v_heads=4, kda_v_head_dim=6, kda_chunk_size=16,
                   d_ff=24)
LM_CONFIGS = {
    "mamba": TINY,
    "kda": dataclasses.replace(TINY, layer_pattern="K"),
    "mamba_kda_swiglu": dataclasses.replace(TINY, layer_pattern="SK", mlp="swiglu"),
}


def _tokens(key, batch, time, vocab):
  return jax.random.randint(key, (batch, time), 0, vocab)


@pytest.mark.parametrize("letter", sorted(MIXERS))
@given(split=st.integers(0, 11), seed=st.integers(0, 2**16))
def test_mixer_step_by_step_equals_sequence(letter, split, seed):
  """Run a prefix as a sequence, the rest one token at a time: same outputs and state."""
  mixer = MIXERS[letter](TINY)
  x = jax.random.normal(jax.random.key(seed), (2, 12, TINY.d_model))
  params = mixer.init(jax.random.key(seed + 1), x)
  full, final = mixer.apply(params, x)
  if split:
    y, state = mixer.apply(params, x[:, :split])
    pieces = [y]
  else:
    state, pieces = MIXERS[letter].initial_state(TINY, 2), []
  for t in range(split, 12):
    y, state = mixer.apply(params, x[:, t:t + 1], state)
    pieces.append(y)
  assert_close(full, jnp.concatenate(pieces, axis=1), 1e-5, "output")
  jax.tree.map(lambda a, b: assert_close(a, b, 1e-5, "state"), final, state)


@pytest.mark.parametrize("letter", sorted(MIXERS))
def test_mixer_segments_do_not_see_each_other(letter):
  """A packed row of three segments: each segment's output is what it gets alone, and the
  final state is the last segment's."""
  bounds = [(0, 5), (5, 11), (11, 30)]
  mixer = MIXERS[letter](TINY)
  x = jax.random.normal(jax.random.key(0), (2, 30, TINY.d_model))
  params = mixer.init(jax.random.key(1), x)
  segment_ids = jnp.asarray(np.repeat([[i for i, (a, b) in enumerate(bounds)
                                        for _ in range(a, b)]], 2, axis=0))
  packed, final = mixer.apply(params, x, segment_ids=segment_ids)
  for start, stop in bounds:
    alone, alone_final = mixer.apply(params, x[:, start:stop])
    assert_close(alone, packed[:, start:stop], 1e-5, f"segment [{start}, {stop})")
  jax.tree.map(lambda a, b: assert_close(a, b, 1e-5, "final state"), alone_final, final)


class TinyLM(NamedTuple):
  config: ModelConfig
  model: LanguageModel
  tokens: jax.Array
  params: Any


@pytest.fixture(scope="module", params=sorted(LM_CONFIGS))
def lm(request) -> TinyLM:
  """A tiny language model of each configuration in ``LM_CONFIGS``, its parameters and tokens."""
  config = LM_CONFIGS[request.param]
  model = LanguageModel(config)
  tokens = _tokens(jax.random.key(0), 2, 19, config.vocab_size)
  return TinyLM(config, model, tokens, model.init(jax.random.key(1), tokens))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_prefill_then_decode_equals_forward(lm, jit):
  apply = jax.jit(lm.model.apply) if jit else lm.model.apply
  logits, final_state = apply(lm.params, lm.tokens)
  chex.assert_shape(logits, (2, 19, lm.config.vocab_size))
  chex.assert_type(logits, jnp.float32)
  prefix, state = apply(lm.params, lm.tokens[:, :7])
  pieces = [prefix]
  for t in range(7, 19):
    step_logits, state = apply(lm.params, lm.tokens[:, t:t + 1], state=state)
    pieces.append(step_logits)
  assert_close(logits, jnp.concatenate(pieces, axis=1), 1e-5, "logits")
  jax.tree.map(lambda a, b: assert_close(a, b, 1e-5, "state"), final_state, state)


def test_decode_state_structure_and_bytes(lm):
  _, state = lm.model.apply(lm.params, lm.tokens)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, init_decode_state(lm.config, 2))
  assert decode_state_bytes(lm.config, 2) == sum(x.nbytes for x in jax.tree.leaves(state))


def test_segments_do_not_see_each_other(lm):
  """A packed row with two segments gives each segment the logits it has alone."""
  segment_ids = jnp.asarray(np.repeat([[0] * 8 + [1] * 11], 2, axis=0))
  packed, _ = lm.model.apply(lm.params, lm.tokens, segment_ids=segment_ids)
  alone, _ = lm.model.apply(lm.params, lm.tokens[:, 8:])
  assert_close(alone, packed[:, 8:], 1e-5, "second segment")


def test_bfloat16_compute_stays_close(lm):
  bf16 = LanguageModel(dataclasses.replace(lm.config, dtype="bfloat16"))
  reference, _ = lm.model.apply(lm.params, lm.tokens)
  mixed, _ = bf16.apply(lm.params, lm.tokens)
  chex.assert_type(mixed, jnp.float32)
  # bf16 rounds the projections (KDA: q, k, v and both gates) to 8 bits; over two layers and
  # the head the logits move by up to about 2.5e-2 (Mamba alone: under 1e-2).
  assert_close(reference, mixed, 4e-2, "bf16 logits")


def test_mamba_decode_state_layout():
  """Per Mamba layer: the conv window [B, d_conv - 1, d_inner] and the state [B, d_inner, N]."""
  inner = TINY.expand * TINY.d_model
  per_layer = 2 * (inner * (TINY.d_conv - 1) * 4 + inner * TINY.d_state * 4)
  assert decode_state_bytes(TINY, 2) == TINY.num_layers * per_layer


def test_kda_decode_state_layout():
  """Per KDA layer: q, k, v conv windows in the compute dtype and a [B, HV, K, V] float32 state."""
  config = dataclasses.replace(LM_CONFIGS["kda"], dtype="bfloat16")
  state = init_decode_state(config, 3)[0]
  window = lambda width: jax.ShapeDtypeStruct((3, TINY.d_conv - 1, width), jnp.bfloat16)
  expected = {"conv": {"q": window(2 * 4), "k": window(2 * 4), "v": window(4 * 6)},
              "recurrent": jax.ShapeDtypeStruct((3, 4, 4, 6), jnp.float32)}
  chex.assert_trees_all_equal_shapes_and_dtypes(state, expected)


def test_layer_pattern_is_tiled_and_checked():
  assert layer_letters(ModelConfig(layer_pattern="S", num_layers=3)) == "SSS"
  with pytest.raises(ValueError, match="layer_pattern"):
    layer_letters(ModelConfig(layer_pattern="SX", num_layers=2))
  with pytest.raises(ValueError, match="tokens"):
    LanguageModel(TINY).init(jax.random.key(0), jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="mlp must be one of"):
    LanguageModel(dataclasses.replace(TINY, mlp="gelu")).init(jax.random.key(0),
                                                             jnp.zeros((1, 4), jnp.int32))


def test_swiglu_adds_its_parameters_and_mamba_blocks_have_none():
  """mlp="none" leaves a Mamba block as it was; "swiglu" adds gate, up, down and a norm."""
  count = lambda config: sum(x.size for x in jax.tree.leaves(jax.eval_shape(
      lambda: LanguageModel(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))))
  swiglu = dataclasses.replace(TINY, mlp="swiglu")
  assert count(swiglu) - count(TINY) == TINY.num_layers * (3 * 16 * 24 + 16)
  assert d_ff(dataclasses.replace(TINY, d_ff=None)) == 256  # 8/3 * 16, rounded up to 256.
  assert d_ff(ModelConfig(d_model=2048)) == 5632
