"""Preparing a TFDS text dataset and reading it as packed batches of byte tokens with grain.

Reading order
  The split's documents are read by random access (``array_record`` through
  ``builder.as_data_source``, which is what ``tfds.data_source`` returns) in epochs. For training,
  each epoch's document order is a permutation drawn from ``DataConfig.shuffle_seed`` and the epoch
  number (grain's ``shuffle``, seeded per epoch with ``derived_seed + epoch`` where
  ``derived_seed`` is a 32-bit value drawn from ``shuffle_seed``, so runs with nearby seeds do not
  share epochs); epochs follow each other without end. For evaluation the documents are read in
  their stored order, cycling when more tokens are asked for than the split holds.

Hosts
  The endless sequence of documents is dealt round-robin to the hosts: host ``p`` of ``P`` reads
  documents ``p, p + P, p + 2P, ...`` of it, so hosts read disjoint documents and together read
  every document of each epoch once. Each host packs its own documents into its own stream, and
  the global batch is the concatenation of the host batches in process order.

Packing
  Each document becomes ``BOS_ID`` followed by its bytes, documents are joined in reading order,
  and the stream is cut into consecutive rows of ``seq_len + 1`` tokens (see ``packing``). A row is
  a contiguous slice of the host's stream and rows of a batch follow each other in it.

Workers
  With ``num_workers > 0`` documents are read and tokenised in that many processes
  (``mp_prefetch``), each taking every ``num_workers``-th document, and are put back in reading
  order before packing in the main process: the batches do not depend on ``num_workers``.

Resuming
  The training iterator is a ``grain.DatasetIterator``: ``get_state()`` returns a JSON-serialisable
  dict, and ``set_state(state)`` on an iterator made from the same config, batch size and host
  layout makes it yield exactly the batches that would have followed.
"""

from __future__ import annotations

import functools

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from train.config import DataConfig
from train.data import packing
from train.data import stdlib_bytes

# Documents are whole files, so two reading threads and a short read-ahead keep the packer fed;
# grain's default (16 threads, 500 documents) is several times slower on a 2-core machine.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


def prepare(config: DataConfig) -> None:
  """Makes sure ``config.dataset`` is prepared in ``config.data_dir`` (TFDS default when None).

  Builds ``stdlib_bytes`` from the standard library when it is not prepared yet. Any other dataset
  must have been prepared beforehand: this downloads nothing and raises ``FileNotFoundError``
  naming the dataset and the directory where it was looked for. With several hosts sharing
  ``data_dir``, call it on one host and let the others wait for it (a barrier) before reading.
  """
  builder = _builder(config)
  if builder.is_prepared():
    return
  if not isinstance(builder, stdlib_bytes.StdlibBytes):
    raise FileNotFoundError(
        f"DataConfig.dataset {config.dataset!r} is not prepared in {str(builder.data_path)!r} "
        f"(data_dir {config.data_dir!r}); only {stdlib_bytes.NAME!r} is built here, prepare "
        "other datasets with TFDS beforehand (file_format='array_record')")
  builder.download_and_prepare()


def train_iterator(config: DataConfig, batch_size: int, *, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
  """Endless, shuffled, resumable batches of ``config.train_split`` for one host.

  Args:
    config: the data configuration; the dataset must be prepared (see ``prepare``).
    batch_size: global batch size, a multiple of ``process_count``.
    process_index: this host's index in ``[0, process_count)``.
    process_count: number of hosts.

  Returns:
    A ``grain.DatasetIterator`` of ``numpy`` ``int32[batch_size // process_count,
    config.seq_len + 1]`` arrays of token ids in ``[0, 255]``, with ``get_state()`` /
    ``set_state()``. Close it (``close()``) when done if ``config.num_workers > 0``.
  """
  host_batch_size = _check_batching(config, batch_size, process_index, process_count)
  if not isinstance(config.shuffle_seed, int) or config.shuffle_seed < 0:
    raise ValueError(
        f"DataConfig.shuffle_seed: expected an integer >= 0, got {config.shuffle_seed!r}")
  if not isinstance(config.num_workers, int) or config.num_workers < 0:
    raise ValueError(
        f"DataConfig.num_workers: expected an integer >= 0, got {config.num_workers!r}")
  seed = int(np.random.SeedSequence(config.shuffle_seed).generate_state(1)[0])
  dataset = _packed_batches(config, config.train_split, host_batch_size, process_index,
                            process_count, seed=seed, num_workers=config.num_workers)
  return iter(dataset)


def eval_batches(config: DataConfig, batch_size: int, num_batches: int, *, process_index: int = 0,
                 process_count: int = 1) -> list[np.ndarray]:
  """The first ``num_batches`` batches of ``config.eval_split`` for one host, always the same.

  Documents are read in stored order without shuffling (cycling if the split is shorter than
  ``num_batches`` batches), in the main process whatever ``config.num_workers`` is.

  Returns:
    A list of ``num_batches`` ``numpy`` ``int32[batch_size // process_count, config.seq_len + 1]``
    arrays of token ids in ``[0, 255]``.
  """
  host_batch_size = _check_batching(config, batch_size, process_index, process_count)
  if not isinstance(num_batches, int) or num_batches < 0:
    raise ValueError(f"num_batches: expected an integer >= 0, got {num_batches!r}")
  dataset = _packed_batches(config, config.eval_split, host_batch_size, process_index,
                            process_count, seed=None, num_workers=0)
  iterator = iter(dataset)
  return [next(iterator) for _ in range(num_batches)]


def _check_batching(config: DataConfig, batch_size: int, process_index: int,
                    process_count: int) -> int:
  """Validates the arguments that shape a batch; returns the per-host batch size."""
  if not isinstance(config.seq_len, int) or config.seq_len < 1:
    raise ValueError(f"DataConfig.seq_len: expected an integer >= 1, got {config.seq_len!r}")
  if not isinstance(process_count, int) or process_count < 1:
    raise ValueError(f"process_count: expected an integer >= 1, got {process_count!r}")
  if not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index: expected an integer in [0, {process_count}), got {process_index!r}")
  if not isinstance(batch_size, int) or batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size: expected a positive multiple of process_count "
                     f"({process_count}), got {batch_size!r}")
  return batch_size // process_count


def _builder(config: DataConfig) -> tfds.core.DatasetBuilder:
  """The TFDS builder of ``config.dataset`` in ``config.data_dir``, without downloading."""
  try:
    return tfds.builder(config.dataset, data_dir=config.data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"DataConfig.dataset: unknown dataset {config.dataset!r}; expected "
        f"{stdlib_bytes.NAME!r}, another dataset registered with TFDS, or one prepared in "
        f"data_dir {config.data_dir!r}") from None


def _source(config: DataConfig, split: str):
  """Random-access source of ``split``: a sequence of dicts of features."""
  builder = _builder(config)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"DataConfig.dataset {config.dataset!r} is not prepared in {str(builder.data_path)!r}; "
        "call train.data.prepare(config) first")
  splits = builder.info.splits
  try:
    num_documents = splits[split].num_examples  # Also accepts TFDS slices such as "train[:10%]".
  except (KeyError, ValueError):
    raise ValueError(f"split {split!r} of dataset {config.dataset!r} does not exist; expected "
                     f"one of {sorted(splits)} or a TFDS slice of one") from None
  if num_documents == 0:
    raise ValueError(f"split {split!r} of dataset {config.dataset!r} holds no documents")
  features = builder.info.features
  if config.text_key not in features:
    raise ValueError(f"DataConfig.text_key: {config.text_key!r} is not a feature of dataset "
                     f"{config.dataset!r}; expected one of {sorted(features)}")
  return builder.as_data_source(split=split)


def _allow_unparsed_grain_profiling_flag() -> None:
  """Lets ``mp_prefetch`` start in a program that has not parsed absl flags.

  grain 0.2.18 reads ``--grain_enable_multiprocess_worker_profiling`` when starting worker
  processes and raises ``UnparsedFlagAccessError`` unless absl flags were parsed (grain issue
  #1355, fixed upstream by reading the default instead). Marking that one flag as given keeps its
  default value (False) and touches no other flag, as grain does itself for its debug flags.
  """
  name = "grain_enable_multiprocess_worker_profiling"
  if name in flags.FLAGS and not flags.FLAGS.is_parsed():
    flags.FLAGS[name].present = True


def _packed_batches(config: DataConfig, split: str, host_batch_size: int, process_index: int,
                    process_count: int, *, seed: int | None, num_workers: int) -> grain.IterDataset:
  """The pipeline described in the module docstring; ``seed`` None reads in stored order."""
  documents = grain.MapDataset.source(_source(config, split))
  if seed is not None:
    documents = documents.shuffle(seed)
  documents = documents.repeat()[process_index::process_count]
  tokens = documents.map(functools.partial(packing.document_tokens, text_key=config.text_key))
  tokens = tokens.to_iter_dataset(_READ_OPTIONS)
  if num_workers:
    _allow_unparsed_grain_profiling_flag()
    tokens = tokens.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  rows = packing.PackIterDataset(tokens, config.seq_len + 1)
  return rows.batch(host_batch_size, drop_remainder=True)


__all__ = ["prepare", "train_iterator", "eval_batches"]
