"""KDA benchmark: the "reference" and "xla" forms of ``ops.kda.kda``, forward and forward+backward.

Each case is compiled once, warmed up, then timed over several calls (``benchmarks.harness``);
the table gives the median. ``temp MiB`` is the compiled program's scratch memory
(``memory_analysis().temp_size_in_bytes``). Inputs follow fla's KDA tests (SPEC 6): q, k, v
~ U(0, 1), ``g = logsigmoid(N(0, 1))`` (float32), ``beta = sigmoid(N(0, 1))``, an N(0, 1) float32
initial state, ``use_qk_l2norm_in_kernel=True``. The backward differentiates
``sum(o * do) + sum(final_state * dht)`` with fixed random cotangents, wrt q, k, v, g, beta and
the initial state.

  python -m benchmarks.kda                                               # CPU-friendly sizes
  python -m benchmarks.kda --sizes B4,T8192,H16,K128,V128 --dtype bfloat16   # a GPU
  python -m benchmarks.kda --memory                  # compiled scratch bytes, B2 T8192 H4 K=V=64
  python -m benchmarks.kda --json results.json

A size is ``B<batch>,T<time>,H<heads>,K<key dim>,V<value dim>``. ``--memory`` compiles without
running and also covers "xla-noremat": the chunkwise form with ``ops.kda.chunk.scan(...,
remat=False)``, i.e. plain autodiff that keeps every chunk's intermediates.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from ops.kda import _prepare, chunk, kda  # _prepare: the op's own preprocessing

DEFAULT_SIZES = ("B1,T1024,H2,K64,V64", "B2,T2048,H4,K64,V64")
MEMORY_SIZES = ("B2,T8192,H4,K64,V64",)
IMPLEMENTATIONS = ("reference", "xla")
NO_REMAT = "xla-noremat"  # the chunkwise form without per-chunk rematerialisation
FORMS = IMPLEMENTATIONS + (NO_REMAT,)
DEFAULT_CHUNK = 64  # ops.kda.kda's default chunk_size
PASSES = harness.PASSES
TIMING_TABLE = harness.Table((harness.SIZE, harness.IMPLEMENTATION, harness.CHUNK, harness.PASS,
                              *harness.TIMING))
MEMORY_TABLE = harness.Table((
    harness.SIZE, harness.Column("form", 11, lambda r: r["implementation"]), harness.CHUNK,
    harness.PASS,
    harness.Column("temp MiB", 9, lambda r: harness.mib(r["temp_bytes"])),
    harness.Column("arg MiB", 8, lambda r: harness.mib(r["argument_bytes"])),
    harness.Column("out MiB", 8, lambda r: harness.mib(r["output_bytes"])),
    harness.Column("compile s", 9, lambda r: f"{r['compile_s']:.1f}"),
))


@dataclasses.dataclass(frozen=True)
class Size(harness.Size):
  """Problem size: batch, time, heads (q, k and v alike), key and value head dims."""

  LETTERS = (("B", "batch"), ("T", "time"), ("H", "heads"), ("K", "key"), ("V", "value"))
  batch: int
  time: int
  heads: int
  key: int
  value: int


def make_inputs(size: Size, dtype, seed: int = 0) -> dict:
  """fla-test-like arguments of ``kda``: q, k, v, beta in ``dtype``; g, initial_state float32."""
  rng = np.random.default_rng(seed)
  b, t, h, dk, dv = size.batch, size.time, size.heads, size.key, size.value
  return dict(
      q=jnp.asarray(rng.uniform(size=(b, t, h, dk)), dtype),
      k=jnp.asarray(rng.uniform(size=(b, t, h, dk)), dtype),
      v=jnp.asarray(rng.uniform(size=(b, t, h, dv)), dtype),
      g=jax.nn.log_sigmoid(jnp.asarray(rng.standard_normal((b, t, h, dk)), jnp.float32)),
      beta=jax.nn.sigmoid(jnp.asarray(rng.standard_normal((b, t, h)), jnp.float32)).astype(dtype),
      initial_state=jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32))


def make_cotangents(size: Size, seed: int = 1) -> tuple:
  """Fixed random float32 (do [B, T, H, V], dht [B, H, K, V])."""
  rng = np.random.default_rng(seed)
  b, t, h, dk, dv = size.batch, size.time, size.heads, size.key, size.value
  return (jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32),
          jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32))


def _xla_without_remat(q, k, v, g, beta, initial_state, chunk_size):
  """``kda(..., implementation="xla")`` with ``chunk.scan(remat=False)``: the op's preprocessing
  (``ops.kda._prepare``: float32, L2 norm, scale) then the chunk scan under plain autodiff."""
  H, HV, K = q.shape[-2], v.shape[-2], q.shape[-1]
  inputs = _prepare(q, k, v, g, beta, H, HV, K, None, True)
  o, final_state = chunk.scan(*inputs, initial_state, None, chunk_size=chunk_size, remat=False)
  return o.astype(v.dtype), final_state


def kda_fn(form: str, chunk_size: int | None, backward: bool) -> Callable:
  """``f(inputs, cotangents)``: (o, final state), or with ``backward`` the gradients of all
  inputs of ``sum(o * do) + sum(final_state * dht)``."""

  def forward(inputs, cotangents=None):
    del cotangents
    if form == NO_REMAT:
      return _xla_without_remat(**inputs, chunk_size=chunk_size)
    options = {} if chunk_size is None else dict(chunk_size=chunk_size)
    return kda(**inputs, return_final_state=True, use_qk_l2norm_in_kernel=True,
               implementation=form, **options)

  return harness.with_backward(forward) if backward else forward


def cases(sizes: Sequence[Size], forms: Sequence[str], chunk_size: int, dtype,
          passes: Sequence[str] = PASSES):
  """One case per size, form and pass."""
  for size in sizes:
    args = (make_inputs(size, dtype), make_cotangents(size))
    for form in forms:
      chunk = None if form == "reference" else chunk_size
      for pass_name in passes:
        yield harness.Case(
            {"size": str(size), "implementation": form, "chunk_size": chunk, "pass": pass_name},
            kda_fn(form, chunk, backward=pass_name == "fwd+bwd"), args, size.batch * size.time)


def memory(cases_: Iterable[harness.Case], table: harness.Table) -> list[dict]:
  """Compiles each case (no execution) and records its memory analysis; prints a row each."""
  records = []
  for case in cases_:
    compiled, compile_s = harness.compile_fn(case.fn, case.args)
    records.append({**case.fields, **harness.memory_bytes(compiled), "compile_s": compile_s})
    print(table.row(records[-1]), flush=True)
  return records


def state_bytes(size: Size, chunk_size: int) -> dict:
  """float32 bytes of every token's state and of one state per chunk, for scale."""
  one = size.batch * size.heads * size.key * size.value * 4
  return dict(all_states_bytes=one * size.time,
              chunk_states_bytes=one * -(-size.time // chunk_size))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  harness.add_common_args(
      parser, Size, (), "sizes like B4,T8192,H16,K128,V128 (default: CPU sizes; with --memory "
      f"{' '.join(MEMORY_SIZES)})", FORMS, "dtype of q, k, v and beta (g and the states are "
      "float32; the op runs in float32)")
  parser.set_defaults(sizes=None, implementations=None)
  parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                      help='chunk_size of the "xla" forms')
  parser.add_argument("--memory", action="store_true",
                      help="report compiled memory (temp, argument, output bytes) of every form "
                      "instead of timing; nothing runs")
  args = parser.parse_args(argv)
  if args.sizes is None:
    args.sizes = [Size.parse(s) for s in (MEMORY_SIZES if args.memory else DEFAULT_SIZES)]
  if args.implementations is None:
    args.implementations = list(FORMS if args.memory else IMPLEMENTATIONS)
  return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  cases_ = cases(args.sizes, args.implementations, args.chunk_size, dtype)
  if args.memory:
    device = jax.devices()[0]
    print(f"# kda compiled memory on {device.platform} ({device.device_kind}), "
          f"jax {jax.__version__}, dtype {args.dtype}")
    for size in args.sizes:
      scale = state_bytes(size, args.chunk_size)
      print(f"# {size}: every token's state {harness.mib(scale['all_states_bytes'])} MiB, "
            f"one state per chunk {harness.mib(scale['chunk_states_bytes'])} MiB (float32)")
    print(MEMORY_TABLE.header())
    records = memory(cases_, MEMORY_TABLE)
  else:
    print(harness.banner("kda", args))
    print(TIMING_TABLE.header())
    records = harness.run(cases_, TIMING_TABLE, args.warmup, args.iters)
  harness.write_json(args.json, records, dtype=args.dtype, mode="memory" if args.memory
                     else "timing")
  return records


if __name__ == "__main__":
  main()
