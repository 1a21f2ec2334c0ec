"""Byte tokens and packing of a document stream into fixed-length sequences.

Token ids are the bytes themselves, 0..255. Each document is preceded by ``BOS_ID`` (byte 0,
which does not occur in Python source text), so the stream is
``BOS doc_0 BOS doc_1 BOS doc_2 ...`` and a model sees where each document starts.
``PackIterDataset`` cuts that stream into consecutive, non-overlapping pieces of equal length:
no padding, no reordering, documents run on across piece boundaries.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

BOS_ID = 0
_NO_TOKENS = np.empty(0, np.int32)


def document_tokens(example: dict[str, Any], text_key: str) -> np.ndarray:
  """Token ids of one document: ``int32[1 + num_bytes]``, ``BOS_ID`` then the text's bytes.

  ``example[text_key]`` may be ``bytes`` (how TFDS returns text features) or ``str`` (encoded
  as UTF-8).
  """
  text = example[text_key]
  if isinstance(text, str):
    text = text.encode("utf-8")
  if not isinstance(text, bytes):
    raise TypeError(f"DataConfig.text_key {text_key!r}: expected a text or bytes feature, got "
                    f"a value of type {type(text).__name__}")
  tokens = np.empty(1 + len(text), np.int32)
  tokens[0] = BOS_ID
  tokens[1:] = np.frombuffer(text, np.uint8)
  return tokens


class PackIterDataset(grain.IterDataset):
  """Concatenates 1-D int32 token arrays and yields consecutive ``int32[length]`` pieces.

  The tail of the stream that does not fill a piece is dropped when the parent ends.
  """

  def __init__(self, parent: grain.IterDataset, length: int):
    super().__init__(parent)
    if length < 1:
      raise ValueError(f"length: expected an integer >= 1, got {length}")
    self._length = length

  def __iter__(self) -> "PackDatasetIterator":
    return PackDatasetIterator(self._parent.__iter__(), self._length)

  def __str__(self) -> str:
    return f"PackIterDataset(length={self._length})"


class PackDatasetIterator(grain.DatasetIterator):
  """Iterator of ``PackIterDataset``.

  Its state is ``{"parent": <parent state before the current document>, "offset": <tokens of
  that document already emitted>}``, JSON-serialisable when the parent's is. Restoring re-reads
  the current document from the parent, so no tokens are stored in the state.
  """

  def __init__(self, parent: grain.DatasetIterator, length: int):
    super().__init__(parent)
    self._length = length
    self._document_state = self._parent.get_state()
    self._document = _NO_TOKENS
    self._offset = 0

  def __next__(self) -> np.ndarray:
    piece = np.empty(self._length, np.int32)
    filled = 0
    while filled < self._length:
      if self._offset == len(self._document):
        state = self._parent.get_state()
        self._document = next(self._parent)
        self._document_state, self._offset = state, 0
      take = min(self._length - filled, len(self._document) - self._offset)
      piece[filled:filled + take] = self._document[self._offset:self._offset + take]
      filled += take
      self._offset += take
    return piece

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._document_state, "offset": self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._document_state = state["parent"]
    self._parent.set_state(self._document_state)
    self._document = next(self._parent, _NO_TOKENS)  # No tokens: the parent was empty.
    self._offset = state["offset"]

  def __str__(self) -> str:
    return f"PackDatasetIterator(length={self._length})"
