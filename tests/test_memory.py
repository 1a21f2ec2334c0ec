"""benchmarks.memory: its numbers are the real decode state's bytes, and the published
architectures give their closed-form cache sizes."""

import dataclasses
import json

import jax
import pytest

from benchmarks import memory
from models.lm import init_decode_state
from train.config import load_preset


def _actual_bytes(config, batch):
  return sum(x.nbytes for x in jax.tree.leaves(init_decode_state(config, batch)))


@pytest.mark.parametrize("name", ["kimi_linear_tiny", "mamba_tiny", "rwkv6_tiny", "rwkv7_tiny",
                                  "kda_tiny", "gqa_1b", "mla_1b", "kimi_linear_1b"])
def test_calculator_equals_the_real_pytree(name):
  """Allocated for real at a small context and batch: total bytes equal the pytree's, for
  the model's own dtype and for a cache precision that replaces it."""
  arch = memory.Architecture(name, "preset", load_preset(name).model)
  context, batch = 24, 3
  for precision in ("model", "bf16"):
    record = memory.state_record(arch, context, batch, precision)
    config = memory.sized_config(arch.config, context, precision)
    assert record["total_bytes"] == _actual_bytes(config, batch), precision
    # Per token and fixed parts add up: one sequence of one more token grows by cache/token.
    longer = memory.state_record(arch, context + 1, 1, precision)
    shorter = memory.state_record(arch, context, 1, precision)
    assert longer["total_bytes"] - shorter["total_bytes"] == record["cache_bytes_per_token"]
    assert shorter["total_bytes"] == (shorter["fixed_bytes_per_sequence"]
                                      + context * shorter["cache_bytes_per_token"])


def test_gqa_preset_with_gqa_shape_matches_closed_form():
  """gqa_1b: 20 layers x (K and V) x 4 KV heads x 128 x 2 bytes a token."""
  record = memory.state_record(memory.architectures(["gqa_1b"])[0], 1024, 1)
  assert record["cache_bytes_per_token"] == 20 * 2 * 4 * 128 * 2


@pytest.mark.parametrize("name,precision,per_token", [
    ("llama3.1_70b", "bf16", 80 * 2 * 8 * 128 * 2),  # 327,680
    ("llama3.1_70b_mha", "bf16", 80 * 2 * 64 * 128 * 2),
    ("llama3.1_70b_mqa", "bf16", 80 * 2 * 1 * 128 * 2),
    ("llama3.1_405b", "bf16", 126 * 2 * 8 * 128 * 2),
    ("llama3.1_405b_mha", "fp8", 126 * 2 * 128 * 128 * 1),
    ("llama3.1_405b_mqa", "fp32", 126 * 2 * 1 * 128 * 4),
    ("deepseek_v3", "bf16", 61 * (512 + 64) * 2),  # 70,272
    ("kimi_linear_48b", "bf16", 7 * (512 + 64) * 2),
])
def test_published_closed_forms(name, precision, per_token):
  (arch,) = memory.architectures([name])
  record = memory.state_record(arch, 2**20, 1, precision)
  assert record["cache_bytes_per_token"] == per_token
  assert record["total_bytes"] == per_token * 2**20 + record["fixed_bytes_per_sequence"]
  assert memory.state_record(arch, 2**20, 4, precision)["total_bytes"] > 4 * per_token * 2**20


def test_kimi_linear_48b_fixed_state_and_cut():
  """20 KDA layers of 32 float32 [128, 128] states plus bf16 conv windows (3 x 3 x 4096), and
  7 cache positions; the cache is 7/27 of an all-MLA model's (a 74% cut)."""
  (arch,) = memory.architectures(["kimi_linear_48b"])
  record = memory.state_record(arch, 4096, 1)
  assert record["fixed_bytes_per_sequence"] == 20 * (32 * 128 * 128 * 4 + 3 * 3 * 4096 * 2) + 7 * 4
  all_mla = dataclasses.replace(arch, config=dataclasses.replace(arch.config, layer_pattern="M"))
  all_mla_per_token = memory.state_record(all_mla, 4096, 1)["cache_bytes_per_token"]
  assert record["cache_bytes_per_token"] / all_mla_per_token == pytest.approx(7 / 27)


def test_cli_table_and_json(tmp_path, capsys):
  path = tmp_path / "memory.json"
  records = memory.main(["--models", "published", "mamba_tiny", "--contexts", "4K", "1M",
                         "--precision", "bf16", "--json", str(path)])
  out = capsys.readouterr().out
  assert "llama3.1_70b" in out and "327,680 B" in out and "70,272 B" in out
  data = json.loads(path.read_text())
  assert data["records"] == records and len(records) == 2 * 9
  assert {r["context"] for r in records} == {4096, 2**20}


def test_token_counts():
  assert memory.parse_tokens("1M") == 2**20 and memory.parse_tokens("4k") == 4096
  assert memory.parse_tokens("1000") == 1000 and memory.tokens_text(2**17) == "128K"
  with pytest.raises(Exception):
    memory.parse_tokens("0")
