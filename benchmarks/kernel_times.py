"""Each GPU kernel's device time in one KDA call, ours (``implementation="pallas_gpu"``) beside
fla's ``chunk_kda``, in one process.

``benchmarks.kernels`` times whole calls; this says where the time goes. The kernels' own times
come from CUPTI through ``torch.profiler``, which records every kernel on the device in the
process, XLA's as well as PyTorch's, so both sides are measured the same way (docs/kernels.md,
KDA version 9, used it to compare stage by stage). Needs torch with a CUDA device (fla where its
rows are wanted: without it they are left out)::

    python -m benchmarks.kernel_times --sizes B4,T8192,H16,D128 --passes fwd fwd+bwd

For each size and pass it prints the total kernel time of one call and each kernel's share,
longest first (``--calls`` calls profiled, after as many unprofiled ones).
"""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from benchmarks import harness, peers
from benchmarks.kernels import SeqSize, kda_fn, kda_inputs


def kernel_table(events, calls: int) -> list[tuple[str, float, int]]:
  """(kernel name, milliseconds per call, launches per call) of each kernel in ``events``
  (``torch.profiler``'s ``key_averages()`` rows, device times in microseconds), longest first."""
  rows = []
  for event in events:
    micros = getattr(event, "self_device_time_total", None) or getattr(
        event, "self_cuda_time_total", 0)
    if micros:
      rows.append((event.key, micros / calls / 1e3, event.count // calls))
  return sorted(rows, key=lambda row: -row[1])


def format_table(label: str, rows: Sequence[tuple[str, float, int]]) -> str:
  total = sum(ms for _, ms, _ in rows)
  lines = [f"== {label}: {total:.3f} ms of kernels a call"]
  lines += [f"  {ms:8.3f} ms  x{count:<3d} {name[:100]}" for name, ms, count in rows]
  return "\n".join(lines)


def profile(fn: Callable[[], object], calls: int) -> list[tuple[str, float, int]]:
  """``kernel_table`` of ``calls`` calls of ``fn`` (each waited for), after ``calls`` warm-up
  calls."""
  import torch
  from torch.profiler import ProfilerActivity
  for _ in range(calls):
    fn()
  torch.cuda.synchronize()
  with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(calls):
      fn()
    torch.cuda.synchronize()
  return kernel_table(prof.key_averages(), calls)


def run(sizes: Sequence[SeqSize], passes: Sequence[str], calls: int) -> None:
  if reason := peers.unavailable("torch"):
    raise SystemExit(f"benchmarks.kernel_times needs torch with a CUDA device: {reason}")
  with_fla = peers.unavailable() is None
  for size in sizes:
    inputs, cotangents = kda_inputs(size, jnp.bfloat16)
    for pass_name in passes:
      backward = pass_name == "fwd+bwd"
      if with_fla:
        fla, _ = peers.kda_chunk(inputs, cotangents, backward)
        print(format_table(f"fla.chunk_kda {pass_name} {size}", profile(fla, calls)),
              flush=True)
        peers.release()
      ours = jax.jit(kda_fn("pallas_gpu", backward))
      args = (inputs, cotangents) if backward else (inputs,)
      print(format_table(f"pallas_gpu {pass_name} {size}",
                         profile(lambda: jax.block_until_ready(ours(*args)), calls)),
            flush=True)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", nargs="+", type=SeqSize.parse,
                      default=[SeqSize.parse("B4,T8192,H16,D128")])
  parser.add_argument("--passes", nargs="+", choices=harness.PASSES, default=list(harness.PASSES))
  parser.add_argument("--calls", type=int, default=3)
  args = parser.parse_args(argv)
  run(args.sizes, args.passes, args.calls)


if __name__ == "__main__":
  main()
