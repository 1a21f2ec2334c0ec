"""Mixers and the language model: decoding token by token equals the full forward."""

import dataclasses
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models.lm import (CACHED_MIXERS, LanguageModel, MIXERS, decode_state_bytes, init_decode_state,
                       layer_letters, layer_mlps, parameter_counts)
from models.mlp import d_ff
from ops import kda as kda_ops
from ops.kda import reference as kda_reference
from tests._numerics import assert_close
from train.config import ModelConfig

pytestmark = pytest.mark.compile_bound  # conftest: XLA's optimisation passes off

# Small enough to be fast; KDA with grouped value heads (HV = 2 H), V != K and a chunk shorter
# than the sequences, so the chunkwise form crosses chunk boundaries; grouped-query attention
# (4 query heads, 2 KV heads) with RoPE; MLA with query compression, rotated keys and
# Dv != Dn, and a YaRN-extended RoPE on both.
TINY = ModelConfig(vocab_size=64, d_model=16, num_layers=2, d_state=4, expand=2, kda_num_heads=2,
                   kda_head_dim=4, kda_num_v_heads=4, kda_v_head_dim=6, kda_chunk_size=16,
                   d_ff=24, max_cache_length=40, attn_num_heads=4, attn_num_kv_heads=2,
                   attn_head_dim=8, rope_yarn_factor=4.0, rope_original_max_length=8,
                   mla_num_heads=2, mla_q_lora_rank=12, mla_kv_lora_rank=10,
                   mla_qk_nope_head_dim=6, mla_qk_rope_head_dim=4, mla_v_head_dim=5,
                   mla_use_rope=True, moe_num_experts=4, moe_top_k=2, moe_d_ff=8,
                   rwkv_head_size=8, rwkv_ffn_dim=24, rwkv_mix_lora=4, rwkv_decay_lora=4,
                   rwkv_a_lora=4, rwkv_value_lora=4, rwkv_gate_lora=4, rwkv_chunk_size=16)
# The Kimi-Linear hybrid in small: KDA, KDA, NoPE MLA; dense first layer, MoE after.
HYBRID = dataclasses.replace(TINY, num_layers=3, layer_pattern="KKM", mla_use_rope=False,
                             mlp="moe", first_k_dense=1)
LM_CONFIGS = {
    "mamba": TINY,
    "kda": dataclasses.replace(TINY, layer_pattern="K"),
    "gqa_swiglu": dataclasses.replace(TINY, layer_pattern="A", mlp="swiglu"),
    "mla_rope": dataclasses.replace(TINY, layer_pattern="M"),
    "hybrid": HYBRID,
    "rwkv6": dataclasses.replace(TINY, layer_pattern="F", mlp="rwkv6_channel_mix", norm="layer",
                                 embedding_norm=True, tie_embeddings=False),
    # Two layers: the second mixes in the first's values (RWKV-7's value residual).
    "rwkv7": dataclasses.replace(TINY, layer_pattern="R", mlp="rwkv7_channel_mix", norm="layer",
                                 embedding_norm=True, tie_embeddings=False),
}


def _apply_mixer(mixer, params, x, state=None, segment_ids=None):
  """(y, state) of any mixer; RWKV-7's also returns its values for later layers (dropped)."""
  return mixer.apply(params, x, state, segment_ids)[:2]


def _tokens(key, batch, time, vocab):
  return jax.random.randint(key, (batch, time), 0, vocab)


@pytest.mark.parametrize("letter", sorted(MIXERS))
@settings(max_examples=1)  # Eager decoding is slow; the LM tests decode every mixer again.
@given(split=st.integers(0, 11), seed=st.integers(0, 2**16))
def test_mixer_step_by_step_equals_sequence(letter, split, seed):
  """Run a prefix as a sequence, the rest one token at a time: same outputs and state."""
  mixer = MIXERS[letter](TINY)
  x = jax.random.normal(jax.random.key(seed), (2, 12, TINY.d_model))
  params = mixer.init(jax.random.key(seed + 1), x)
  full, final = _apply_mixer(mixer, params, x)
  if split:
    y, state = _apply_mixer(mixer, params, x[:, :split])
    pieces = [y]
  else:
    state, pieces = MIXERS[letter].initial_state(TINY, 2), []
  for t in range(split, 12):
    y, state = _apply_mixer(mixer, params, x[:, t:t + 1], state)
    pieces.append(y)
  assert_close(full, jnp.concatenate(pieces, axis=1), 1e-5, "output")
  jax.tree.map(lambda a, b: assert_close(a, b, 1e-5, "state"), final, state)


@pytest.mark.parametrize("implementation, step", [("xla", "reference"), (None, "pallas_gpu"),
                                                  ("pallas_tpu", "pallas_tpu")])
def test_kda_decode_step_follows_kda_implementation(monkeypatch, implementation, step):
  """On a GPU (faked) the KDA mixer decodes with the step form its ``kda_implementation`` names:
  "xla" with the plain-JAX update, not the platform's kernel; each step form is replaced by a
  recording wrapper around the plain-JAX update."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  called = []
  for name in kda_ops.STEP_UPDATES:
    monkeypatch.setitem(kda_ops.STEP_UPDATES, name,
                        lambda *args, name=name: called.append(name) or kda_reference.update(*args))
  config = dataclasses.replace(TINY, kda_implementation=implementation)
  mixer = MIXERS["K"](config)
  x = jax.random.normal(jax.random.key(0), (2, 1, config.d_model))
  params = jax.eval_shape(mixer.init, jax.random.key(1), x)
  jax.eval_shape(lambda p: _apply_mixer(mixer, p, x, MIXERS["K"].initial_state(config, 2)), params)
  assert called == [step]


@pytest.mark.slow  # test_segments_do_not_see_each_other checks every letter inside a model.
@pytest.mark.parametrize("letter", sorted(MIXERS))
def test_mixer_segments_do_not_see_each_other(letter):
  """A packed row of three segments: each segment's output is what it gets alone, and (for
  the recurrent mixers) the final state is the last segment's."""
  bounds = [(0, 5), (5, 11), (11, 30)]
  mixer = MIXERS[letter](TINY)
  x = jax.random.normal(jax.random.key(0), (2, 30, TINY.d_model))
  params = mixer.init(jax.random.key(1), x)
  segment_ids = jnp.asarray(np.repeat([[i for i, (a, b) in enumerate(bounds)
                                        for _ in range(a, b)]], 2, axis=0))
  packed, final = _apply_mixer(mixer, params, x, segment_ids=segment_ids)
  for start, stop in bounds:
    alone, alone_final = _apply_mixer(mixer, params, x[:, start:stop])
    assert_close(alone, packed[:, start:stop], 1e-5, f"segment [{start}, {stop})")
  if letter not in CACHED_MIXERS:  # An attention cache keeps the whole packed row.
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
  return TinyLM(config, model, tokens, jax.jit(model.init)(jax.random.key(1), tokens))


# The eager run repeats the jitted one op by op (slow); the mixers' own step test runs eagerly.
@pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["eager", "jit"])
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
  _, state = jax.eval_shape(lm.model.apply, lm.params, lm.tokens)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, init_decode_state(lm.config, 2))
  assert decode_state_bytes(lm.config, 2) == sum(x.size * x.dtype.itemsize
                                                  for x in jax.tree.leaves(state))


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
  # the head the logits move by up to about 2.5e-2 (Mamba, MLA, GQA alone: about 1e-2). With
  # MoE a rounded router score can also swap a token's expert (measured 5.7e-2).
  assert_close(reference, mixed, 8e-2 if lm.config.mlp == "moe" else 4e-2, "bf16 logits")


def test_mamba_decode_state_layout():
  """Per Mamba layer: the conv window [B, d_conv - 1, d_inner] and the state [B, d_inner, N]."""
  inner = TINY.expand * TINY.d_model
  per_layer = 2 * (inner * (TINY.d_conv - 1) * 4 + inner * TINY.d_state * 4)
  assert decode_state_bytes(TINY, 2) == TINY.num_layers * per_layer


def test_kda_decode_state_layout():
  """Per KDA layer: q, k, v conv windows in the compute dtype and a [B, HV, K, V] float32 state."""
  config = dataclasses.replace(LM_CONFIGS["kda"], dtype="bfloat16")
  state = init_decode_state(config, 3)[0]["mixer"]
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


def test_kimi_linear_layer_placement():
  """The 48B preset's pattern puts MLA exactly at 0-indexed layers 3, 7, ..., 23, 26 (SPEC 5);
  layer 0 is dense and the rest are MoE."""
  from train.config import load_preset
  config = load_preset("kimi_linear_48b").model
  letters = layer_letters(config)
  assert [i for i, letter in enumerate(letters) if letter == "M"] == [3, 7, 11, 15, 19, 23, 26]
  assert letters.count("K") == 20 and len(letters) == 27
  assert layer_mlps(config) == ("swiglu",) + ("moe",) * 26
  with pytest.raises(ValueError, match="first_k_dense"):
    layer_mlps(dataclasses.replace(config, first_k_dense=28))


def test_hybrid_kda_state_does_not_grow_with_the_context():
  """After prefilling 5 or 30 tokens the KDA layers' states have the same shapes and bytes;
  only the MLA latent cache in use grows, by C + R values per token. (Shapes only, by
  ``jax.eval_shape``: the eager model took 15 s; the cache positions' values are the prefill
  and decode tests'.)"""
  model = LanguageModel(HYBRID)
  tokens = jax.ShapeDtypeStruct((1, 30), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(1), tokens)
  _, short = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((1, 5), jnp.int32))
  _, long = jax.eval_shape(model.apply, params, tokens)
  for a, b in zip(short, long):
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
  kda_bytes = sum(x.size * x.dtype.itemsize for letter, state in zip(layer_letters(HYBRID), long)
                  if letter == "K" for x in jax.tree.leaves(state))
  latent_per_token = (HYBRID.mla_kv_lora_rank + HYBRID.mla_qk_rope_head_dim) * 4  # float32
  for context in (5, 30):
    assert decode_state_bytes(HYBRID, 1, context) == kda_bytes + context * latent_per_token + 4


def test_attention_cache_layout():
  """A: k and v caches [B, max_cache_length, KH, D]; M: the latent [B, S, C] and the shared
  key part [B, S, R]; both with an int32 position."""
  config = dataclasses.replace(TINY, dtype="bfloat16")
  cache = lambda *shape: jax.ShapeDtypeStruct((3, 40) + shape, jnp.bfloat16)
  position = jax.ShapeDtypeStruct((), jnp.int32)
  chex.assert_trees_all_equal_shapes_and_dtypes(
      MIXERS["A"].initial_state(config, 3), {"k": cache(2, 8), "v": cache(2, 8),
                                             "position": position})
  chex.assert_trees_all_equal_shapes_and_dtypes(
      MIXERS["M"].initial_state(config, 3), {"latent": cache(10), "k_pe": cache(4),
                                             "position": position})


def test_attention_mixers_reject_sequences_longer_than_the_cache():
  for letter in "AM":
    mixer = MIXERS[letter](TINY)
    x = jnp.zeros((1, 41, TINY.d_model))
    with pytest.raises(ValueError, match="max_cache_length"):
      mixer.init(jax.random.key(0), x)


def test_gqa_with_one_kv_head_is_multi_query():
  """attn_num_kv_heads=1 gives one k and one v projection of a single head."""
  config = dataclasses.replace(TINY, attn_num_kv_heads=1)
  params = nn.meta.unbox(
      MIXERS["A"](config).init(jax.random.key(0), jnp.zeros((1, 3, 16)))["params"])
  assert params["k_proj"]["kernel"].shape == (16, 8)
  assert params["q_proj"]["kernel"].shape == (16, 32)
  with pytest.raises(ValueError, match="attn_num_kv_heads"):
    MIXERS["A"](dataclasses.replace(TINY, attn_num_kv_heads=3)).init(jax.random.key(0),
                                                                      jnp.zeros((1, 3, 16)))


def test_kimi_linear_48b_parameter_counts():
  """The released model's dimensions give about 48B parameters, about 3B activated per token
  (Kimi-Linear-48B-A3B); counted abstractly with jax.eval_shape, no memory."""
  from train.config import load_preset
  total, activated = parameter_counts(load_preset("kimi_linear_48b").model)
  print(f"kimi_linear_48b: {total:,} parameters, {activated:,} activated per token")
  assert 47e9 <= total <= 50e9
  assert 2.7e9 <= activated <= 3.3e9
