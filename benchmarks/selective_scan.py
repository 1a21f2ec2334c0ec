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
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from ops.selective_scan import selective_scan

DEFAULT_SIZES = ("B2,L1024,D256,N16", "B1,L4096,D256,N16", "B2,L1024,D512,N16")
DEFAULT_CHUNKS = (16, 32, 64, 128, 256)
IMPLEMENTATIONS = ("reference", "xla")
PASSES = harness.PASSES
TABLE = harness.Table((harness.SIZE, harness.IMPLEMENTATION, harness.CHUNK, harness.PASS,
                       *harness.TIMING))


@dataclasses.dataclass(frozen=True)
class Size(harness.Size):
  """Problem size: batch, time, channels, state and the number of B/C groups (0: no group axis)."""

  LETTERS = (("B", "batch"), ("L", "time"), ("D", "channels"), ("N", "state"), ("G", "groups"))
  batch: int
  time: int
  channels: int
  state: int
  groups: int = 0


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

  def forward(inputs, cotangent=None):
    del cotangent
    return selective_scan(**inputs, **options)

  return harness.with_backward(forward) if backward else forward


def cases(sizes: Sequence[Size], variants: Sequence[tuple[str, int | None]], dtype):
  """One case per size, (implementation, chunk_size) variant and pass."""
  for size in sizes:
    inputs = make_inputs(size, dtype)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(
        (size.batch, size.time, size.channels)), jnp.float32)
    for implementation, chunk_size in variants:
      for pass_name in PASSES:
        yield harness.Case(
            dict(size=str(size), implementation=implementation, chunk_size=chunk_size,
                 **{"pass": pass_name}),
            scan_fn(implementation, chunk_size, backward=pass_name == "fwd+bwd"),
            (inputs, cotangent), size.batch * size.time)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  harness.add_common_args(
      parser, Size, DEFAULT_SIZES, "sizes like B2,L4096,D2048,N16 (optional ,G<groups>)",
      IMPLEMENTATIONS, "dtype of u, delta, z, B and C (the scan runs in float32)")
  parser.add_argument("--chunk-sweep", action="store_true",
                      help='time the "xla" form for each of --chunks instead')
  parser.add_argument("--chunks", nargs="+", type=int, default=list(DEFAULT_CHUNKS))
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  variants = ([("xla", c) for c in args.chunks] if args.chunk_sweep
              else [(i, None) for i in args.implementations])
  print(harness.banner("selective_scan", args))
  print(TABLE.header())
  records = harness.run(cases(args.sizes, variants, jnp.dtype(args.dtype)), TABLE,
                        args.warmup, args.iters)
  harness.write_json(args.json, records, dtype=args.dtype)
  return records


if __name__ == "__main__":
  main()
