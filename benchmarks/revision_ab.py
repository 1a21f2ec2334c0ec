"""The GPU kernels of another git revision timed beside this tree's, in one process.

The same kernel's time moves by up to 30% between processes on the H200 (docs/kernels.md), so a
change is judged against the revision before it in one process, in turn. Two steps, since the
device machine gets a copy of the working tree without its git history:

  # here: the revision's ``ops`` package, as package ``rev_ops``, into an untracked folder
  python -m benchmarks.revision_ab export --rev 264e827 --to bw
  # on the device: both trees' kernels, alternating, ``--rounds`` times
  python -m benchmarks.revision_ab run --old bw --ops scan,kda-parts

``scan`` times the public ``selective_scan(..., implementation=...)`` of both trees (and
``"xla"``, whose outputs check both) at each ``--scan-sizes`` size, forward and forward+backward;
``kda-parts`` times each stage of ``ops.kda.pallas_gpu.stages`` of both trees at ``--kda-size``;
``kda`` the public ``kda(..., implementation="pallas_gpu")`` of both trees and fla's ``chunk_kda``
(where torch and fla import; fla's first call at a size autotunes its kernels, minutes on the
H200) at each ``--kda-sizes`` size, bf16, forward and forward+backward (``--kda-passes``), the
old tree's outputs checked against the new tree's.
It prints one row per case with the median milliseconds of every round.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from benchmarks import harness

PACKAGE = "rev_ops"  # the exported revision's ``ops``, renamed so that both import side by side
_IMPORT = re.compile(r"\b(from|import) ops([.\s])")


def export(rev: str, destination: pathlib.Path) -> pathlib.Path:
  """Writes ``rev``'s ``ops`` as ``destination/rev_ops``, its own imports renamed."""
  package = destination / PACKAGE
  if package.exists():
    raise SystemExit(f"{package} exists; remove it first")
  with tempfile.TemporaryDirectory() as tmp:
    archive = pathlib.Path(tmp) / "ops.tar"
    subprocess.run(["git", "archive", "-o", str(archive), rev, "ops"], check=True)
    with tarfile.open(archive) as tar:
      tar.extractall(tmp, filter="data")
    destination.mkdir(parents=True, exist_ok=True)
    shutil.move(pathlib.Path(tmp) / "ops", package)
  for source in package.rglob("*.py"):
    source.write_text(_IMPORT.sub(rf"\1 {PACKAGE}\2", source.read_text()))
  return package


def _largest_error(expected, actual) -> float:
  """The largest relative RMS error (``benchmarks.kernels.compare``) over matching leaves."""
  from benchmarks.kernels import compare
  leaves = lambda tree: dict(enumerate(jax.tree.leaves(tree)))
  return max(compare(leaves(expected), leaves(actual)).values())


def _scan_forward(scan: Callable, implementation: str, inputs: dict):
  return scan(**inputs, delta_softplus=True, implementation=implementation)


def _row(label: str, times: Sequence[float], error: float | None = None) -> str:
  rounds = " ".join(f"{t:8.3f}" for t in times)
  return f"{label:58s} {rounds}" + ("" if error is None else f"   check {error:.1e}")


def _time_forms(forwards: dict, inputs: dict, cotangents, backward: bool, reference: str,
                rounds: int, warmup: int, iters: int, peer: tuple | None = None) -> dict:
  """{label: (median ms of each round, largest error against ``reference``'s outputs, or None)}
  for each of ``forwards`` (label: forward(inputs)), compiled with its gradient when
  ``backward``, then timed in turn ``rounds`` times; ``peer`` (label, timer() -> median ms), as
  fla's, is timed in the same rounds after them, unchecked."""
  from benchmarks.kernels import run_once
  args = (inputs, cotangents) if backward else (inputs,)
  compiled, outputs = {}, {}
  for label, forward in forwards.items():
    fn = harness.with_backward(forward) if backward else forward
    compiled[label], _, outputs[label] = run_once(fn, args)
  timers = {label: functools.partial(
      lambda fn: harness.time_calls(fn, args, warmup, iters)["median_ms"], fn)
      for label, fn in compiled.items()}
  if peer:
    timers[peer[0]] = peer[1]
  times = {label: [] for label in timers}
  for _ in range(rounds):
    for label, timer in timers.items():
      times[label].append(timer())
  return {label: (medians, None if label == reference or label not in outputs
                  else _largest_error(outputs[reference], outputs[label]))
          for label, medians in times.items()}


def run_scan(trees: dict, sizes: Sequence, rounds: int, warmup: int, iters: int) -> None:
  from benchmarks.kernels import scan_inputs
  forms = {"xla": (trees["new"], "xla"),
           **{f"pallas_gpu {tag}": (module, "pallas_gpu") for tag, module in trees.items()}}
  forwards = {label: functools.partial(_scan_forward, module.selective_scan, implementation)
              for label, (module, implementation) in forms.items()}
  for size in sizes:
    for dtype in (jnp.bfloat16, jnp.float32):
      inputs, dout = scan_inputs(size, dtype)
      for backward in (False, True):
        timed = _time_forms(forwards, inputs, dout, backward, "xla", rounds, warmup, iters)
        pass_name = "fwd+bwd" if backward else "fwd"
        for label, (medians, error) in timed.items():
          print(_row(f"scan {size} {jnp.dtype(dtype).name} {pass_name} {label}", medians,
                     error), flush=True)


def run_kda_parts(trees: dict, size, rounds: int, warmup: int, iters: int) -> None:
  from benchmarks.kernels import kda_inputs
  inputs, _ = kda_inputs(size, jnp.bfloat16)
  stages = {}
  for tag, module in trees.items():
    prepared = module.prepare(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"],
                              size.heads, size.heads, size.dim, None, True, for_kernel=True)
    stages[tag] = module.stages(*prepared, inputs["initial_state"], scale=size.dim ** -0.5,
                                chunk_size=64, l2_normalize_qk=True)
    for _, fn, args in stages[tag]:
      jax.block_until_ready(fn(*args))  # compiled once, before any timing
  times: dict[str, dict[str, list]] = {}
  for _ in range(rounds):
    for tag, tree_stages in stages.items():
      for name, fn, args in tree_stages:
        median = harness.time_calls(fn, args, warmup, iters)["median_ms"]
        times.setdefault(name, {}).setdefault(tag, []).append(median)
  for name, by_tree in times.items():
    for tag, medians in by_tree.items():
      print(_row(f"kda-parts {size} {name} {tag}", medians), flush=True)


def run_kda(trees: dict, sizes: Sequence, rounds: int, warmup: int, iters: int,
            passes: Sequence[str] = harness.PASSES) -> None:
  from benchmarks import peers
  from benchmarks.kernels import kda_inputs
  forwards = {tag: functools.partial(_kda_forward, tree.kda) for tag, tree in trees.items()}
  for size in sizes:
    inputs, cotangents = kda_inputs(size, jnp.bfloat16)
    for pass_name in passes:
      backward = pass_name == "fwd+bwd"
      fla = None if peers.unavailable() else peers.kda_chunk(inputs, cotangents, backward)
      peer = fla and ("fla", lambda: peers.time_cuda(fla[0], warmup, iters)["median_ms"])
      timed = _time_forms(forwards, inputs, cotangents, backward, "new", rounds, warmup, iters,
                          peer)
      for tag, (medians, error) in timed.items():
        print(_row(f"kda {size} bf16 {pass_name} {tag}", medians, error), flush=True)
      if fla:
        peers.release()


def _kda_forward(kda: Callable, inputs: dict):
  return kda(**inputs, return_final_state=True, use_qk_l2norm_in_kernel=True,
             implementation="pallas_gpu")


class _KdaTree:
  """A tree's KDA stages, its input preparation and its public ``kda``."""

  def __init__(self, package: str):
    self.stages = importlib.import_module(f"{package}.kda.pallas_gpu").stages
    self.prepare = importlib.import_module(f"{package}.kda")._prepare
    self.kda = importlib.import_module(f"{package}.kda").kda


def main(argv: Sequence[str] | None = None) -> None:
  from benchmarks.kernels import ScanSize, SeqSize
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  exporting = commands.add_parser("export", help="write a revision's ops as rev_ops")
  exporting.add_argument("--rev", required=True, help="a git revision, e.g. HEAD~1")
  exporting.add_argument("--to", required=True, type=pathlib.Path, help="an untracked folder")
  running = commands.add_parser("run", help="time both trees' kernels in this process")
  running.add_argument("--old", required=True, type=pathlib.Path,
                       help="the folder holding the exported rev_ops")
  running.add_argument("--ops", default="scan,kda-parts",
                       help="comma-separated: scan, kda-parts, kda")
  running.add_argument("--scan-sizes", nargs="+", type=ScanSize.parse,
                       default=[ScanSize.parse("B2,L4096,D2048,N16"),
                                ScanSize.parse("B8,L8192,D2048,N16")])
  running.add_argument("--kda-size", type=SeqSize.parse,
                       default=SeqSize.parse("B4,T8192,H16,D128"), help="kda-parts' size")
  running.add_argument("--kda-sizes", nargs="+", type=SeqSize.parse,
                       default=[SeqSize.parse("B4,T8192,H16,D128"),
                                SeqSize.parse("B4,T32768,H16,D128")], help="kda's sizes")
  running.add_argument("--kda-passes", nargs="+", choices=harness.PASSES,
                       default=list(harness.PASSES),
                       help="kda's passes (fla autotunes each pass at each size on its first "
                            "call: fewer passes, less device time)")
  running.add_argument("--rounds", type=int, default=2)
  running.add_argument("--warmup", type=int, default=3)
  running.add_argument("--iters", type=int, default=20)
  args = parser.parse_args(argv)
  if args.command == "export":
    print(export(args.rev, args.to))
    return
  ops = [op for op in args.ops.split(",") if op]
  if unknown := sorted(set(ops) - {"scan", "kda-parts", "kda"}):
    parser.error(f"--ops: unknown {unknown}; expected scan, kda-parts or kda")
  if not (args.old / PACKAGE).is_dir():
    parser.error(f"--old: no {PACKAGE} in {args.old} (run the export command first)")
  sys.path.insert(0, str(args.old.resolve()))
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; median ms per call of each "
        f"round ({args.warmup} warm-up, {args.iters} samples of {harness.CALLS_PER_SAMPLE} calls "
        f"back to back); 'old' = {args.old / PACKAGE}")
  if "scan" in ops:
    trees = {tag: importlib.import_module(f"{package}.selective_scan")
             for tag, package in (("old", PACKAGE), ("new", "ops"))}
    run_scan(trees, args.scan_sizes, args.rounds, args.warmup, args.iters)
  kda_trees = {tag: _KdaTree(package) for tag, package in (("old", PACKAGE), ("new", "ops"))
               if {"kda-parts", "kda"} & set(ops)}
  if "kda-parts" in ops:
    run_kda_parts(kda_trees, args.kda_size, args.rounds, args.warmup, args.iters)
  if "kda" in ops:
    run_kda(kda_trees, args.kda_sizes, args.rounds, args.warmup, args.iters, args.kda_passes)


if __name__ == "__main__":
  main()
