"""Smoke test of ``python -m benchmarks.compare`` on the CPU: tiny models (a KDA + MLA hybrid and
grouped-query softmax attention) at two short contexts, one timed call each; the JSON, the table
and the plots are written and every number in the JSON is finite and positive.

XLA's optimisations are turned off for it (``compile_bound``, see conftest): the run is
compile-bound, and that halves it (19 s to 12 s on a 2-core CPU).
"""

import json
import math

import pytest

from benchmarks import compare

MODELS = ("kimi_linear_tiny:layer_pattern=KM:num_layers=2:mlp=none,"
          "mamba_tiny:layer_pattern=A:num_layers=1:attn_num_kv_heads=2")


pytestmark = pytest.mark.compile_bound  # conftest: XLA's optimisation passes off


def _numbers(value, where="$"):
  """(path, number) for every int or float inside a JSON value (bools excluded)."""
  if isinstance(value, dict):
    for key, item in value.items():
      yield from _numbers(item, f"{where}.{key}")
  elif isinstance(value, list):
    for i, item in enumerate(value):
      yield from _numbers(item, f"{where}[{i}]")
  elif isinstance(value, (int, float)) and not isinstance(value, bool):
    yield where, value


def test_compare_smoke(tmp_path):
  result = compare.main(["--presets", MODELS, "--contexts", "16,32", "--warmup", "0",
                         "--iters", "1", "--train_tokens", "32", "--max_train_context", "16",
                         "--max_decode_batch", "1", "--peak_tflops", "0.1", "--strict",
                         "--out", str(tmp_path)])
  for name in ("compare.json", "compare.md", "throughput.png", "memory.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  data = json.loads((tmp_path / "compare.json").read_text())
  records = data["records"]
  assert [(r["model"].split(":")[0], r["context"]) for r in records] == [
      ("kimi_linear_tiny", 16), ("kimi_linear_tiny", 32), ("mamba_tiny", 16), ("mamba_tiny", 32)]
  numbers = [(path, v) for path, v in _numbers(data) if path != "$.warmup"]
  assert numbers and all(math.isfinite(v) and v > 0 for _, v in numbers), [
      (path, v) for path, v in numbers if not (math.isfinite(v) and v > 0)]
  for r in records:
    for name in ("prefill", "decode_batch_1", "decode_max_batch"):
      assert r[name]["tokens_per_s"] > 0 and r[name]["memory_bytes"] > 0, (name, r)
    if r["context"] == 16:
      assert 0 < r["train"]["mfu"] < 1 and r["train"]["batch"] == 2
    else:  # Above --max_train_context: skipped, and the table says so.
      assert "max_train_context" in r["train"]["skipped"]
  # Attention caches grow with the context; the hybrid's recurrent part does not.
  attention = [r["decode_state_bytes"] for r in records if r["model"].startswith("mamba")]
  assert attention[1] > attention[0]
  table = (tmp_path / "compare.md").read_text()
  assert table.count("| kimi_linear_tiny") == 2 and "skipped [1]" in table
  assert "1. " in table and "max_train_context" in table
  assert result["records"] == records

  # --merge: two runs' JSON (here the halves of this one) give one table and the plots again.
  halves = []
  for i, model in enumerate(("kimi_linear_tiny", "mamba_tiny")):
    half = dict(data, records=[r for r in records if r["model"].startswith(model)])
    halves.append(tmp_path / f"run{i}.json")
    halves[-1].write_text(json.dumps(half))
  merged = compare.main(["--merge", *map(str, halves), "--out", str(tmp_path / "merged")])
  assert merged["records"] == records and len(merged["runs"]) == 2
  assert (tmp_path / "merged" / "compare.md").read_text() == table
  assert (tmp_path / "merged" / "throughput.png").stat().st_size > 0
  # A later run of one measurement (--measurements train) joins the earlier record.
  later = dict(records[0], prefill={"skipped": compare.NOT_MEASURED},
               train=dict(records[0]["train"], tokens_per_s=1.0))
  (tmp_path / "later.json").write_text(json.dumps(dict(data, records=[later])))
  joined = compare.main(["--merge", str(tmp_path / "run0.json"), str(tmp_path / "later.json"),
                         "--out", str(tmp_path / "joined"), "--no_plots"])["records"]
  assert len(joined) == 2 and joined[0]["prefill"] == records[0]["prefill"]
  assert joined[0]["train"]["tokens_per_s"] == 1.0
  # Rows go by model, then context, whatever order the runs come in.
  reordered = compare.main(["--merge", str(tmp_path / "run1.json"), str(tmp_path / "later.json"),
                            str(tmp_path / "run0.json"), "--out", str(tmp_path / "reordered"),
                            "--no_plots"])["records"]
  assert [(r["model"].split(":")[0], r["context"]) for r in reordered] == [
      ("mamba_tiny", 16), ("mamba_tiny", 32), ("kimi_linear_tiny", 16), ("kimi_linear_tiny", 32)]


def test_decode_batch_search_and_flops():
  """The batch doubles while parameters + state fit 90% of the memory, up to the cap; the
  training FLOPs add the causal attention products to 6 N."""
  import dataclasses
  import jax.numpy as jnp
  config = dataclasses.replace(compare.load_model("mamba_tiny:layer_pattern=A:num_layers=1"),
                               max_cache_length=1000)
  params = {"w": jnp.zeros((256, 256), jnp.float32)}  # 256 KiB
  state_1 = compare.decode_state_bytes(config, 1)  # 2 x 1000 x 4 x 16 x 4 bytes + 4 = 128,004
  bench = compare.Bench("m", config, 1000, params, params, 1, None, 0, donate=True)
  bench.limit = int((256 * 1024 + 8 * state_1) / compare.MEMORY_FRACTION) + 1
  assert compare.decode_batch_candidates(bench, cap=64) == ([8, 4, 2, 1], "memory")
  assert compare.decode_batch_candidates(bench, cap=4) == ([4, 2, 1], "cap")
  bench.donate = False  # Two copies of the state: half the batch.
  assert compare.decode_batch_candidates(bench, cap=64)[0][0] == 4
  assert compare.train_flops_per_token(config, 1000, activated=10) == 60 + 3 * 4 * 32 * 1000


def test_interrupted_run_keeps_finished_measurements(tmp_path, monkeypatch):
  """The JSON is rewritten after every measurement: a run killed during the training step still
  has the prefill and decode results of that context."""
  fake = dict(batch=1, median_s=0.5, tokens_per_s=2.0, calls=1, compile_s=0.1, memory_bytes=8)
  monkeypatch.setattr(compare, "measure_prefill", lambda bench: dict(fake))
  monkeypatch.setattr(compare, "measure_decode", lambda bench, batch: dict(fake, state_bytes=4))

  def interrupted(bench):
    raise KeyboardInterrupt

  monkeypatch.setattr(compare, "measure_train", interrupted)
  with pytest.raises(KeyboardInterrupt):
    compare.main(["--presets", MODELS.split(",")[1], "--contexts", "16,32", "--warmup", "0",
                  "--iters", "1", "--max_decode_batch", "1", "--no_plots",
                  "--out", str(tmp_path)])
  (record,) = json.loads((tmp_path / "compare.json").read_text())["records"]
  assert record["context"] == 16 and record["prefill"]["tokens_per_s"] == 2.0
  assert record["decode_max_batch"]["batch"] == 1 and record["peak_memory_bytes"] == 8
  assert record["train"] == {"skipped": compare.NOT_REACHED}
  assert "not reached" in (tmp_path / "compare.md").read_text()
