"""Training data: byte-level text from TFDS, packed into fixed-length rows and read with grain.

Public API (all arrays are ``numpy.int32`` token ids in ``[0, 255]``; ``B = batch_size //
process_count`` rows of ``L = config.seq_len + 1`` tokens; a model's inputs and targets are
``batch[:, :-1]`` and ``batch[:, 1:]``):

``prepare(config)``
  Builds ``stdlib_bytes`` (the Python standard library's sources, offline) into
  ``config.data_dir`` if it is not prepared there; for any other dataset only checks that it is
  prepared. Nothing is downloaded.
``train_iterator(config, batch_size, *, process_index=0, process_count=1)``
  Endless ``int32[B, L]`` batches of ``config.train_split``, shuffled per epoch from
  ``config.shuffle_seed``; a ``grain.DatasetIterator`` with JSON-serialisable
  ``get_state()`` / ``set_state()``, so training resumes mid-epoch on exactly the next batch.
``eval_batches(config, batch_size, num_batches, *, process_index=0, process_count=1)``
  A list of ``num_batches`` ``int32[B, L]`` batches of ``config.eval_split``, the same on every
  call.

Each document is ``BOS_ID`` (byte 0) followed by its bytes; documents are joined and cut into
rows without padding. ``batch_size`` is global: each host gets a disjoint share of the documents
and the global batch is the concatenation of the host batches in process order. See
``train.data.pipeline`` and ``train.data.stdlib_bytes`` for the details.

Checkpointing the iterator with Orbax (orbax-checkpoint 0.12): grain registers its handler with
``ocp.args``, so a ``CheckpointManager`` saves and restores the iterator next to the train state::

  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(train_state),
      data=train.data.CheckpointSave(iterator)))
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_train_state),
      data=train.data.CheckpointRestore(iterator)))  # Sets iterator's state in place.

Each host writes ``process_<i>-of-<n>.json`` with ``i, n`` from ``jax.process_index()`` /
``jax.process_count()``. Restore into an iterator made with the same config, batch size and host
layout.
"""

from grain.checkpoint import CheckpointRestore, CheckpointSave

from train.data.packing import BOS_ID
from train.data.pipeline import eval_batches, prepare, train_iterator
from train.data.stdlib_bytes import StdlibBytes

__all__ = [
    "BOS_ID",
    "CheckpointRestore",
    "CheckpointSave",
    "StdlibBytes",
    "eval_batches",
    "prepare",
    "train_iterator",
]
