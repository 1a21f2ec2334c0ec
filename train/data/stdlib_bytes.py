"""``stdlib_bytes``: a TFDS dataset of source files read as raw bytes, built offline.

By default the dataset holds the ``.py`` files of the Python standard library that runs the
build (``sysconfig.get_paths()["stdlib"]``), so it can be prepared on any machine without a
network. Another directory can be given with ``StdlibBytes(source_dir=...)`` (tests build from a
small temporary tree).

Documents
  One example per ``.py`` file under the source directory, found by walking it without following
  symbolic links. Directories named ``site-packages`` or ``dist-packages`` (third-party code) and
  ``test``, ``tests`` or ``idle_test`` (the standard library's own test suites) are skipped, as is
  ``__pycache__``. The test suites are left out on purpose: many distributions do not install
  them, so leaving them out keeps the default dataset the same between installs of one Python
  version, and they hold deliberately malformed sources (bad encodings, syntax errors). The
  standard library of Python 3.11 gives about 730 files and 12 MB this way.

Features
  ``text``: the file's bytes, unchanged (not decoded, so any encoding round-trips exactly).
  ``path``: the file's path relative to the source directory, with ``/`` separators.
  Both read back from ``tfds.data_source`` as Python ``bytes``.

Splits
  ``validation`` holds a document iff the first 8 bytes of the SHA-256 of its relative path,
  read as a big-endian integer, are below ``VALIDATION_PER_MILLE / 1000`` of the range (about
  2% of the documents); ``train`` holds all the others. The split therefore depends only on each
  document's own path: it is the same on every machine and for any order in which the file
  system lists the files, and no document is in both splits. TFDS stores the examples of a split
  in an order fixed by their keys (the relative paths), so the stored order is also independent
  of the listing order. A split that would be empty (only possible for a tiny ``source_dir``) is
  left out, as TFDS cannot write a split without examples.

Records are written as ``array_record`` files, which ``tfds.data_source`` reads with random
access. Building needs neither TensorFlow nor Apache Beam.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sysconfig

import tensorflow_datasets as tfds
from etils import epath

NAME = "stdlib_bytes"
VALIDATION_PER_MILLE = 20
SKIPPED_DIRECTORIES = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def default_source_dir() -> pathlib.Path:
  """The standard library directory of the running Python."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def is_validation(relative_path: str) -> bool:
  """Whether the document at ``relative_path`` (``/``-separated) belongs to ``validation``."""
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") < VALIDATION_PER_MILLE * 2**64 // 1000


def list_source_files(source_dir: pathlib.Path) -> list[str]:
  """Relative ``/``-separated paths of the ``.py`` files that make the dataset, sorted."""
  paths = []
  for directory, subdirectories, files in os.walk(source_dir):
    subdirectories[:] = [d for d in subdirectories if d not in SKIPPED_DIRECTORIES]
    relative_directory = pathlib.Path(directory).relative_to(source_dir)
    paths.extend((relative_directory / name).as_posix() for name in files if name.endswith(".py"))
  return sorted(paths)


class StdlibBytes(tfds.core.GeneratorBasedBuilder):
  """Byte-level text of local ``.py`` files; see the module docstring for the full description.

  Args:
    source_dir: directory to read; None means the running Python's standard library.
    **kwargs: passed to ``tfds.core.GeneratorBasedBuilder`` (``data_dir``, ...). The file format
      defaults to ``array_record``.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: one example per file, 2% validation by path hash."}
  # TFDS 4.9.10 works this path out with `importlib_resources`, which it declares as a dependency
  # only for Python < 3.9, so `download_and_prepare` fails where that package is not installed.
  # Nothing is read next to this file (there are no download checksums): give the path directly.
  code_path = epath.Path(__file__)

  def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)
    self._source_dir = pathlib.Path(source_dir) if source_dir else default_source_dir()
    # TFDS pickles a builder as the keyword arguments that re-create it (as its own
    # ReadOnlyBuilder does); keep source_dir among them.
    self._original_state = dict(self._original_state, source_dir=source_dir)

  @property
  def source_dir(self) -> pathlib.Path:
    return self._source_dir

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Python source files as raw bytes, one example per file; by default the standard "
            "library of the Python that prepared it, without test suites or site-packages. "
            f"validation: about {VALIDATION_PER_MILLE / 10:g}% of the files, chosen by a "
            "SHA-256 of the relative path."),
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(doc="The file's bytes, not decoded."),
            "path": tfds.features.Text(doc="Path relative to the source directory."),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    if not self._source_dir.is_dir():
      raise FileNotFoundError(f"{NAME}: source_dir {str(self._source_dir)!r} is not a directory")
    paths = list_source_files(self._source_dir)
    if not paths:
      raise ValueError(f"{NAME}: source_dir {str(self._source_dir)!r} holds no .py files")
    splits = {"train": [p for p in paths if not is_validation(p)],
              "validation": [p for p in paths if is_validation(p)]}
    # TFDS cannot write a split without examples; only a tiny source_dir leaves one empty.
    return {name: self._generate_examples(split) for name, split in splits.items() if split}

  def _generate_examples(self, paths: list[str]):
    for path in paths:
      yield path, {"text": (self._source_dir / path).read_bytes(), "path": path}
