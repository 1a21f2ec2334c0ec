"""The recall tasks: the MQAR and passkey builders, the masked loss, and the benchmark's smoke run.

The builders are checked on small settings (determinism, disjoint splits, answers exactly where
the mask is, the needle at the requested depth); the smoke run trains the tiny attention preset
on an easy MQAR setting and checks that it recalls (which shows the task, the masked loss and
the metric are wired right) and that the JSON, markdown and plots are written.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from benchmarks import recall as recall_bench
from models.lm import LanguageModel
from train.config import ModelConfig
from train.data import recall
from train.data import stdlib_bytes
from train.step import next_token_loss

tfds.disable_progress_bar()

SMALL_MQAR = dict(vocab_size=16, num_pairs=3, seq_len=24, num_train=300, num_test=40, seed=3)


def _split(builder, split):
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def _digests(examples):
  return {e["tokens"].tobytes() for e in examples}


@pytest.fixture(scope="module")
def filler_tree(tmp_path_factory):
  """A few .py files on both sides of stdlib_bytes' validation split."""
  root = tmp_path_factory.mktemp("filler")
  found = {True: 0, False: 0}
  for k in range(2000):
    path = f"m{k}.py"
    wanted = stdlib_bytes.is_validation(path)
    if found[wanted] < 3:
      (root / path).write_text(f"# {'test' if wanted else 'train'} filler {k}\n"
                               + f"value_{k} = [{', '.join(str(i) for i in range(40))}]\n" * 3)
      found[wanted] += 1
    if min(found.values()) == 3:
      break
  return root


def test_mqar_is_deterministic_with_disjoint_splits(tmp_path):
  config = recall.mqar_config(**SMALL_MQAR)
  first = recall.prepare(recall.Mqar(config=config, data_dir=str(tmp_path / "a")))
  again = recall.prepare(recall.Mqar(config=recall.mqar_config(**SMALL_MQAR),
                                     data_dir=str(tmp_path / "b")))
  for split in ("train", "test"):
    a, b = _split(first, split), _split(again, split)
    assert len(a) == {"train": 300, "test": 40}[split]
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x["tokens"], y["tokens"])
      np.testing.assert_array_equal(x["mask"], y["mask"])
  train, test = _split(first, "train"), _split(first, "test")
  assert not _digests(train) & _digests(test)
  assert len(_digests(test)) == len(test)
  other_seed = recall.prepare(recall.Mqar(config=recall.mqar_config(**{**SMALL_MQAR, "seed": 4}),
                                          data_dir=str(tmp_path / "a")))
  assert _digests(_split(other_seed, "train")) != _digests(train)


def test_mqar_masks_exactly_the_answers_of_queried_keys():
  config = recall.mqar_config(vocab_size=32, num_pairs=5, num_queries=3, seq_len=40)
  rng = np.random.default_rng(0)
  num_keys = (32 - 1) // 2
  for _ in range(50):
    tokens, mask = recall.mqar_example(rng, config)
    assert tokens.shape == mask.shape == (41,)
    keys, values = tokens[0:10:2], tokens[1:10:2]
    assert len(set(keys)) == 5 and np.all((keys >= 1) & (keys <= num_keys))
    assert np.all((values > num_keys) & (values < 32))
    answers = np.flatnonzero(mask)
    assert len(answers) == 3 and mask[0] == 0 and np.all(answers >= 11)
    for position in answers:
      key = tokens[position - 1]
      assert key in keys and tokens[position] == values[list(keys).index(key)]
    rest = np.ones(41, bool)
    rest[:10] = False
    rest[answers] = rest[answers - 1] = False
    assert np.all(tokens[rest] == recall.FILLER_ID)


def test_mqar_rejects_settings_that_do_not_fit():
  with pytest.raises(ValueError, match="num_queries"):
    recall.mqar_config(vocab_size=64, num_pairs=8, seq_len=30)
  with pytest.raises(ValueError, match="num_pairs"):
    recall.mqar_config(vocab_size=9, num_pairs=5, seq_len=64)


def test_mqar_too_few_distinct_sequences_raises(tmp_path):
  config = recall.mqar_config(vocab_size=5, num_pairs=1, seq_len=4, num_train=50, num_test=20)
  with pytest.raises(ValueError, match="too few distinct sequences"):
    recall.Mqar(config=config, data_dir=str(tmp_path)).download_and_prepare()


def test_passkey_places_the_needle_at_the_depth_and_masks_the_answer(tmp_path, filler_tree):
  depths = (0.0, 0.3, 1.0)
  config = recall.passkey_config(seq_len=120, depths=depths, digits=4, num_train=12, num_test=9)
  builder = recall.prepare(recall.Passkey(config=config, data_dir=str(tmp_path),
                                          source_dir=filler_tree))
  filler_size = 120 - recall.passkey_overhead(4)
  train, test = _split(builder, "train"), _split(builder, "test")
  assert (len(train), len(test)) == (12, 9)
  for examples in (train, test):  # The depths take turns.
    assert sorted(np.round([e["depth"] for e in examples], 3)) == sorted(
        depths * (len(examples) // 3))
  for example in train + test:
    tokens, mask = example["tokens"], example["mask"]
    text = bytes(tokens.astype(np.uint8))
    key = example["passkey"]
    assert len(text) == 121 and text[0] == 0 and len(key) == 4 and key.isdigit()
    start = 1 + round(float(example["depth"]) * filler_size)
    assert example["needle_position"] == start
    needle = recall.NEEDLE.replace(b"{}", key)
    assert text[start:start + len(needle)] == needle
    assert text.endswith(recall.QUESTION + key)
    np.testing.assert_array_equal(np.flatnonzero(mask), np.arange(117, 121))
  # Test filler comes from the validation files, train filler from the others.
  assert all(b"train filler" not in bytes(e["tokens"].astype(np.uint8)) for e in test)
  assert all(b"test filler" not in bytes(e["tokens"].astype(np.uint8)) for e in train)
  assert not _digests(train) & _digests(test)
  again = recall.prepare(recall.Passkey(config=config, data_dir=str(tmp_path / "again"),
                                        source_dir=filler_tree))
  assert [e["tokens"].tobytes() for e in _split(again, "test")] == [
      e["tokens"].tobytes() for e in test]


def test_passkey_rejects_a_context_without_room():
  with pytest.raises(ValueError, match="seq_len must be >="):
    recall.passkey_config(seq_len=40)


def test_padded_batches_mix_settings_and_weight_only_answers(tmp_path):
  builders = [recall.prepare(recall.Mqar(config=recall.mqar_config(
      vocab_size=16, num_pairs=p, seq_len=l, num_train=64, num_test=8), data_dir=str(tmp_path)))
              for p, l in ((2, 16), (4, 24))]
  batch = next(recall.padded_batches(builders, 32, 24, seed=1))
  tokens, weights = batch["tokens"], batch["weights"]
  assert tokens.shape == (32, 25) and weights.shape == (32, 24)
  answers = weights.sum(axis=1)
  assert set(answers) == {2.0, 4.0}  # Both settings are in the mix.
  assert np.all(tokens[answers == 2, 17:] == recall.FILLER_ID)  # Right-padded.
  assert np.all(tokens[:, 1:][weights > 0] > 7)  # Every weighted target is a value.


def test_weighted_loss_counts_only_weighted_targets():
  model = LanguageModel(ModelConfig(vocab_size=16, d_model=16, num_layers=1, layer_pattern="A",
                                    attn_num_heads=2, attn_head_dim=8, max_cache_length=16))
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 16)
  params = model.init(jax.random.key(1), tokens[:, :-1])["params"]
  logits, _ = model.apply({"params": params}, tokens[:, :-1])
  per_token = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
  weights = jnp.zeros((2, 8)).at[0, 3].set(1.0).at[1, 6].set(1.0)
  loss, _ = next_token_loss(model, params, tokens, weights)
  np.testing.assert_allclose(loss, (per_token[0, 3] + per_token[1, 6]) / 2, rtol=1e-5)
  plain, _ = next_token_loss(model, params, tokens)
  np.testing.assert_allclose(plain, per_token.mean(), rtol=1e-5)


def test_benchmark_smoke_attention_recalls_an_easy_mqar(tmp_path):
  out = tmp_path / "out"
  results = recall_bench.main([
      "--presets", "recall_attention", "--tasks", "mqar", "--mqar_vocab", "16", "--mqar_pairs", "2,4",
      "--mqar_lengths", "24", "--mqar_train_examples", "2048", "--mqar_test_examples", "64",
      "--steps", "1800", "--batch_size", "32", "--learning_rate", "1e-3", "--log_every", "100",
      "--data_dir", str(tmp_path / "data"), "--out", str(out)])
  for name in ("recall.json", "recall.md", "mqar.png"):
    assert (out / name).stat().st_size > 0, name
  assert json.loads((out / "recall.json").read_text()) == json.loads(json.dumps(results))
  model = results["models"]["recall_attention"]
  assert model["parameters"] > 0 and all(math.isfinite(l) for _, l in model["mqar"]["losses"])
  accuracies = {r["num_pairs"]: r["accuracy"] for r in model["mqar"]["results"]}
  assert set(accuracies) == {2, 4}
  assert min(accuracies.values()) >= 0.9, accuracies
  assert "| attention |" in (out / "recall.md").read_text()


def test_benchmark_passkey_outputs(tmp_path, filler_tree, monkeypatch):
  """Passkey end to end at the smallest size: a few steps, the heat maps and finite numbers."""
  monkeypatch.setattr(stdlib_bytes, "default_source_dir", lambda: filler_tree)
  out = tmp_path / "out"
  results = recall_bench.main([
      "--presets", "recall_attention", "--tasks", "passkey", "--passkey_lengths", "80,96",
      "--passkey_train_lengths", "80", "--passkey_depths", "0,1", "--passkey_train_examples",
      "32", "--passkey_test_examples", "4", "--steps", "3", "--passkey_steps", "2",
      "--batch_size", "8", "--data_dir", str(tmp_path / "data"), "--out", str(out)])
  for name in ("recall.json", "recall.md", "passkey.png", "passkey_attention.png"):
    assert (out / name).stat().st_size > 0, name
  rows = results["models"]["recall_attention"]["passkey"]["results"]
  assert sorted((r["seq_len"], r["depth"]) for r in rows) == [(80, 0), (80, 1), (96, 0), (96, 1)]
  assert all(0 <= r["accuracy"] <= 1 and 0 <= r["digit_accuracy"] <= 1 for r in rows)
