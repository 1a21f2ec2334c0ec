"""Registers, spills, shared memory and instruction counts of the Pallas Triton kernels, measured
without a GPU.

Each op's kernels (forward and backward, as ``jax.grad`` runs them; ``kda-forward``: KDA's call
that is not differentiated, whose forward kernels write less, docs/kernels.md version 12) are
lowered for CUDA on this host; the Triton IR of every ``pallas_call`` is taken from Pallas' Triton lowering, compiled for
sm_90 (the H200) by the ``triton`` package (``pip install triton``; it carries ``ptxas``) with
the launch settings the kernel asked for, and ``ptxas -v`` reports the registers per thread and
the bytes spilled to local memory; ``nvdisasm`` of the result gives the machine (SASS)
instructions, counted statically (a loop's body once): in all, and those that move spills
(``LDL``, ``STL``). The kernels here are latency-bound, each warp waiting on its own chain of
instructions (docs/kernels.md, version 8), so the count is a first estimate of a change's
effect. A kernel that spills reloads its tiles from local memory (L1,
then L2) inside its inner loops, which is what docs/kernels.md's timings pointed at; this report
lets the fix be counted before any device time is spent::

    pip install triton
    python -m benchmarks.registers --ops kda,rwkv7 --chunks 64,32 --json registers.json
    python -m benchmarks.registers --ops kda --kernels 'gradient_rows|pair_rows'   # a few

Caveat: the ``triton`` package here is not the Triton that XLA (jaxlib) bundles and runs on the
GPU; the two share the dialect but not every pass, so the figures are a close estimate of the
device's (registers and spills of the same IR; the shared memory can differ by a pipeline
buffer). The op's shapes are small (one batch row, two chunks): the kernels' per-program code
does not depend on the batch or the length.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

OPS = ("kda", "kda-forward", "rwkv7", "scan", "decode")
CHUNKED = ("kda", "kda-forward", "rwkv7")  # the ops that take --chunks
ARCH = 90  # sm_90: H100 / H200


def _kda(chunk: int):
  from ops.kda import pallas_gpu
  B, T, H, d = 1, 2 * chunk, 2, 128
  keys = jax.random.split(jax.random.key(0), 5)
  q, k, v = (jax.random.normal(key, (B, T, H, d), jnp.bfloat16) for key in keys[:3])
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, d)))
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (B, T, H)))
  h0 = jnp.zeros((B, H, d, d), jnp.float32)

  def loss(q, k, v, g, beta, h0):
    o, final = pallas_gpu.scan(q, k, v, g, beta, h0, None, scale=d ** -0.5, chunk_size=chunk,
                               interpret=False)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)
  return loss, (q, k, v, g, beta, h0)


def _rwkv7(chunk: int):
  from ops.rwkv7 import pallas_gpu
  B, T, H, d = 1, 2 * chunk, 2, 64
  keys = jax.random.split(jax.random.key(0), 6)
  r, k, v, a, b = (jax.random.normal(key, (B, T, H, d), jnp.bfloat16) for key in keys[:5])
  w = -jax.nn.sigmoid(jax.random.normal(keys[5], (B, T, H, d)))
  h0 = jnp.zeros((B, H, d, d), jnp.float32)

  def loss(r, w, k, v, a, b, h0):
    o, final = pallas_gpu.scan(r, w, k, v, a, b, h0, None, scale=1.0, chunk_size=chunk,
                               interpret=False)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)
  return loss, (r, w, k, v, a, b, h0)


def _scan(chunk: int):
  del chunk  # the scan kernels' own time chunk is their default
  from ops.selective_scan import pallas_gpu
  B, L, D, N = 1, 256, 256, 16
  keys = jax.random.split(jax.random.key(0), 5)
  u, delta, z = (jax.random.normal(key, (B, L, D), jnp.bfloat16) for key in keys[:3])
  Bm, Cm = (jax.random.normal(key, (B, L, 1, N), jnp.bfloat16) for key in keys[3:5])
  A = -jnp.tile(jnp.arange(1, N + 1, dtype=jnp.float32), (D, 1))
  D_skip, bias = jnp.ones((D,)), jnp.zeros((D,))

  def loss(u, delta, A, Bm, Cm, D_skip, z, bias):
    out, final = pallas_gpu.selective_scan(u, delta, A, Bm, Cm, D_skip, z, bias, True, None,
                                           None, segments=2, interpret=False)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(final)
  return loss, (u, delta, A, Bm, Cm, D_skip, z, bias)


def _decode(chunk: int):
  del chunk
  from ops.kda import pallas_gpu_step
  B, H, d = 4, 16, 128
  keys = jax.random.split(jax.random.key(0), 6)
  q, k, v = (jax.random.normal(key, (B, H, d), jnp.bfloat16) for key in keys[:3])
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, H, d)))
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (B, H)))
  state = jax.random.normal(keys[5], (B, H, d, d))
  return (lambda *x: pallas_gpu_step.update(*x, interpret=False)), (state, q, k, v, g, beta)


BUILDERS: dict[str, Callable] = {"kda": _kda, "kda-forward": _kda, "rwkv7": _rwkv7, "scan": _scan,
                                 "decode": _decode}
DIFFERENTIABLE = {"kda", "rwkv7", "scan"}


@contextlib.contextmanager
def _captured_triton_modules():
  """Collects the Triton IR text of each ``pallas_call`` lowered for a GPU inside the block (a
  private Pallas function is wrapped: this is a development tool, tied to the JAX it runs on)."""
  from jax._src.pallas.triton import lowering
  modules, original = [], lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = original(*args, **kwargs)
    modules.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  lowering.lower_jaxpr_to_triton_module = capture
  try:
    yield modules
  finally:
    lowering.lower_jaxpr_to_triton_module = original


_LAUNCH = re.compile(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32')


def triton_kernels(op: str, chunk: int) -> list[dict]:
  """[{name, num_warps, num_stages, ir}] of ``op``'s kernels (forward, then the backward's),
  lowered for CUDA on this host."""
  fn, args = BUILDERS[op](chunk)
  if op in DIFFERENTIABLE:
    fn = jax.grad(fn, argnums=tuple(range(len(args) - 1)))
  with _captured_triton_modules() as modules:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  launches = _LAUNCH.findall(text)
  if len(launches) != len(modules):
    raise RuntimeError(f"{op}: {len(modules)} Triton modules but {len(launches)} launch settings "
                       "in the lowered program (has the Pallas lowering changed?)")
  kernels = []
  for ir, (name, stages, warps) in zip(modules, launches):
    if f"@{name}" not in ir:
      raise RuntimeError(f"{op}: launch settings of {name} do not match its Triton module")
    kernels.append(dict(name=name, num_warps=int(warps), num_stages=int(stages), ir=ir))
  return kernels


_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                           r"(\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas(report: str) -> dict:
  """Registers per thread and local-memory bytes from ``ptxas -v``'s report of one kernel."""
  spills, registers = _PTXAS_SPILLS.search(report), _PTXAS_REGISTERS.search(report)
  if not (spills and registers):
    raise ValueError(f"no register report in ptxas output: {report[-500:]!r}")
  return dict(registers=int(registers.group(1)), stack_bytes=int(spills.group(1)),
              spill_store_bytes=int(spills.group(2)), spill_load_bytes=int(spills.group(3)))


# "  /*0090*/   @!P0 LDL.64 R4, [R1+0x8] ;": the address, a predicate, the opcode
_SASS_OPCODE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*)",
                          re.M)
SPILL_OPCODES = ("LDL", "STL")


def parse_sass(listing: str) -> dict:
  """Static instruction counts of one kernel from ``nvdisasm``'s listing: every instruction,
  and the local-memory loads and stores that move spills."""
  opcodes = _SASS_OPCODE.findall(listing)
  if not opcodes:
    raise ValueError(f"no instructions in the SASS listing: {listing[:300]!r}")
  return dict(instructions=len(opcodes),
              spill_instructions=sum(op in SPILL_OPCODES for op in opcodes))


def compile_kernel(kernel: dict, workdir: pathlib.Path) -> dict:
  """``kernel`` compiled for sm_90 by the ``triton`` package: its ptxas report, shared memory
  and SASS instruction counts."""
  # No floating-point contraction, as XLA's Triton: an H200 profile of the scan's forward counted
  # 150 unfused and 20 fused float32 instructions a token (docs/kernels.md, scan version 5).
  os.environ["TRITON_DEFAULT_FP_FUSION"] = "0"
  try:
    import triton
    from triton.backends.compiler import GPUTarget
  except ImportError as err:
    raise SystemExit("benchmarks.registers needs the triton package: pip install triton") from err
  source = workdir / f"{kernel['name']}.ttir"
  source.write_text(kernel["ir"])
  compiled = triton.compile(str(source), target=GPUTarget("cuda", ARCH, 32),
                            options=dict(num_warps=kernel["num_warps"],
                                         num_stages=kernel["num_stages"]))
  ptx = source.with_suffix(".ptx")
  ptx.write_text(compiled.asm["ptx"])
  binaries = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
  errors = []
  for ptxas in sorted(binaries.glob("ptxas*"), reverse=True):  # the newest PTX ISA first
    cubin = ptx.with_suffix(".cubin")
    run = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{ARCH}a", str(ptx), "-o",
                          str(cubin)], capture_output=True, text=True)
    if run.returncode == 0:
      listing = subprocess.run([str(binaries / "nvdisasm"), str(cubin)], capture_output=True,
                               text=True, check=True).stdout
      return dict(parse_ptxas(run.stderr), shared_bytes=int(compiled.metadata.shared),
                  **parse_sass(listing))
    errors.append(f"{ptxas.name}: {run.stderr.strip()[-300:]}")
  raise RuntimeError("no ptxas of the triton package assembled the PTX: " + "; ".join(errors))


def report(ops: Sequence[str], chunks: Sequence[int], kernels: str | None = None) -> list[dict]:
  """One row per kernel of ``ops`` (at each of ``chunks`` for KDA and RWKV-7), only those whose
  names match the regular expression ``kernels`` where given."""
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for op in ops:
      for chunk in (chunks if op in CHUNKED else chunks[:1]):
        for kernel in triton_kernels(op, chunk):
          if kernels and not re.search(kernels, kernel["name"]):
            continue
          row = dict(op=op, chunk=chunk if op in CHUNKED else None,
                     kernel=kernel["name"], num_warps=kernel["num_warps"],
                     num_stages=kernel["num_stages"])
          row.update(compile_kernel(kernel, pathlib.Path(tmp)))
          rows.append(row)
          print(format_row(row), flush=True)
  return rows


HEADER = (f"{'op':>11} {'chunk':>5} {'kernel':<30} {'warps':>5} {'stages':>6} {'regs':>5} "
          f"{'spill st B':>10} {'spill ld B':>10} {'stack B':>8} {'smem B':>8} {'SASS':>6} "
          f"{'LDL+STL':>7}")


def format_row(row: dict) -> str:
  return (f"{row['op']:>11} {row['chunk'] or '-':>5} {row['kernel']:<30} {row['num_warps']:>5} "
          f"{row['num_stages']:>6} {row['registers']:>5} {row['spill_store_bytes']:>10} "
          f"{row['spill_load_bytes']:>10} {row['stack_bytes']:>8} {row['shared_bytes']:>8} "
          f"{row['instructions']:>6} {row['spill_instructions']:>7}")


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--ops", default="kda,rwkv7,scan,decode",
                      help=f"comma-separated, of {', '.join(OPS)}")
  parser.add_argument("--chunks", default="64", help="KDA and RWKV-7 chunk sizes, comma-separated")
  parser.add_argument("--kernels", help="a regular expression: only the kernels it matches "
                      "(e.g. 'gradient_rows|pair_rows')")
  parser.add_argument("--json", help="also write the rows here")
  args = parser.parse_args(argv)
  ops = [op for op in args.ops.split(",") if op]
  if unknown := sorted(set(ops) - set(OPS)):
    parser.error(f"--ops: unknown {unknown}; expected some of {list(OPS)}")
  chunks = [int(c) for c in args.chunks.split(",")]
  print(f"# Pallas Triton kernels compiled for sm_{ARCH} on {jax.default_backend()} "
        f"(jax {jax.__version__})\n{HEADER}", flush=True)
  rows = report(ops, chunks, args.kernels)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(dict(jax_version=jax.__version__, arch=ARCH,
                                                       rows=rows), indent=1))
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
