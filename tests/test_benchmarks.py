"""Smoke tests of the benchmark scripts: tiny sizes, one timed call, valid JSON."""

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import kda as kda_bench
from benchmarks import selective_scan as scan_bench

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
