"""Smoke tests of the benchmark scripts: tiny sizes, one timed call, valid JSON."""

import argparse
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import kda as kda_bench
from benchmarks import selective_scan as scan_bench

pytestmark = pytest.mark.compile_bound  # conftest: XLA's optimisation passes off
FAST = ["--iters", "1", "--warmup", "0", "--implementations", "reference"]


def _check_timing_json(path, records, passes=2):
  data = json.loads(path.read_text())
  assert data["records"] == json.loads(json.dumps(records))
  assert data["platform"] == jax.devices()[0].platform
  assert len(records) == passes
  for record in records:
    for key in ("median_ms", "min_ms", "tokens_per_s", "compile_s"):
      assert math.isfinite(record[key]) and record[key] > 0, (key, record)
    assert record["temp_bytes"] is None or record["temp_bytes"] >= 0


def test_selective_scan_script(tmp_path, capsys):
  path = tmp_path / "scan.json"
  records = scan_bench.main(["--sizes", "B1,L32,D8,N4", *FAST, "--json", str(path)])
  _check_timing_json(path, records)
  assert [r["pass"] for r in records] == ["fwd", "fwd+bwd"]
  assert "B1 L32 D8 N4 reference" in " ".join(capsys.readouterr().out.split())


def test_kda_script(tmp_path, capsys):
  path = tmp_path / "kda.json"
  records = kda_bench.main(["--sizes", "B1,T32,H1,K16,V8", *FAST, "--json", str(path)])
  _check_timing_json(path, records)
  assert "B1 T32 H1 K16 V8 reference" in " ".join(capsys.readouterr().out.split())


def test_kda_memory_mode_and_no_remat_form():
  """--memory compiles without running; "xla-noremat" computes what kda(..., "xla") does."""
  size = kda_bench.Size.parse("B1,T40,H2,K16,V8")
  records = kda_bench.memory(
      kda_bench.cases([size], [kda_bench.NO_REMAT], 16, jnp.float32, passes=("fwd",)),
      kda_bench.MEMORY_TABLE)
  assert records[0]["argument_bytes"] > 0 and records[0]["output_bytes"] > 0
  inputs, cotangents = kda_bench.make_inputs(size, jnp.float32), kda_bench.make_cotangents(size)
  plain = kda_bench.kda_fn(kda_bench.NO_REMAT, 16, backward=False)(inputs, cotangents)
  op = kda_bench.kda_fn("xla", 16, backward=False)(inputs, cotangents)
  for a, b in zip(plain, op, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_size_parsing():
  assert str(scan_bench.Size.parse("b2:l1024:d256:n16")) == "B2 L1024 D256 N16"
  assert scan_bench.Size.parse("B2,L8,D4,N2,G2").groups == 2
  assert kda_bench.Size.parse("B4,T8192,H16,K128,V128") == kda_bench.Size(4, 8192, 16, 128, 128)
  with pytest.raises(argparse.ArgumentTypeError, match=r"B<batch>,T<time>,H<heads>"):
    kda_bench.Size.parse("B4,T8192")


def _numbers(value):
  """Every int or float inside a JSON value (bools excluded)."""
  if isinstance(value, dict):
    for item in value.values():
      yield from _numbers(item)
  elif isinstance(value, list):
    for item in value:
      yield from _numbers(item)
  elif isinstance(value, (int, float)) and not isinstance(value, bool):
    yield value


def test_kernels_script_smoke(tmp_path, capsys):
  """benchmarks.kernels on CPU, tiny sizes, reference and xla only: every default op gives
  timed rows, the absent peers give "n/a" rows, and every number in the JSON is finite and
  positive. (``--ops kda-parts`` compiles the four GPU kernels alone in interpret mode: left to
  the GPU run, for the suite's time.)"""
  from benchmarks import kernels as kernels_bench
  path = tmp_path / "kernels.json"
  records = kernels_bench.main(["--smoke", "--scan-dtypes", "float32", "--json", str(path)])
  data = json.loads(path.read_text())
  assert data["records"] == json.loads(json.dumps(records))
  assert data["platform"] == jax.devices()[0].platform
  timed = [r for r in records if r["median_ms"] is not None]
  assert {r["op"] for r in timed} == set(kernels_bench.DEFAULT_OPS)
  for record in records:
    assert record["row_s"] > 0, record  # each row's wall time, for planning device time
    if record["implementation"] in ("reference", "xla"):
      assert record["status"] == "ok" and record["median_ms"] is not None, record
    else:  # the PyTorch peers
      assert record["status"].startswith("n/a") or record["median_ms"] is not None, record
    for key, value in record.items():
      for number in _numbers(value):
        limit = 0 if key == "temp_bytes" else None  # scratch may be empty
        assert math.isfinite(number) and (number >= 0 if limit == 0 else number > 0), (key, record)
  scan = {(r["implementation"], r["pass"]): r for r in records if r["op"] == "scan"}
  assert scan[("xla", "fwd")]["ratio"] == 1.0
  assert "ratio_attention" in next(r for r in timed if r["op"] == "kda")
  out = " ".join(capsys.readouterr().out.split())
  assert "kda B1 T64 H2 D16 bfloat16 reference fwd" in out


def test_registers_captures_each_kernel_with_its_launch_settings():
  """benchmarks.registers finds every pallas_call's Triton IR in the CUDA lowering, paired with
  the warps and stages the kernel asked for (compiling it needs the triton package, not here)."""
  from benchmarks import registers
  from ops.kda import pallas_gpu_step
  from ops.selective_scan import pallas_gpu as scan_gpu
  [step] = registers.triton_kernels("decode", 64)
  assert step["name"] == "kda_decode_step" and "tt.func" in step["ir"]
  assert step["num_warps"] == pallas_gpu_step._num_warps(128, pallas_gpu_step.DEFAULT_BLOCK_V)
  segment_ends, forward, backward = registers.triton_kernels("scan", 64)
  forward_warps = scan_gpu.default_forward_launch(1, 256, 256)[1]  # the builder's B1 L256 D256
  assert ([k["num_warps"] for k in (segment_ends, forward, backward)]
          == [forward_warps] * 2 + [scan_gpu.NUM_WARPS_BACKWARD])
  assert all(f"@_{name}_kernel" in kernel["ir"] for name, kernel in
             (("segment_end", segment_ends), ("forward", forward), ("backward", backward)))


def test_registers_kda_forward_is_the_call_that_is_not_differentiated():
  """``kda-forward`` lowers KDA's forward-only call: its forward kernels and no backward kernel,
  the block inverse without its P_kk output (three outputs where the differentiated call's has
  four)."""
  from benchmarks import registers
  forward = [k["name"] for k in registers.triton_kernels("kda-forward", 16)]
  both = registers.triton_kernels("kda", 16)
  assert forward == [k["name"] for k in both][:len(forward)]
  assert not {"_wy_dA_kk_kernel", "_gradient_rows_kernel"} & set(forward)
  assert {"_pair_rows_kernel", "_inverse_blocks_kernel", "_chunk_outputs_kernel",
          "_state_forward_kernel"} <= set(forward)
  ir = {k["name"]: k["ir"] for k in registers.triton_kernels("kda-forward", 16)}
  inverse_args = lambda text: text.split("@_inverse_blocks_kernel(")[1].split(")")[0].count("%arg")
  assert inverse_args(ir["_inverse_blocks_kernel"]) + 1 == inverse_args(
      next(k["ir"] for k in both if k["name"] == "_inverse_blocks_kernel"))


def test_an_ops_own_launch_entry_overrides_the_shared_one(monkeypatch):
  """RWKV-7's kernels ask for its own ``LAUNCH["rwkv7.<kernel>"]`` where there is one and for
  the shared entry elsewhere, as the lowered program shows."""
  from benchmarks import registers
  from ops.kda import pallas_gpu
  monkeypatch.setattr(pallas_gpu, "LAUNCH", {**pallas_gpu.LAUNCH, "state_forward": (8, 3),
                                              "rwkv7.state_forward": (2, 1),
                                              "intra_forward": (4, 2)})
  launches = {k["name"]: (k["num_warps"], k["num_stages"])
              for k in registers.triton_kernels("rwkv7", 16)}
  assert launches["_state_forward_kernel"] == (2, 1)
  assert launches["_intra_forward_kernel"] == (4, 2)


def test_registers_compiles_only_the_kernels_asked_for(capsys):
  """``--kernels`` filters the kernels by name before any is compiled (none here, so no triton
  package is needed)."""
  from benchmarks import registers
  assert registers.main(["--ops", "decode", "--kernels", "no_such_kernel"]) == []
  assert "regs" in capsys.readouterr().out  # the header still printed


def test_registers_reads_the_ptxas_report():
  from benchmarks import registers
  report = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
            "ptxas info    : Function properties for k\n"
            "    1520 bytes stack frame, 2102 bytes spill stores, 3288 bytes spill loads\n"
            "ptxas info    : Used 255 registers, used 1 barriers, 1520 bytes cumulative stack\n")
  assert registers.parse_ptxas(report) == dict(registers=255, stack_bytes=1520,
                                               spill_store_bytes=2102, spill_load_bytes=3288)
  with pytest.raises(ValueError, match="no register report"):
    registers.parse_ptxas("ptxas fatal : Unsupported .version 9.4")


def test_registers_counts_the_sass_instructions():
  """Every instruction of nvdisasm's listing once, predicated ones included, and the spill
  moves (LDL, STL) apart; labels and section names are not instructions."""
  from benchmarks import registers
  listing = """
        .text._k:
.L_x_0:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/              @!P0 LDL.64 R4, [R1+0x8] ;
        /*0030*/               @P1 STL [R1], R2 ;
        /*0040*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0050*/                   EXIT ;
.L_x_1:
        /*0060*/                   BRA `(.L_x_1);
"""
  assert registers.parse_sass(listing) == dict(instructions=7, spill_instructions=2)
  with pytest.raises(ValueError, match="no instructions"):
    registers.parse_sass(".text._k:\n")


def test_kernels_times_the_kernels_at_each_kernel_chunk():
  """``--kernel-chunks`` adds rows "<kernel form> C<size>" for the chunked ops, each built with
  that chunk size and checked against "xla" like the default rows."""
  from benchmarks import kernels as kernels_bench
  args = kernels_bench.parse_args(["--smoke", "--implementations", "xla", "pallas_gpu",
                                   "--kernel-chunks", "16,32"])
  bench = kernels_bench.Bench(args)
  built = []

  def make_fn(form, backward, chunk_size=64):
    built.append((form, backward, chunk_size))
    return lambda x: x * 2.0

  x = jnp.arange(4.0)
  make_record = lambda impl, p: bench.record("rwkv7", "B1", jnp.float32, impl, p, (1.0, 1.0))
  bench.jax_forms(make_record, make_fn, (x,), jnp.float32, ("fwd",), 4, "xla", {"fwd": None},
                  variants=("chunk_size", "C", args.kernel_chunks))
  assert [r["implementation"] for r in bench.records] == [
      "xla", "pallas_gpu", "pallas_gpu C16", "pallas_gpu C32"]
  assert all(r["status"] == "ok" and r["check_max"] == 0.0 for r in bench.records[1:])
  assert built == [("xla", False, 64), ("pallas_gpu", False, 64), ("pallas_gpu", False, 16),
                   ("pallas_gpu", False, 32)]


def test_kernels_launch_sets_the_gpu_kernels_launch_settings(monkeypatch, capsys):
  """``--launch NAME=WARPS,STAGES`` reaches ``ops.kda.pallas_gpu.LAUNCH`` and the JSON's
  "launch"; an unknown kernel or a malformed setting is refused with the choices named."""
  from benchmarks import kernels as kernels_bench
  from ops.kda import pallas_gpu
  monkeypatch.setattr(pallas_gpu, "LAUNCH", dict(pallas_gpu.LAUNCH))
  args = kernels_bench.parse_args(["--smoke", "--launch", "gradient_rows=2,3",
                                   "state_forward=4,1"])
  assert args.launch == [("gradient_rows", (2, 3)), ("state_forward", (4, 1))]
  kernels_bench.apply_launch(args.launch)
  launch = kernels_bench.Bench(args).meta["launch"]
  assert launch["gradient_rows"] == (2, 3) and launch["state_forward"] == (4, 1)
  assert launch["pair_rows"] == pallas_gpu.LAUNCH["pair_rows"]
  for bad, message in [("no_such_kernel=4,1", "unknown kernels"),
                       ("gradient_rows=4", "NAME=WARPS,STAGES"),
                       ("gradient_rows=x,1", "NAME=WARPS,STAGES")]:
    with pytest.raises(SystemExit):
      kernels_bench.parse_args(["--smoke", "--launch", bad])
    assert message in capsys.readouterr().err


def test_kernels_launch_variants_time_the_stages_under_each_setting_in_turn(monkeypatch,
                                                                            capsys):
  """``--launch-variants`` (kda-parts) builds and times the stages under each variant's
  settings, over ``--launch``, ``--rounds`` times in turn, labels the rows with the variant and
  the round, and leaves the process's settings as they were; a bad variant is refused."""
  from benchmarks import kernels as kernels_bench
  from ops.kda import pallas_gpu
  monkeypatch.setattr(pallas_gpu, "LAUNCH", dict(pallas_gpu.LAUNCH))
  seen, called = [], []

  def stages(*args, **kwargs):  # the stages as built, without compiling the kernels
    seen.append((pallas_gpu.LAUNCH["gradient_rows"], pallas_gpu.LAUNCH["wy_columns"]))

    def stage(x):  # a stage row traces its kernels, reading LAUNCH, when it is called
      called.append(pallas_gpu.LAUNCH["gradient_rows"])
      return x + 1.0

    return [("intra_forward", stage, (jnp.ones(3),))]

  monkeypatch.setattr(kernels_bench.pallas_gpu, "stages", stages)
  args = kernels_bench.parse_args([
      "--smoke", "--ops", "kda-parts", "--kda-sizes", "B1,T64,H1,D16", "--launch",
      "wy_columns=4,1",
      "--launch-variants", "base", "gradient_rows=2,3;wy_columns=1,1", "--rounds", "2"])
  kernels_bench.apply_launch(args.launch)
  before = dict(pallas_gpu.LAUNCH)
  bench = kernels_bench.Bench(args)
  kernels_bench.run_kda_parts(bench, args.kda_sizes)
  base = before["gradient_rows"]
  assert seen == [(base, (4, 1)), ((2, 3), (1, 1))] * 2
  per_row = len(called) // 4
  assert called == ([base] * per_row + [(2, 3)] * per_row) * 2
  assert pallas_gpu.LAUNCH == before
  assert [r["implementation"] for r in bench.records] == [
      f"pallas_gpu [{v}] intra_forward r{n}" for n in (1, 2)
      for v in ("base", "gradient_rows=2,3;wy_columns=1,1")]
  assert all(r["median_ms"] > 0 for r in bench.records)
  for bad, message in [("gradient_rows=2,3;nope=1,1", "unknown kernels"),
                       ("gradient_rows=2", "NAME=WARPS,STAGES")]:
    with pytest.raises(SystemExit):
      kernels_bench.parse_args(["--smoke", "--launch-variants", bad])
    assert message in capsys.readouterr().err


def test_kernels_check_form_picks_what_the_chunked_kernels_are_checked_against():
  """``--check-form reference`` checks the KDA and RWKV-7 kernels against "reference" (never
  building "xla"); the decode step is always checked against "reference"."""
  from benchmarks import kernels as kernels_bench
  args = kernels_bench.parse_args(["--smoke", "--implementations", "pallas_gpu",
                                   "--check-form", "reference"])
  bench = kernels_bench.Bench(args)
  assert (bench.check_form("kda"), bench.check_form("rwkv7"), bench.check_form("decode")) == (
      "reference", "reference", "reference")
  built = []

  def make_fn(form, backward):
    built.append(form)
    return lambda x: x * (2.0 if form == "reference" else 2.5)

  make_record = lambda impl, p: bench.record("kda", "B1", jnp.float32, impl, p, (1.0, 1.0))
  bench.jax_forms(make_record, make_fn, (jnp.arange(1.0, 5.0),), jnp.float32, ("fwd",), 4,
                  bench.check_form("kda"), {"fwd": None})
  (row,) = bench.records
  assert built == ["pallas_gpu", "reference"]
  assert row["check_against"] == "reference" and row["check_max"] > 0.2
  assert kernels_bench.Bench(kernels_bench.parse_args(["--smoke"])).check_form("kda") == "xla"


def test_kernels_times_the_scan_kernel_at_each_setting(monkeypatch):
  """``--scan-options`` adds scan rows "pallas_gpu <settings>", each built with those settings
  and checked against "xla" like the default rows; ``scan_fn`` then calls the GPU kernel itself
  with them (the public ``selective_scan`` has no such arguments)."""
  from benchmarks import kernels as kernels_bench
  settings = ["block_d=4", "block_d=8,segments=2"]
  args = kernels_bench.parse_args(["--smoke", "--ops", "scan", "--scan-dtypes", "float32",
                                   "--implementations", "xla", "pallas_gpu",
                                   "--scan-options", *settings])
  bench = kernels_bench.Bench(args)
  scan_fn, built = kernels_bench.scan_fn, []

  def make_fn(form, backward, options=None):
    built.append((form, backward, options))
    return lambda inputs, cotangent: inputs["u"] * 2.0

  monkeypatch.setattr(kernels_bench, "scan_fn", make_fn)
  kernels_bench.run_scan(bench, args.scan_sizes[:1])
  assert [r["implementation"] for r in bench.records] == [
      impl for impl in ("xla", "pallas_gpu", *(f"pallas_gpu {s}" for s in settings))
      for _ in range(2)]
  assert all(r["status"] == "ok" and r["check_max"] == 0.0 for r in bench.records[2:])
  assert [b for b in built if not b[1]] == [("xla", False, None), ("pallas_gpu", False, None),
                                            *(("pallas_gpu", False, s) for s in settings)]

  calls = []

  def kernel(u, delta, A, B, C, *rest, **options):
    calls.append((B.shape, options))
    return u, None

  monkeypatch.setattr(kernels_bench.scan_gpu, "selective_scan", kernel)
  inputs, cotangent = kernels_bench.scan_inputs(args.scan_sizes[0], jnp.float32)
  assert scan_fn("pallas_gpu", False, "block_d=8,segments=2")(inputs) is inputs["u"]
  batch, time, state = inputs["B"].shape
  assert calls == [((batch, time, 1, state), dict(block_d=8, segments=2))]
  with pytest.raises(ValueError, match="pallas_gpu kernel only"):
    scan_fn("pallas_tpu", True, "block_d=4")(inputs, cotangent)
  for bad in ("blocks=4", "block_d=four", "block_d"):
    with pytest.raises(SystemExit):
      kernels_bench.parse_args(["--scan-options", bad])


def test_kernels_scan_passes_limit_the_rows(monkeypatch):
  """``--scan-passes fwd`` (a forward settings sweep) times no forward+backward, and
  ``prefetch_state_tokens`` is one of the settings."""
  from benchmarks import kernels as kernels_bench
  args = kernels_bench.parse_args(["--smoke", "--ops", "scan", "--scan-dtypes", "float32",
                                   "--implementations", "xla", "pallas_gpu", "--scan-passes",
                                   "fwd", "--scan-options", "prefetch_state_tokens=4"])
  bench = kernels_bench.Bench(args)
  monkeypatch.setattr(kernels_bench, "scan_fn",
                      lambda form, backward, options=None: lambda inputs, cot: inputs["u"])
  kernels_bench.run_scan(bench, args.scan_sizes[:1])
  assert [(r["implementation"], r["pass"]) for r in bench.records] == [
      ("xla", "fwd"), ("pallas_gpu", "fwd"), ("pallas_gpu prefetch_state_tokens=4", "fwd")]


def test_kda_stage_flops_of_the_sub_chunk_forward():
  """The intra forward's count by sub-chunks: at C = 16 (one sub-chunk) it is the whole-chunk
  level split's, 2 L (2 C^2 d + 2 C^3) + 2 (2 C^2 d) with L = 4; at C = 64 it is far below the
  level split's 2 L (2 C^2 d + 2 C^3) + 2 (2 C^2 d)."""
  from benchmarks import kernels as kernels_bench
  size = kernels_bench.SeqSize.parse("B1,T64,H1,D128")
  d = 128
  assert kernels_bench.kda_stage_flops("intra_forward", size, C=16) == 4 * (
      2 * 4 * (2 * 16 * 16 * d + 2 * 16 ** 3) + 2 * 2 * 16 * 16 * d)
  level_split_64 = 2 * 6 * (2 * 64 * 64 * d + 2 * 64 ** 3) + 2 * 2 * 64 * 64 * d
  assert kernels_bench.kda_stage_flops("intra_forward", size, C=64) < level_split_64 / 3


def test_revision_ab_times_an_exported_revision_beside_this_tree(tmp_path, capsys):
  """``export`` writes a git revision's ``ops`` as ``rev_ops`` with its own imports renamed (so
  both trees import side by side); ``run`` times both trees' scan and checks each against
  "xla" (here HEAD against the working tree, in interpret mode)."""
  from benchmarks import revision_ab
  package = revision_ab.export("HEAD", tmp_path)
  sources = [p.read_text() for p in package.rglob("*.py")]
  assert sources and not any(re.search(r"^\s*(from|import) ops\b", s, re.M) for s in sources)
  assert any("from rev_ops.selective_scan import" in s for s in sources)
  with pytest.raises(SystemExit):
    revision_ab.export("HEAD", tmp_path)  # refuses to overwrite
  revision_ab.main(["run", "--old", str(tmp_path), "--ops", "scan", "--scan-sizes",
                    "B1,L16,D8,N4", "--rounds", "1", "--warmup", "0", "--iters", "1"])
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("scan")]
  assert [line[:58].split()[5:] for line in rows] == [
      [dtype, pass_name, *form.split()] for dtype in ("bfloat16", "float32")
      for pass_name in ("fwd", "fwd+bwd") for form in ("xla", "pallas_gpu old", "pallas_gpu new")]
  errors = [float(line.split()[-1]) for line in rows if "check" in line]
  assert len(errors) == 8 and all(e < 1e-2 for e in errors)


def test_revision_ab_times_kda_of_both_trees(tmp_path, capsys):
  """``run --ops kda`` times both trees' public KDA (forward and forward+backward, or the
  ``--kda-passes`` named; fla beside them where torch imports) and checks the old tree's outputs
  against the new one's."""
  from benchmarks import revision_ab
  revision_ab.export("HEAD", tmp_path)
  revision_ab.main(["run", "--old", str(tmp_path), "--ops", "kda", "--kda-sizes",
                    "B1,T40,H1,D16", "--rounds", "1", "--warmup", "0", "--iters", "1"])
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("kda")]
  assert [line[:58].split()[5:] for line in rows] == [
      ["bf16", pass_name, tag] for pass_name in ("fwd", "fwd+bwd") for tag in ("old", "new")]
  errors = [float(line.split()[-1]) for line in rows if "check" in line]
  assert len(errors) == 2 and all(e < 1e-5 for e in errors)
  revision_ab.main(["run", "--old", str(tmp_path), "--ops", "kda", "--kda-sizes",
                    "B1,T40,H1,D16", "--kda-passes", "fwd", "--rounds", "1", "--warmup", "0",
                    "--iters", "1"])
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("kda")]
  assert [line[:58].split()[5:] for line in rows] == [["bf16", "fwd", tag]
                                                      for tag in ("old", "new")]


def test_kernel_times_table_per_call_longest_first():
  """``benchmarks.kernel_times`` turns the profiler's rows (microseconds over all profiled
  calls) into milliseconds and launches per call, longest first, rows without device time left
  out; without torch and a GPU it says so instead of running."""
  from types import SimpleNamespace
  from benchmarks import kernel_times
  events = [SimpleNamespace(key="_pair_rows_kernel", self_device_time_total=2700.0, count=3),
            SimpleNamespace(key="cpu_op", self_device_time_total=0.0, count=3),
            SimpleNamespace(key="_gradient_rows_kernel", self_device_time_total=14100.0, count=3),
            SimpleNamespace(key="l2norm", self_cuda_time_total=300.0, count=6)]
  rows = kernel_times.kernel_table(events, calls=3)
  assert rows == [("_gradient_rows_kernel", 4.7, 1), ("_pair_rows_kernel", 0.9, 1),
                  ("l2norm", 0.1, 2)]
  text = kernel_times.format_table("pallas_gpu fwd+bwd", rows)
  assert text.splitlines()[0] == "== pallas_gpu fwd+bwd: 5.700 ms of kernels a call"
  assert "4.700 ms  x1   _gradient_rows_kernel" in text
  from benchmarks import peers
  if peers.unavailable("torch"):
    with pytest.raises(SystemExit, match="needs torch"):
      kernel_times.main(["--sizes", "B1,T64,H1,D16", "--passes", "fwd"])
