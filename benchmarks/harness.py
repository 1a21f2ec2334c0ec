"""What every op benchmark shares: sizes, compile-and-time, compiled memory, the table, JSON, CLI.

A benchmark script (``benchmarks/selective_scan.py``, ``benchmarks/kda.py``) defines only its
sizes (a ``Size`` subclass), its input maker and its forward / forward+backward functions, then
hands ``Case``s to ``run``. Each case is compiled once (``jax.jit(...).lower(...).compile()``),
warmed up, then timed (``time_calls``); a record keeps the median and min milliseconds per call,
the compile seconds and the compiled program's scratch memory
(``memory_analysis().temp_size_in_bytes``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import time
from typing import Any, Callable, ClassVar, Iterable, Sequence

import jax
import jax.numpy as jnp

PASSES = ("fwd", "fwd+bwd")


# ----------------------------------------------------------------------------------------- sizes

@dataclasses.dataclass(frozen=True)
class Size:
  """Base of a problem size written as letter-number fields, e.g. ``B2,L1024,D256,N16``.

  A subclass is a frozen dataclass of int fields and sets ``LETTERS``: one (letter, field name)
  pair per field, in the order they are printed. A field with a default is optional in the text
  and left out of ``str`` while it is 0.
  """

  LETTERS: ClassVar[tuple[tuple[str, str], ...]] = ()

  @classmethod
  def parse(cls, text: str):
    """Reads e.g. ``B2,L1024,D256,N16``; any separator (comma, colon, space) works."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    letters = "".join(letter for letter, _ in cls.LETTERS)
    found = dict(re.findall(rf"([{letters}])(\d+)", text.upper()))
    required = [letter for letter, name in cls.LETTERS
                if fields[name].default is dataclasses.MISSING]
    if not set(required) <= found.keys():
      pattern = "".join(f",{letter}<{name}>" if letter in required else f"[,{letter}<{name}>]"
                        for letter, name in cls.LETTERS).lstrip(",")
      raise argparse.ArgumentTypeError(f"size {text!r}: expected {pattern}")
    return cls(**{name: int(found[letter]) for letter, name in cls.LETTERS if letter in found})

  def __str__(self) -> str:
    fields = {f.name: f for f in dataclasses.fields(self)}
    return " ".join(f"{letter}{getattr(self, name)}" for letter, name in self.LETTERS
                    if fields[name].default is dataclasses.MISSING or getattr(self, name))


# ------------------------------------------------------------------------------- the functions

def with_backward(forward: Callable) -> Callable:
  """``f(inputs, cotangents)``: the gradients wrt every leaf of ``inputs`` of
  ``sum_i <forward(inputs)_i, cotangents_i>`` (float32 inner products, one per output leaf).

  ``forward(inputs)`` returns an array or a pytree; ``cotangents`` has the same structure.
  """

  def loss(inputs, cotangents):
    outputs = forward(inputs)
    pairs = zip(jax.tree.leaves(outputs), jax.tree.leaves(cotangents), strict=True)
    return sum(jnp.vdot(out.astype(jnp.float32), cot) for out, cot in pairs)

  return jax.grad(loss)


# ------------------------------------------------------------------------ compiling and timing

def compile_fn(fn: Callable, args: Sequence, donate_argnums: Sequence[int] = ()
               ) -> tuple[Any, float]:
  """``jax.jit(fn)`` lowered and compiled for ``args``; returns (compiled, seconds taken).
  ``donate_argnums``: arguments whose buffers the call may reuse for its outputs."""
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=tuple(donate_argnums)).lower(*args).compile()
  return compiled, time.perf_counter() - start


def memory_bytes(compiled) -> dict:
  """The compiled program's memory: temp (scratch), argument, output and alias bytes.

  Values are None where the backend gives no analysis. Needs no execution.
  """
  memory = compiled.memory_analysis()
  return {f"{kind}_bytes": getattr(memory, f"{kind}_size_in_bytes", None) if memory else None
          for kind in ("temp", "argument", "output", "alias")}


CALLS_PER_SAMPLE = 5


def time_calls(compiled, args: Sequence, warmup: int, iters: int,
               calls_per_sample: int = CALLS_PER_SAMPLE) -> dict:
  """Median and min milliseconds per call of ``compiled(*args)``, after ``warmup`` calls.

  Each of the ``iters`` samples dispatches ``calls_per_sample`` calls back to back and waits for
  the last, as a training loop does: the device time, without the host's wait on each result (a
  call timed alone with ``block_until_ready`` was 0.25-0.6 ms longer on the H200, for the Pallas
  scan and for XLA alike; docs/BENCHMARKS.md).
  """
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    for _ in range(calls_per_sample):
      out = compiled(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls_per_sample)
  return dict(median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times))


def measure(fn: Callable, args: Sequence, warmup: int, iters: int) -> dict:
  """Compiles ``fn`` for ``args`` and times it (``time_calls``): median and min milliseconds,
  compile seconds, temp bytes."""
  compiled, compile_s = compile_fn(fn, args)
  temp_bytes = memory_bytes(compiled)["temp_bytes"]
  return dict(time_calls(compiled, args, warmup, iters), compile_s=compile_s,
              temp_bytes=temp_bytes)


@dataclasses.dataclass(frozen=True)
class Case:
  """One thing to time: ``fn(*args)``, over ``tokens`` tokens, labelled by ``fields``."""

  fields: dict  # e.g. size, implementation, chunk_size, pass: copied into the record
  fn: Callable
  args: tuple
  tokens: int


def run(cases: Iterable[Case], table: Table, warmup: int, iters: int) -> list[dict]:
  """Times each case; prints its table row as soon as it is measured; returns the records."""
  records = []
  for case in cases:
    result = measure(case.fn, case.args, warmup, iters)
    records.append({**case.fields,
                    "tokens_per_s": case.tokens / (result["median_ms"] / 1e3), **result})
    print(table.row(records[-1]), flush=True)
  return records


# ------------------------------------------------------------------------------------ the table

def mib(value) -> str:
  """Bytes as MiB with one decimal, or "-" for None."""
  return "-" if value is None else f"{value / 2**20:.1f}"


@dataclasses.dataclass(frozen=True)
class Column:
  header: str
  width: int
  text: Callable[[dict], str]  # record -> cell


SIZE = Column("size", 24, lambda r: r["size"])
IMPLEMENTATION = Column("impl", 9, lambda r: r["implementation"])
CHUNK = Column("chunk", 5, lambda r: "-" if r["chunk_size"] is None else str(r["chunk_size"]))
PASS = Column("pass", 7, lambda r: r["pass"])
TIMING = (
    Column("median ms", 10, lambda r: f"{r['median_ms']:.2f}"),
    Column("min ms", 9, lambda r: f"{r['min_ms']:.2f}"),
    Column("Mtok/s", 8, lambda r: f"{r['tokens_per_s'] / 1e6:.3f}"),
    Column("temp MiB", 9, lambda r: mib(r["temp_bytes"])),
    Column("compile s", 9, lambda r: f"{r['compile_s']:.1f}"),
)


@dataclasses.dataclass(frozen=True)
class Table:
  """Fixed-width text table, one right-aligned cell per column."""

  columns: tuple[Column, ...]

  def header(self) -> str:
    return " ".join(c.header.rjust(c.width) for c in self.columns)

  def row(self, record: dict) -> str:
    return " ".join(c.text(record).rjust(c.width) for c in self.columns)


# -------------------------------------------------------------------------------- CLI and JSON

def add_common_args(parser: argparse.ArgumentParser, size_type: type[Size],
                    default_sizes: Sequence[str], size_help: str,
                    implementations: Sequence[str], dtype_help: str) -> None:
  """--sizes, --implementations, --dtype, --warmup, --iters and --json."""
  parser.add_argument("--sizes", nargs="+", type=size_type.parse,
                      default=[size_type.parse(s) for s in default_sizes], help=size_help)
  parser.add_argument("--implementations", nargs="+", choices=implementations,
                      default=list(implementations))
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help=dtype_help)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--json", metavar="PATH", help="also write the records as JSON")


def banner(name: str, args: argparse.Namespace) -> str:
  """The comment line above a timing table: op, device, jax version, dtype, timing protocol.

  Names OPENBLAS_NUM_THREADS when set: on CPU, jaxlib's LAPACK calls (e.g. the triangular solve
  of the KDA chunk form) run in OpenBLAS, whose threads stall under a busy machine.
  """
  device = jax.devices()[0]
  threads = os.environ.get("OPENBLAS_NUM_THREADS")
  return (f"# {name} on {device.platform} ({device.device_kind}), jax {jax.__version__}, "
          f"dtype {args.dtype}, median of {args.iters} samples of {CALLS_PER_SAMPLE} calls "
          f"(back to back) after {args.warmup} warm-up"
          + (f", OPENBLAS_NUM_THREADS={threads}" if threads else ""))


def write_json(path: str | None, records: list[dict], **extra) -> None:
  """Writes ``{platform, device_kind, jax_version, **extra, records}`` when ``path`` is set
  (plus ``openblas_num_threads`` when that variable is set)."""
  if not path:
    return
  device = jax.devices()[0]
  threads = os.environ.get("OPENBLAS_NUM_THREADS")
  with open(path, "w") as f:
    json.dump(dict(platform=device.platform, device_kind=device.device_kind,
                   jax_version=jax.__version__, **extra,
                   **({"openblas_num_threads": threads} if threads else {}), records=records),
              f, indent=1)
