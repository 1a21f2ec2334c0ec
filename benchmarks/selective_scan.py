"""Selective-scan benchmark: the "reference" and "xla" forms, forward and forward+backward.

Each case is compiled once (``jax.jit(...).lower(...).compile()``), warmed up, then timed over
several calls with ``block_until_ready``; the table gives the median. ``temp MiB`` is the
compiled program's scratch memory (``memory_analysis().temp_size_in_bytes``), the part of the
peak that the form and the chunk size decide. Inputs follow the Mamba block: softplus on
``delta + delta_bias``, D skip and SiLU(z) gate, ``A = -exp(A_log)`` with S4D-real ``A_log``.

  python -m benchmarks.selective_scan                                   # CPU-friendly sizes
  python -m benchmarks.selective_scan --sizes B2,L4096,D2048,N16 --dtype bfloat16   # a GPU
  python -m benchmarks.selective_scan --chunk-sweep --chunks 16 32 64 128 256
  python -m benchmarks.selective_scan --json results.json

A size is ``B<batch>,L<time>,D<channels>,N<state>`` with an optional ``,G<groups>`` for
grouped B and C (default: one group, B and C of shape [batch, time, state]).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ops.selective_scan import selective_scan

DEFAULT_SIZES = ("B2,L1024,D256,N16", "B1,L4096,D256,N16", "B2,L1024,D512,N16")
DEFAULT_CHUNKS = (16, 32, 64, 128, 256)
IMPLEMENTATIONS = ("reference", "xla")
PASSES = ("fwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Size:
  """Problem size: batch, time, channels, state and the number of B/C groups (0: no group axis)."""

  batch: int
  time: int
  channels: int
  state: int
  groups: int = 0

  @classmethod
  def parse(cls, text: str) -> Size:
    """Reads ``B2,L1024,D256,N16`` (``,G4`` optional); separators may be commas or colons."""
    fields = dict(re.findall(r"([BLDNG])(\d+)", text.upper()))
    if not {"B", "L", "D", "N"} <= fields.keys():
      raise argparse.ArgumentTypeError(f"size {text!r}: expected B<b>,L<t>,D<d>,N<n>[,G<g>]")
    return cls(int(fields["B"]), int(fields["L"]), int(fields["D"]), int(fields["N"]),
               int(fields.get("G", 0)))

  def __str__(self) -> str:
    text = f"B{self.batch} L{self.time} D{self.channels} N{self.state}"
    return text + (f" G{self.groups}" if self.groups else "")


def make_inputs(size: Size, dtype, seed: int = 0) -> dict:
  """Random Mamba-like arguments of ``selective_scan`` (activations in ``dtype``)."""
  rng = np.random.default_rng(seed)
  b, t, d, n = size.batch, size.time, size.channels, size.state
  bc_shape = (b, t, size.groups, n) if size.groups else (b, t, n)
  normal = lambda shape: jnp.asarray(rng.standard_normal(shape), dtype)
  dt_init = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), d))  # SPEC 1.4 dt_proj.bias init
  return dict(
      u=normal((b, t, d)), delta=normal((b, t, d)) * 0.1,
      A=-jnp.tile(jnp.arange(1, n + 1, dtype=jnp.float32), (d, 1)),
      B=normal(bc_shape), C=normal(bc_shape), D=jnp.ones((d,), jnp.float32),
      z=normal((b, t, d)), delta_bias=jnp.asarray(dt_init + np.log(-np.expm1(-dt_init)),
                                                  jnp.float32))


def scan_fn(implementation: str, chunk_size: int | None, backward: bool) -> Callable:
  """``f(inputs, cotangent)``: the scan's output, or with ``backward`` the gradients of all inputs.

  The backward differentiates ``<out, cotangent>`` (one vjp with a fixed random cotangent).
  """
  options = dict(delta_softplus=True, implementation=implementation)
  if chunk_size is not None:
    options["chunk_size"] = chunk_size

  def forward(inputs, cotangent):
    del cotangent
    return selective_scan(**inputs, **options)

  def forward_backward(inputs, cotangent):
    loss = lambda x: jnp.vdot(forward(x, None).astype(jnp.float32), cotangent)
    return jax.grad(loss)(inputs)

  return forward_backward if backward else forward


def measure(fn: Callable, args: Sequence, warmup: int, iters: int) -> dict:
  """Compiles ``fn`` for ``args`` and times it: median and min milliseconds, temp bytes."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return dict(median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times),
              compile_s=compile_s,
              temp_bytes=getattr(memory, "temp_size_in_bytes", None) if memory else None)


def run(sizes: Sequence[Size], variants: Sequence[tuple[str, int | None]], dtype, warmup: int,
        iters: int) -> list[dict]:
  """One record per size, (implementation, chunk_size) variant and pass."""
  records = []
  for size in sizes:
    inputs = make_inputs(size, dtype)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(
        (size.batch, size.time, size.channels)), jnp.float32)
    for implementation, chunk_size in variants:
      for pass_name in PASSES:
        fn = scan_fn(implementation, chunk_size, backward=pass_name == "fwd+bwd")
        result = measure(fn, (inputs, cotangent), warmup, iters)
        records.append({
            "size": str(size), "implementation": implementation, "chunk_size": chunk_size,
            "pass": pass_name,
            "tokens_per_s": size.batch * size.time / (result["median_ms"] / 1e3), **result})
        print(format_row(records[-1]), flush=True)
  return records


COLUMNS = (  # (header, width, record -> text)
    ("size", 24, lambda r: r["size"]),
    ("impl", 9, lambda r: r["implementation"]),
    ("chunk", 5, lambda r: "-" if r["chunk_size"] is None else str(r["chunk_size"])),
    ("pass", 7, lambda r: r["pass"]),
    ("median ms", 10, lambda r: f"{r['median_ms']:.2f}"),
    ("min ms", 9, lambda r: f"{r['min_ms']:.2f}"),
    ("Mtok/s", 8, lambda r: f"{r['tokens_per_s'] / 1e6:.3f}"),
    ("temp MiB", 9, lambda r: "-" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"),
    ("compile s", 9, lambda r: f"{r['compile_s']:.1f}"),
)


def format_header() -> str:
  """The table's header line."""
  return " ".join(header.rjust(width) for header, width, _ in COLUMNS)


def format_row(record: dict) -> str:
  """One table line."""
  return " ".join(text(record).rjust(width) for _, width, text in COLUMNS)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", nargs="+", type=Size.parse,
                      default=[Size.parse(s) for s in DEFAULT_SIZES],
                      help="sizes like B2,L4096,D2048,N16 (optional ,G<groups>)")
  parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS,
                      default=list(IMPLEMENTATIONS))
  parser.add_argument("--chunk-sweep", action="store_true",
                      help='time the "xla" form for each of --chunks instead')
  parser.add_argument("--chunks", nargs="+", type=int, default=list(DEFAULT_CHUNKS))
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="dtype of u, delta, z, B and C (the scan runs in float32)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--json", metavar="PATH", help="also write the records as JSON")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  variants = ([("xla", c) for c in args.chunks] if args.chunk_sweep
              else [(i, None) for i in args.implementations])
  device = jax.devices()[0]
  print(f"# selective_scan on {device.platform} ({device.device_kind}), jax {jax.__version__}, "
        f"dtype {args.dtype}, median of {args.iters} calls after {args.warmup} warm-up")
  print(format_header())
  records = run(args.sizes, variants, jnp.dtype(args.dtype), args.warmup, args.iters)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(platform=device.platform, device_kind=device.device_kind,
                     jax_version=jax.__version__, dtype=args.dtype, records=records), f, indent=1)
  return records


if __name__ == "__main__":
  main()
