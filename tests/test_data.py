"""Tests of train.data: the stdlib_bytes builder, packing, and the grain reading pipeline.

Most tests read a dataset built from a small synthetic tree of .py files whose contents are all
different, so a document read back from the token stream identifies its file.
"""

import dataclasses
import json
import os
import pathlib
import pickle

import grain
import hypothesis
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import strategies as st

from train import data
from train.config import DataConfig
from train.data import packing
from train.data import stdlib_bytes

tfds.disable_progress_bar()

SEQ_LEN = 31
BATCH = 4


def _write_tree(root: pathlib.Path) -> None:
  """~120 small .py files with distinct contents, plus files and folders the builder skips."""
  for i in range(120):
    body = f"# module {i}\n" + f"value_{i} = {i * i}\n" * (i % 13) + "s = 'caf\u00e9'\n" * (i % 3)
    path = root / f"pkg{i % 4}" / f"mod_{i}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
  (root / "pkg0" / "__init__.py").write_bytes(b"")  # An empty document: only its BOS.
  (root / "pkg1" / "latin1.py").write_bytes(b"# -*- coding: latin-1 -*-\nx = '\xe9\xff'\n")
  extra = 0
  for k in range(1000):  # Make sure validation holds several documents.
    if stdlib_bytes.is_validation(f"extra/v{k}.py"):
      (root / "extra").mkdir(exist_ok=True)
      (root / "extra" / f"v{k}.py").write_text(f"# validation document {k}\n" + "y = 2\n" * k)
      extra += 1
      if extra == 3:
        break
  for skipped in ("test", "site-packages", "__pycache__", "pkg2/tests"):
    (root / skipped).mkdir(parents=True, exist_ok=True)
    (root / skipped / "skipped.py").write_text("skipped = True\n")
  (root / "pkg3" / "notes.txt").write_text("not python\n")


def _build(source: pathlib.Path, data_dir: pathlib.Path) -> None:
  stdlib_bytes.StdlibBytes(data_dir=str(data_dir), source_dir=source).download_and_prepare()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("source")
  _write_tree(root)
  return root


@pytest.fixture(scope="module")
def data_dir(tree, tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  _build(tree, directory)
  return directory


@pytest.fixture
def config(data_dir):
  return DataConfig(data_dir=str(data_dir), seq_len=SEQ_LEN)


def _stored(data_dir, split: str) -> list[tuple[str, bytes]]:
  """(path, text) of each document of ``split``, in stored order."""
  source = tfds.data_source(stdlib_bytes.NAME, split=split, data_dir=str(data_dir))
  return [(source[i]["path"].decode(), source[i]["text"]) for i in range(len(source))]


def _stream(batches) -> np.ndarray:
  """The token stream the batches were cut from: rows in order, batches in order."""
  return np.concatenate([np.asarray(b).reshape(-1) for b in batches])


def _documents(stream: np.ndarray) -> list[bytes]:
  """The complete documents of a stream that starts with BOS (the last, cut one is dropped)."""
  assert stream[0] == data.BOS_ID
  starts = np.flatnonzero(stream == data.BOS_ID)
  pairs = zip(starts[:-1], starts[1:], strict=True)
  return [stream[a + 1:b].astype(np.uint8).tobytes() for a, b in pairs]


def _dealt_stream(texts: list[bytes], length: int, start: int = 0, step: int = 1) -> np.ndarray:
  """The first ``length`` tokens of documents ``start, start + step, ...`` of ``texts`` repeated."""
  tokens, total, i = [], 0, start
  while total < length:
    tokens.append(packing.document_tokens({"text": texts[i % len(texts)]}, "text"))
    total += len(tokens[-1])
    i += step
  return np.concatenate(tokens)[:length]


def _take(iterator, n: int) -> list[np.ndarray]:
  return [next(iterator) for _ in range(n)]


def _epoch_batches(data_dir, split="train", batch=BATCH) -> int:
  """Number of batches one epoch of ``split`` fills, rounded up."""
  tokens = sum(1 + len(text) for _, text in _stored(data_dir, split))
  return -(-tokens // (batch * (SEQ_LEN + 1)))


# The builder.


def test_splits_partition_the_python_files(tree, data_dir):
  train, validation = _stored(data_dir, "train"), _stored(data_dir, "validation")
  train_paths, validation_paths = {p for p, _ in train}, {p for p, _ in validation}
  assert not train_paths & validation_paths
  assert train_paths | validation_paths == set(stdlib_bytes.list_source_files(tree))
  assert len(train_paths) == len(train) and len(validation_paths) == len(validation)
  assert validation_paths == {p for p in train_paths | validation_paths
                              if stdlib_bytes.is_validation(p)}
  assert len(validation) >= 3
  for path, text in train + validation:  # Bytes are stored unchanged, even invalid UTF-8.
    assert text == (tree / path).read_bytes()
  assert "pkg1/latin1.py" in train_paths | validation_paths


def test_skipped_directories_and_files(tree):
  paths = stdlib_bytes.list_source_files(tree)
  assert paths == sorted(paths) and len(paths) == 122 + 3
  assert all(p.endswith(".py") for p in paths)
  assert not [p for p in paths if set(p.split("/")) & stdlib_bytes.SKIPPED_DIRECTORIES]


def test_build_ignores_file_listing_order(tree, data_dir, tmp_path, monkeypatch):
  real_walk = os.walk

  def reversed_walk(top, *args, **kwargs):
    for directory, subdirectories, files in real_walk(top, *args, **kwargs):
      subdirectories.reverse()
      files.reverse()
      yield directory, subdirectories, files

  monkeypatch.setattr(stdlib_bytes.os, "walk", reversed_walk)
  assert stdlib_bytes.list_source_files(tree) == sorted(stdlib_bytes.list_source_files(tree))
  _build(tree, tmp_path)
  for split in ("train", "validation"):
    assert _stored(tmp_path, split) == _stored(data_dir, split)


@hypothesis.given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=50))
def test_split_depends_only_on_the_path(paths):
  assert [stdlib_bytes.is_validation(p) for p in paths] == [
      stdlib_bytes.is_validation(p) for p in reversed(paths)][::-1]


def test_validation_fraction_is_about_two_percent():
  fraction = np.mean([stdlib_bytes.is_validation(f"pkg/module_{i}.py") for i in range(20000)])
  assert 0.017 < fraction < 0.023


def test_builder_pickles_with_its_source_dir(tree, data_dir):
  builder = stdlib_bytes.StdlibBytes(data_dir=str(data_dir), source_dir=tree)
  assert pickle.loads(pickle.dumps(builder)).source_dir == tree
  assert stdlib_bytes.StdlibBytes(data_dir=str(data_dir)).source_dir == (
      stdlib_bytes.default_source_dir())


def test_builder_rejects_a_missing_source_dir(tmp_path):
  builder = stdlib_bytes.StdlibBytes(data_dir=str(tmp_path / "d"), source_dir=tmp_path / "none")
  with pytest.raises(FileNotFoundError, match="source_dir"):
    builder.download_and_prepare()


def test_a_split_without_documents_is_left_out(tmp_path):
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "a.py").write_text("x = 1\n")
  assert not stdlib_bytes.is_validation("a.py")
  _build(tmp_path / "src", tmp_path / "tfds")
  config = DataConfig(data_dir=str(tmp_path / "tfds"), seq_len=3)
  np.testing.assert_array_equal(next(data.train_iterator(config, 1)), [[0, ord("x"), 32, 61]])
  with pytest.raises(ValueError, match="split 'validation'.*expected one of \\['train'\\]"):
    data.eval_batches(config, 1, 1)
  with pytest.raises(ValueError, match="split 'train\\[:0\\]'.*holds no documents"):
    data.eval_batches(dataclasses.replace(config, eval_split="train[:0]"), 1, 1)


def test_prepare_builds_the_standard_library(tmp_path):
  config = DataConfig(data_dir=str(tmp_path), seq_len=SEQ_LEN)
  data.prepare(config)
  builder = tfds.builder(stdlib_bytes.NAME, data_dir=str(tmp_path))
  assert builder.is_prepared()
  train, validation = (builder.info.splits[s].num_examples for s in ("train", "validation"))
  assert train > 100 and 0 < validation < 0.05 * (train + validation)
  paths = {p for p, _ in _stored(tmp_path, "train") + _stored(tmp_path, "validation")}
  assert "os.py" in paths and "json/decoder.py" in paths
  assert not [p for p in paths if "site-packages" in p or p.startswith("test/")]
  data.prepare(config)  # Already prepared: returns without building.
  assert data.eval_batches(config, 2, 1)[0].shape == (2, SEQ_LEN + 1)


def test_prepare_leaves_a_prepared_dataset_alone(config, data_dir):
  info = next(data_dir.rglob("dataset_info.json"))
  before = info.stat().st_mtime_ns
  data.prepare(config)
  assert info.stat().st_mtime_ns == before


# Packing.


def test_document_tokens():
  np.testing.assert_array_equal(packing.document_tokens({"t": b"a\xff"}, "t"), [0, 97, 255])
  np.testing.assert_array_equal(packing.document_tokens({"t": "\u00e9"}, "t"), [0, 0xC3, 0xA9])
  assert packing.document_tokens({"t": b""}, "t").dtype == np.int32
  with pytest.raises(TypeError, match="text_key 't'"):
    packing.document_tokens({"t": 3}, "t")


@hypothesis.given(
    st.lists(st.lists(st.integers(0, 255), max_size=20), max_size=12), st.integers(1, 10))
def test_packing_cuts_the_stream_and_resumes_anywhere(documents, length):
  arrays = [np.asarray(d, np.int32) for d in documents]
  dataset = packing.PackIterDataset(grain.MapDataset.source(arrays).to_iter_dataset(), length)
  stream = np.concatenate([np.zeros(0, np.int32)] + arrays)
  expected = [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]
  iterator = iter(dataset)
  states = [iterator.get_state()]
  pieces = []
  for piece in iterator:
    pieces.append(piece)
    states.append(iterator.get_state())
  assert len(pieces) == len(expected)
  for piece, want in zip(pieces, expected, strict=True):
    assert piece.dtype == np.int32
    np.testing.assert_array_equal(piece, want)
  for k, state in enumerate(states):
    resumed = iter(dataset)
    resumed.set_state(json.loads(json.dumps(state)))
    rest = list(resumed)
    assert len(rest) == len(expected) - k
    for piece, want in zip(rest, expected[k:], strict=True):
      np.testing.assert_array_equal(piece, want)


def test_pack_length_must_be_positive():
  with pytest.raises(ValueError, match="length"):
    packing.PackIterDataset(grain.MapDataset.source([]).to_iter_dataset(), 0)


# The training iterator.


def test_train_batches_pack_whole_documents_in_shuffled_epochs(config, data_dir):
  train = {text for _, text in _stored(data_dir, "train")}
  iterator = data.train_iterator(config, BATCH)
  batches = _take(iterator, 2 * _epoch_batches(data_dir) + 2)
  for batch in batches:
    assert batch.dtype == np.int32 and batch.shape == (BATCH, SEQ_LEN + 1)
    assert batch.min() >= 0 and batch.max() <= 255
  documents = _documents(_stream(batches))
  assert all(d in train for d in documents)  # Whole files, between separators.
  first, second = documents[:len(train)], documents[len(train):2 * len(train)]
  assert sorted(first) == sorted(train) == sorted(second)  # Each epoch reads every file once.
  assert first != second  # ... in a new order.
  stored_order = [text for _, text in _stored(data_dir, "train")]
  assert first != stored_order


@pytest.mark.parametrize("seed", [0, 1, 7, 2**31])
def test_same_seed_same_batches_other_seed_other_batches(config, seed):
  config = dataclasses.replace(config, shuffle_seed=seed)
  batches = _take(data.train_iterator(config, BATCH), 12)
  again = _take(data.train_iterator(config, BATCH), 12)
  other = _take(data.train_iterator(dataclasses.replace(config, shuffle_seed=seed + 1), BATCH), 12)
  np.testing.assert_array_equal(_stream(batches), _stream(again))
  assert not np.array_equal(_stream(batches), _stream(other))


def test_resume_mid_epoch_and_across_the_epoch_boundary(config, data_dir):
  epoch = _epoch_batches(data_dir)
  iterator = data.train_iterator(config, BATCH)
  states, batches = {}, []
  for step in range(epoch + 5):
    states[step] = json.loads(json.dumps(iterator.get_state()))
    batches.append(next(iterator))
  for step in (0, 3, epoch - 2, epoch - 1, epoch + 1):  # Resume then read past the boundary.
    resumed = data.train_iterator(config, BATCH)
    resumed.set_state(states[step])
    for want in batches[step:step + 4]:
      np.testing.assert_array_equal(next(resumed), want)


def test_hosts_read_disjoint_documents_that_deal_the_single_host_order(config, data_dir):
  train = _stored(data_dir, "train")
  single_host = data.train_iterator(config, 2 * BATCH)
  batches = _take(single_host, _epoch_batches(data_dir, batch=2 * BATCH) + 1)
  whole = _documents(_stream(batches))[:len(train)]  # The first epoch's order.
  host_documents = []
  for index in range(2):
    host = data.train_iterator(config, 2 * BATCH, process_index=index, process_count=2)
    batches = _take(host, _epoch_batches(data_dir) + 2)
    assert all(b.shape == (BATCH, SEQ_LEN + 1) for b in batches)
    again = _take(data.train_iterator(config, 2 * BATCH, process_index=index, process_count=2),
                  len(batches))
    np.testing.assert_array_equal(_stream(batches), _stream(again))
    # Host p reads documents p, p + 2, ... of the single-host order.
    share = whole[index::2]
    assert _documents(_stream(batches))[:len(share)] == share
    host_documents.append(set(share))
  assert not host_documents[0] & host_documents[1]
  assert host_documents[0] | host_documents[1] == {text for _, text in train}


def test_workers_give_the_same_batches_and_resume(config):
  batches = _take(data.train_iterator(config, BATCH), 8)
  parallel = dataclasses.replace(config, num_workers=2)
  iterator = data.train_iterator(parallel, BATCH)
  try:
    first = _take(iterator, 5)
    state = json.loads(json.dumps(iterator.get_state()))
  finally:
    iterator.close()
  resumed = data.train_iterator(parallel, BATCH)
  try:
    resumed.set_state(state)
    rest = _take(resumed, 3)
  finally:
    resumed.close()
  np.testing.assert_array_equal(_stream(first + rest), _stream(batches))


@pytest.mark.parametrize("asynchronous", [False, True])
def test_orbax_checkpoint_manager_round_trip(config, tmp_path, asynchronous):
  ocp = pytest.importorskip("orbax.checkpoint")
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=asynchronous)
  iterator = data.train_iterator(config, BATCH)
  _take(iterator, 7)
  with ocp.CheckpointManager(tmp_path, options=options) as manager:
    manager.save(7, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"step": np.full((), 7, np.int32)}),
        data=data.CheckpointSave(iterator)))
    expected = _take(iterator, 5)  # Moves on while an asynchronous save may still be running.
    manager.wait_until_finished()
  with ocp.CheckpointManager(tmp_path, options=options) as manager:
    resumed = data.train_iterator(config, BATCH)
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"step": np.zeros((), np.int32)}),
        data=data.CheckpointRestore(resumed)))
  assert int(restored["state"]["step"]) == 7
  for want in expected:
    np.testing.assert_array_equal(next(resumed), want)


# Evaluation batches.


def test_eval_batches_are_the_stored_documents_in_order(config, data_dir):
  validation = [text for _, text in _stored(data_dir, "validation")]
  batches = data.eval_batches(config, BATCH, 6)
  assert len(batches) == 6
  assert all(b.dtype == np.int32 and b.shape == (BATCH, SEQ_LEN + 1) for b in batches)
  stream = _stream(batches)
  np.testing.assert_array_equal(stream, _dealt_stream(validation, len(stream)))
  again = data.eval_batches(dataclasses.replace(config, shuffle_seed=5, num_workers=2), BATCH, 6)
  np.testing.assert_array_equal(_stream(again), stream)
  assert data.eval_batches(config, BATCH, 0) == []


def test_eval_batches_per_host(config, data_dir):
  validation = [text for _, text in _stored(data_dir, "validation")]
  for index in range(2):
    batches = data.eval_batches(config, 2 * BATCH, 3, process_index=index, process_count=2)
    assert all(b.shape == (BATCH, SEQ_LEN + 1) for b in batches)
    stream = _stream(batches)
    np.testing.assert_array_equal(stream, _dealt_stream(validation, len(stream), index, 2))


def test_text_key_selects_the_feature(config, data_dir):
  paths = [path.encode() for path, _ in _stored(data_dir, "validation")]
  stream = _stream(data.eval_batches(dataclasses.replace(config, text_key="path"), 1, 4))
  np.testing.assert_array_equal(stream, _dealt_stream(paths, len(stream)))


# Errors.


@pytest.mark.parametrize("change, match", [
    ({"seq_len": 0}, "seq_len"),
    ({"shuffle_seed": -1}, "shuffle_seed"),
    ({"num_workers": -1}, "num_workers"),
    ({"train_split": "nope"}, "split 'nope'"),
    ({"text_key": "body"}, "text_key: 'body'"),
    ({"dataset": "no_such_dataset"}, "unknown dataset 'no_such_dataset'"),
])
def test_bad_config_is_named(config, change, match):
  with pytest.raises(ValueError, match=match):
    data.train_iterator(dataclasses.replace(config, **change), BATCH)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 5, "process_count": 2}, "batch_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 4, "process_index": 2, "process_count": 2}, "process_index"),
    ({"batch_size": 4, "process_count": 0}, "process_count"),
])
def test_bad_batching_is_named(config, kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.train_iterator(config, **kwargs)
  with pytest.raises(ValueError, match=match):
    data.eval_batches(config, num_batches=1, **kwargs)


def test_bad_eval_arguments_are_named(config):
  with pytest.raises(ValueError, match="num_batches"):
    data.eval_batches(config, BATCH, -1)
  with pytest.raises(ValueError, match="split 'test'"):
    data.eval_batches(dataclasses.replace(config, eval_split="test"), BATCH, 1)


def test_unprepared_datasets_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="'stdlib_bytes' is not prepared.*prepare"):
    data.train_iterator(DataConfig(data_dir=str(tmp_path)), BATCH)
  with pytest.raises(FileNotFoundError, match=f"'mnist' is not prepared in '{tmp_path}"):
    data.prepare(DataConfig(dataset="mnist", data_dir=str(tmp_path)))
  assert not list(tmp_path.rglob("*.array_record*"))  # Nothing was downloaded or built.
