"""Mixers and the language model: decoding token by token equals the full forward."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from models.lm import LanguageModel, MIXERS, decode_state_bytes, init_decode_state, layer_letters
from tests._numerics import assert_close
from train.config import ModelConfig

TINY = ModelConfig(vocab_size=64, d_model=16, num_layers=2, d_state=4, expand=2)


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


class LanguageModelTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.model = LanguageModel(TINY)
    self.tokens = _tokens(jax.random.key(0), 2, 19, TINY.vocab_size)
    self.params = self.model.init(jax.random.key(1), self.tokens)

  @chex.variants(with_jit=True, without_jit=True)
  def test_prefill_then_decode_equals_forward(self):
    apply = self.variant(self.model.apply)
    logits, final_state = apply(self.params, self.tokens)
    chex.assert_shape(logits, (2, 19, TINY.vocab_size))
    chex.assert_type(logits, jnp.float32)
    prefix, state = apply(self.params, self.tokens[:, :7])
    pieces = [prefix]
    for t in range(7, 19):
      step_logits, state = apply(self.params, self.tokens[:, t:t + 1], state=state)
      pieces.append(step_logits)
    assert_close(logits, jnp.concatenate(pieces, axis=1), 1e-5, "logits")
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-5, "state"), final_state, state)

  def test_decode_state_structure_and_bytes(self):
    _, state = self.model.apply(self.params, self.tokens)
    zeros = init_decode_state(TINY, 2)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, zeros)
    actual = sum(x.nbytes for x in jax.tree.leaves(state))
    assert decode_state_bytes(TINY, 2) == actual
    inner = TINY.expand * TINY.d_model
    per_layer = 2 * (inner * (TINY.d_conv - 1) * 4 + inner * TINY.d_state * 4)
    assert actual == TINY.num_layers * per_layer

  def test_segments_do_not_see_each_other(self):
    """A packed row with two segments gives each segment the logits it has alone."""
    segment_ids = jnp.asarray(np.repeat([[0] * 8 + [1] * 11], 2, axis=0))
    packed, _ = self.model.apply(self.params, self.tokens, segment_ids=segment_ids)
    alone, _ = self.model.apply(self.params, self.tokens[:, 8:])
    assert_close(alone, packed[:, 8:], 1e-5, "second segment")

  def test_bfloat16_compute_stays_close(self):
    bf16 = LanguageModel(TINY.__class__(**{**TINY.__dict__, "dtype": "bfloat16"}))
    reference, _ = self.model.apply(self.params, self.tokens)
    mixed, _ = bf16.apply(self.params, self.tokens)
    chex.assert_type(mixed, jnp.float32)
    assert_close(reference, mixed, 2e-2, "bf16 logits")


def test_layer_pattern_is_tiled_and_checked():
  assert layer_letters(ModelConfig(layer_pattern="S", num_layers=3)) == "SSS"
  with pytest.raises(ValueError, match="layer_pattern"):
    layer_letters(ModelConfig(layer_pattern="SX", num_layers=2))
  with pytest.raises(ValueError, match="tokens"):
    LanguageModel(TINY).init(jax.random.key(0), jnp.zeros((4,), jnp.int32))
