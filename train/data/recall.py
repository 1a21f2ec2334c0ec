"""Synthetic recall tasks as TFDS datasets, built offline from a seed: MQAR and passkey retrieval.

Both builders write ``array_record`` files that ``tfds.data_source`` / ``builder.as_data_source``
read with random access, and both are fully determined by their ``BuilderConfig`` (whose name
spells out every parameter, so each setting is prepared once per ``data_dir``). Nothing is
downloaded.

Examples
  ``tokens``: ``int32[seq_len + 1]``; a model reads ``tokens[:-1]`` and predicts ``tokens[1:]``.
  ``mask``: ``int32[seq_len + 1]``, 1 exactly at the answer tokens (never at position 0). The loss
  and the accuracy are taken on ``tokens[1:]`` weighted by ``mask[1:]``.

``mqar`` (multi-query associative recall, after Zoology, Arora et al. 2023)
  ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` open the sequence; the rest is filler
  (``FILLER_ID`` = 0) in which ``num_queries`` distinct earlier keys are asked again, each as
  ``k v`` in one of the 2-token slots after the pairs, slots drawn uniformly without replacement;
  the answers are those ``v``. Keys are ``1 .. K`` and values ``K + 1 .. vocab_size - 1`` with
  ``K = (vocab_size - 1) // 2``; the keys of a sequence are distinct, values are drawn with
  replacement. Zoology draws query gaps from a power law; here they are uniform over the slots.

``passkey`` (passkey retrieval / needle in a haystack, after Mohtashami & Jaggi 2023)
  Bytes: ``BOS`` (0), filler, the needle ``" The pass key is 48213. "``, more filler, then
  ``"\\nWhat is the pass key? The pass key is 48213"``; the answer is the final ``digits``
  digits. The needle sits at ``depth`` = the fraction of the filler before it (0: right after
  BOS, 1: right before the question); example ``i`` of a split takes ``depths[i % len(depths)]``.
  The filler is source text of the Python standard library, read offline the way
  ``stdlib_bytes`` reads it: the train split cuts it from that builder's train files, the test
  split from its validation files, at random offsets (running on into the next file when one is
  too short).

Splits
  ``train`` and ``test`` come from two independent streams of ``numpy.random.Generator``
  (``SeedSequence([seed, 0])`` and ``[seed, 1]``); a test sequence whose tokens equal a train
  sequence's (or an earlier test sequence's) is dropped and drawn again, so the splits never share
  a sequence. Settings too small to give ``num_test`` new sequences raise ``ValueError``.

Reading: ``prepare(builder)``, then ``padded_batches`` for training (several settings mixed,
right-padded to one length: harmless for causal models, as the padding comes after every answer
and carries no loss) and ``padded_examples`` for evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Iterator, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from train.data import stdlib_bytes
from train.data.packing import BOS_ID

FILLER_ID = 0
NEEDLE = b" The pass key is {}. "
QUESTION = b"\nWhat is the pass key? The pass key is "


def _features(seq_len: int, **extra) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "tokens": tfds.features.Tensor(shape=(seq_len + 1,), dtype=np.int32),
      "mask": tfds.features.Tensor(shape=(seq_len + 1,), dtype=np.int32),
      **extra,
  })


def _digest(tokens: np.ndarray) -> bytes:
  return hashlib.sha256(np.ascontiguousarray(tokens, np.int32).tobytes()).digest()


def _disjoint_test(draw, rng: np.random.Generator, count: int, train_digests: set[bytes],
                   what: str) -> list[tuple[np.ndarray, np.ndarray, dict]]:
  """``count`` examples from ``draw(rng, index)`` whose tokens are in neither split so far."""
  seen, examples, attempts = set(train_digests), [], 0
  while len(examples) < count:
    attempts += 1
    if attempts > 50 * count + 1000:
      raise ValueError(f"{what}: could not draw {count} test sequences that differ from the "
                       f"train split and from each other ({len(examples)} found in {attempts - 1} "
                       "draws); the setting holds too few distinct sequences")
    tokens, mask, extra = draw(rng, len(examples))
    digest = _digest(tokens)
    if digest not in seen:
      seen.add(digest)
      examples.append((tokens, mask, extra))
  return examples


# ------------------------------------------------------------------------------------------ MQAR

@dataclasses.dataclass
class MqarConfig(tfds.core.BuilderConfig):
  """One MQAR setting; build it with ``mqar_config`` so that the name follows the fields."""

  vocab_size: int = 64
  num_pairs: int = 4
  num_queries: int = 4
  seq_len: int = 64
  num_train: int = 4096
  num_test: int = 256
  seed: int = 0


def mqar_config(*, vocab_size: int = 64, num_pairs: int = 4, num_queries: int | None = None,
                seq_len: int = 64, num_train: int = 4096, num_test: int = 256,
                seed: int = 0) -> MqarConfig:
  """An ``MqarConfig`` named after its fields; ``num_queries`` None asks every key once."""
  num_queries = num_pairs if num_queries is None else num_queries
  num_keys = (vocab_size - 1) // 2
  if vocab_size < 5 or not 1 <= num_pairs <= num_keys:
    raise ValueError(f"mqar: num_pairs must be in [1, (vocab_size - 1) // 2 = {num_keys}] and "
                     f"vocab_size >= 5, got num_pairs={num_pairs}, vocab_size={vocab_size}")
  slots = (seq_len + 1 - 2 * num_pairs) // 2
  if not 1 <= num_queries <= min(num_pairs, slots):
    raise ValueError(
        f"mqar: num_queries must be in [1, min(num_pairs, (seq_len + 1 - 2 num_pairs) // 2)] = "
        f"[1, {min(num_pairs, slots)}], got {num_queries} (seq_len={seq_len}, "
        f"num_pairs={num_pairs}); a sequence needs seq_len + 1 >= 2 num_pairs + 2 num_queries")
  if num_train < 1 or num_test < 1:
    raise ValueError(f"mqar: num_train and num_test must be >= 1, got {num_train}, {num_test}")
  name = (f"v{vocab_size}_p{num_pairs}_q{num_queries}_l{seq_len}_n{num_train}_t{num_test}"
          f"_s{seed}")
  return MqarConfig(name=name, vocab_size=vocab_size, num_pairs=num_pairs,
                    num_queries=num_queries, seq_len=seq_len, num_train=num_train,
                    num_test=num_test, seed=seed,
                    description=f"MQAR: {num_pairs} pairs, {num_queries} queries, vocabulary "
                                f"{vocab_size}, {seq_len + 1} tokens, seed {seed}")


def mqar_example(rng: np.random.Generator, config: MqarConfig) -> tuple[np.ndarray, np.ndarray]:
  """One MQAR sequence: (tokens ``int32[seq_len + 1]``, mask ``int32[seq_len + 1]``)."""
  n, q, length = config.num_pairs, config.num_queries, config.seq_len + 1
  num_keys = (config.vocab_size - 1) // 2
  keys = rng.choice(num_keys, n, replace=False) + 1
  values = rng.integers(num_keys + 1, config.vocab_size, n)
  tokens = np.full(length, FILLER_ID, np.int32)
  mask = np.zeros(length, np.int32)
  tokens[0:2 * n:2], tokens[1:2 * n:2] = keys, values
  asked = rng.choice(n, q, replace=False)
  slots = np.sort(rng.choice((length - 2 * n) // 2, q, replace=False))
  positions = 2 * n + 2 * slots
  tokens[positions], tokens[positions + 1] = keys[asked], values[asked]
  mask[positions + 1] = 1
  return tokens, mask


class Mqar(tfds.core.GeneratorBasedBuilder):
  """Multi-query associative recall; see the module docstring. Pass ``config=mqar_config(...)``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [mqar_config()]
  code_path = epath.Path(__file__)  # As in stdlib_bytes: nothing is read next to this file.

  def __init__(self, **kwargs):
    super().__init__(**_config_kwargs(type(self), kwargs))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.builder_config.description,
                                 features=_features(self.builder_config.seq_len))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    config = self.builder_config
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))
    train = [mqar_example(rng, config) + ({},) for _ in range(config.num_train)]
    test = _disjoint_test(lambda r, i: mqar_example(r, config) + ({},),
                          np.random.default_rng(np.random.SeedSequence([config.seed, 1])),
                          config.num_test, {_digest(t) for t, _, _ in train}, config.name)
    return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

  def _generate_examples(self, examples):
    return _keyed(examples)


def _config_kwargs(cls, kwargs: dict) -> dict:
  """File format array_record; a config equal to a listed one is passed by name, as TFDS
  refuses a new config object that bears a listed config's name."""
  kwargs.setdefault("file_format", "array_record")
  config = kwargs.get("config")
  if isinstance(config, tfds.core.BuilderConfig) and config.name in cls.builder_configs:
    if dataclasses.asdict(config) != dataclasses.asdict(cls.builder_configs[config.name]):
      raise ValueError(f"config {config.name!r} differs from the listed config of that name")
    kwargs["config"] = config.name
  return kwargs


def _keyed(examples):
  for i, (tokens, mask, extra) in enumerate(examples):
    yield i, {"tokens": tokens, "mask": mask, **extra}


# --------------------------------------------------------------------------------------- passkey

@dataclasses.dataclass
class PasskeyConfig(tfds.core.BuilderConfig):
  """One passkey setting; build it with ``passkey_config`` so that the name follows the fields."""

  seq_len: int = 256
  depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  digits: int = 5
  num_train: int = 2048
  num_test: int = 100
  seed: int = 0


def passkey_overhead(digits: int = 5) -> int:
  """Bytes of a passkey sequence that are not filler, BOS excluded."""
  return len(NEEDLE.replace(b"{}", b"0" * digits)) + len(QUESTION) + digits


def passkey_config(*, seq_len: int = 256, depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                   digits: int = 5, num_train: int = 2048, num_test: int = 100,
                   seed: int = 0) -> PasskeyConfig:
  """A ``PasskeyConfig`` named after its fields."""
  depths = tuple(float(d) for d in depths)
  if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
    raise ValueError(f"passkey: depths must be a non-empty list of fractions in [0, 1], got "
                     f"{depths}")
  if not 1 <= digits <= 18:
    raise ValueError(f"passkey: digits must be in [1, 18], got {digits}")
  if seq_len < passkey_overhead(digits):
    raise ValueError(f"passkey: seq_len must be >= {passkey_overhead(digits)} (needle, question "
                     f"and answer), got {seq_len}")
  if num_train < 1 or num_test < 1:
    raise ValueError(f"passkey: num_train and num_test must be >= 1, got {num_train}, {num_test}")
  depth_text = "-".join(f"{d:g}" for d in depths)
  name = f"l{seq_len}_d{depth_text}_k{digits}_n{num_train}_t{num_test}_s{seed}"
  return PasskeyConfig(name=name, seq_len=seq_len, depths=depths, digits=digits,
                       num_train=num_train, num_test=num_test, seed=seed,
                       description=f"Passkey retrieval: {seq_len + 1} bytes, depths {depths}, "
                                   f"{digits} digits, seed {seed}")


class _Filler:
  """Random slices of the concatenated text of some files."""

  def __init__(self, texts: list[bytes]):
    self._text = b"".join(texts).replace(bytes([BOS_ID]), b" ")
    if not self._text:
      raise ValueError("passkey: the filler files hold no text")

  def take(self, rng: np.random.Generator, size: int) -> bytes:
    start = int(rng.integers(len(self._text)))
    text = self._text[start:start + size]
    while len(text) < size:  # Run on from the start (the next file) as often as needed.
      text += self._text[:size - len(text)]
    return text


def passkey_example(rng: np.random.Generator, config: PasskeyConfig, filler: _Filler,
                    depth: float) -> tuple[np.ndarray, np.ndarray, dict]:
  """One passkey sequence: (tokens, mask, {"depth", "needle_position", "passkey"})."""
  passkey = "".join(str(d) for d in rng.integers(0, 10, config.digits)).encode()
  needle = NEEDLE.replace(b"{}", passkey)
  filler_size = config.seq_len - passkey_overhead(config.digits)
  before = round(depth * filler_size)
  text = filler.take(rng, filler_size)
  data = bytes([BOS_ID]) + text[:before] + needle + text[before:] + QUESTION + passkey
  tokens = np.frombuffer(data, np.uint8).astype(np.int32)
  assert len(tokens) == config.seq_len + 1, (len(tokens), config.seq_len)
  mask = np.zeros_like(tokens)
  mask[-config.digits:] = 1
  return tokens, mask, {"depth": np.float32(depth), "needle_position": np.int32(1 + before),
                        "passkey": passkey.decode()}


class Passkey(tfds.core.GeneratorBasedBuilder):
  """Passkey retrieval in Python-source filler; see the module docstring.

  Args:
    source_dir: the filler's directory of ``.py`` files (split by ``stdlib_bytes.is_validation``);
      None means the running Python's standard library.
    **kwargs: passed to ``tfds.core.GeneratorBasedBuilder``; pass ``config=passkey_config(...)``.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [passkey_config()]
  code_path = epath.Path(__file__)

  def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs):
    super().__init__(**_config_kwargs(type(self), kwargs))
    self._source_dir = (pathlib.Path(source_dir) if source_dir
                        else stdlib_bytes.default_source_dir())
    self._original_state = dict(self._original_state, source_dir=source_dir)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.builder_config.description,
        features=_features(self.builder_config.seq_len,
                           depth=tfds.features.Scalar(np.float32),
                           needle_position=tfds.features.Scalar(np.int32),
                           passkey=tfds.features.Text()))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    config = self.builder_config
    paths = stdlib_bytes.list_source_files(self._source_dir)
    fillers = {}
    for split, wanted in (("train", False), ("test", True)):
      chosen = [p for p in paths if stdlib_bytes.is_validation(p) == wanted]
      if not chosen:
        raise ValueError(f"passkey: source_dir {str(self._source_dir)!r} has no .py files for the "
                         f"{split} split's filler")
      fillers[split] = _Filler([(self._source_dir / p).read_bytes() for p in chosen])
    depth = lambda i: config.depths[i % len(config.depths)]
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))
    train = [passkey_example(rng, config, fillers["train"], depth(i))
             for i in range(config.num_train)]
    test = _disjoint_test(lambda r, i: passkey_example(r, config, fillers["test"], depth(i)),
                          np.random.default_rng(np.random.SeedSequence([config.seed, 1])),
                          config.num_test, {_digest(t) for t, _, _ in train}, config.name)
    return {"train": self._generate_examples(train), "test": self._generate_examples(test)}

  def _generate_examples(self, examples):
    return _keyed(examples)


# --------------------------------------------------------------------------------------- reading

def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Builds ``builder``'s dataset unless it is already prepared in its ``data_dir``."""
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder


def pad_example(example: dict, seq_len: int) -> dict:
  """``{"tokens": int32[seq_len + 1], "weights": float32[seq_len]}`` right-padded with zeros.

  ``weights`` is ``mask[1:]``, aligned with the targets ``tokens[1:]``. Other features pass.
  """
  tokens, mask = np.asarray(example["tokens"], np.int32), np.asarray(example["mask"], np.int32)
  if len(tokens) > seq_len + 1:
    raise ValueError(f"an example of {len(tokens)} tokens does not fit seq_len {seq_len}")
  padded = np.full(seq_len + 1, FILLER_ID, np.int32)
  padded[:len(tokens)] = tokens
  weights = np.zeros(seq_len, np.float32)
  weights[:len(tokens) - 1] = mask[1:]
  rest = {k: v for k, v in example.items() if k not in ("tokens", "mask")}
  return {"tokens": padded, "weights": weights, **rest}


def _padded_source(builders: Sequence[tfds.core.DatasetBuilder], split: str,
                   seq_len: int) -> grain.MapDataset:
  sources = [grain.MapDataset.source(b.as_data_source(split=split)) for b in builders]
  dataset = sources[0] if len(sources) == 1 else grain.MapDataset.concatenate(sources)
  return dataset.map(lambda example: pad_example(
      {"tokens": example["tokens"], "mask": example["mask"]}, seq_len))


def padded_batches(builders: Sequence[tfds.core.DatasetBuilder], batch_size: int, seq_len: int,
                   *, split: str = "train", seed: int = 0) -> Iterator[dict]:
  """Endless shuffled batches of the prepared ``builders``' ``split``, mixed and right-padded.

  Yields ``{"tokens": int32[batch_size, seq_len + 1], "weights": float32[batch_size, seq_len]}``
  (a ``grain.DatasetIterator``: ``get_state`` / ``set_state`` resume it). Each epoch is a fresh
  permutation of all the examples drawn from ``seed`` and the epoch number.
  """
  dataset = _padded_source(builders, split, seq_len).shuffle(seed).repeat()
  return iter(dataset.batch(batch_size, drop_remainder=True)
              .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))


def padded_examples(builder: tfds.core.DatasetBuilder, split: str = "test",
                    seq_len: int | None = None) -> dict[str, np.ndarray]:
  """Every example of ``split`` in stored order, stacked: ``tokens``, ``weights`` and the
  builder's other features (``depth`` ... for passkey), right-padded to ``seq_len`` (default: the
  builder's own)."""
  seq_len = builder.builder_config.seq_len if seq_len is None else seq_len
  source = builder.as_data_source(split=split)
  examples = [pad_example(source[i], seq_len) for i in range(len(source))]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


__all__ = ["FILLER_ID", "Mqar", "MqarConfig", "Passkey", "PasskeyConfig", "mqar_config",
           "mqar_example", "pad_example", "padded_batches", "padded_examples", "passkey_config",
           "passkey_example", "passkey_overhead", "prepare"]
