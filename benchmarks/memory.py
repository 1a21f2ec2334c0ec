"""Decode state and cache bytes: per token and in total at a context length and batch.

    python -m benchmarks.memory                           # every model, 1M tokens, batch 1
    python -m benchmarks.memory --contexts 4K 128K 1M --batch 8 --precision fp8
    python -m benchmarks.memory --models kimi_linear_48b deepseek_v3 llama3.1_70b --json mem.json

Models are the project's presets (``configs/``) and published architectures given by their
dimensions (``PUBLISHED``): Llama 3.1 70B and 405B with their grouped-query caches (8 KV heads
of 128) and their multi-head and multi-query variants, DeepSeek-V3 (MLA: a 512 latent plus a 64
RoPE key per token and layer) and Kimi-Linear 48B (SPEC 5, the ``kimi_linear_48b`` preset).
Each is a ``ModelConfig``; only the fields that shape the decode state matter here (layers,
pattern, heads, head and latent sizes, width for the recurrent states).

One mechanism: every number comes from ``models.lm.decode_state_size``, which sizes
``init_decode_state`` (the state the model decodes with) abstractly with ``jax.eval_shape``:
nothing is allocated, so 405B at 1M tokens costs nothing. tests/test_memory.py asserts that the
totals equal the bytes of the real pytree for the project's presets.

``--precision`` is the dtype of the caches: "model" keeps each config's compute dtype (the
state the model allocates); bf16, fp8 (float8_e4m3fn) or fp32 replace it. It applies to what the
model stores in its compute dtype (attention K/V, the MLA latent, conv windows, token shifts);
the recurrent matrices of KDA, Mamba and RWKV are float32 in the model whatever the precision.

Columns: ``cache/token`` the bytes one more token of context adds to one sequence's caches;
``fixed/seq`` one sequence's bytes that do not grow with the context (recurrent states, conv
windows, cache positions); ``total`` the whole state for ``batch`` sequences of ``context``
tokens (caches allocated to exactly ``context`` tokens); ``total/token`` that total divided by
batch x context.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import sys
from typing import Sequence

from models.lm import decode_state_size, layer_letters
from train.config import ModelConfig, available_presets, load_preset

PRECISIONS = {"model": None, "bf16": "bfloat16", "fp8": "float8_e4m3fn", "fp32": "float32"}
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_tokens(text: str) -> int:
  """A token count: 4096, 4K (4,096), 128k, 1M (1,048,576); binary multiples."""
  match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)\s*", text)
  if not match or int(match[1]) < 1:
    raise argparse.ArgumentTypeError(f"expected a positive token count such as 4096, 4K or 1M, "
                                      f"got {text!r}")
  return int(match[1]) * UNITS[match[2].upper()]


def tokens_text(count: int) -> str:
  """The inverse of ``parse_tokens`` for round counts: 1024 -> 1K, 1048576 -> 1M."""
  for suffix in ("G", "M", "K"):
    if count >= UNITS[suffix] and count % UNITS[suffix] == 0:
      return f"{count // UNITS[suffix]}{suffix}"
  return str(count)


def human_bytes(value: float) -> str:
  """Binary units with three significant figures: 327,680 -> 320 KiB."""
  for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if value >= size:
      return f"{value / size:.3g} {unit}"
  return f"{value:.3g} B"


# ------------------------------------------------------------------- published architectures

@dataclasses.dataclass(frozen=True)
class Architecture:
  name: str
  source: str  # "preset" or where the dimensions come from
  config: ModelConfig


def llama(layers: int, width: int, heads: int, kv_heads: int, d_ff: int) -> ModelConfig:
  """A Llama 3.1 decoder: softmax attention with RoPE, heads of 128, SwiGLU, vocab 128,256."""
  return ModelConfig(vocab_size=128_256, d_model=width, num_layers=layers, layer_pattern="A",
                     attn_num_heads=heads, attn_num_kv_heads=kv_heads, attn_head_dim=128,
                     rope_theta=500_000.0, mlp="swiglu", d_ff=d_ff, tie_embeddings=False,
                     dtype="bfloat16")


def _published() -> tuple[Architecture, ...]:
  llama_source = "Llama 3 paper (arXiv 2407.21783) Table 3"
  variant = lambda kind: f"{llama_source}, {kind} variant (same model, {kind} cache)"
  return (
      Architecture("llama3.1_70b", llama_source + ": 80 layers, 8 KV heads of 128",
                   llama(80, 8192, 64, 8, 28_672)),
      Architecture("llama3.1_70b_mha", variant("MHA: 64 KV heads"),
                   llama(80, 8192, 64, 64, 28_672)),
      Architecture("llama3.1_70b_mqa", variant("MQA: 1 KV head"), llama(80, 8192, 64, 1, 28_672)),
      Architecture("llama3.1_405b", llama_source + ": 126 layers, 8 KV heads of 128",
                   llama(126, 16_384, 128, 8, 53_248)),
      Architecture("llama3.1_405b_mha", variant("MHA: 128 KV heads"),
                   llama(126, 16_384, 128, 128, 53_248)),
      Architecture("llama3.1_405b_mqa", variant("MQA: 1 KV head"),
                   llama(126, 16_384, 128, 1, 53_248)),
      Architecture("deepseek_v3", "DeepSeek-V3 report (arXiv 2412.19437): 61 MLA layers, latent "
                   "512 + RoPE key 64 cached per token",
                   ModelConfig(vocab_size=129_280, d_model=7168, num_layers=61, layer_pattern="M",
                               mla_num_heads=128, mla_q_lora_rank=1536, mla_kv_lora_rank=512,
                               mla_qk_nope_head_dim=128, mla_qk_rope_head_dim=64,
                               mla_v_head_dim=128, mla_use_rope=True, tie_embeddings=False,
                               dtype="bfloat16")),
      Architecture("kimi_linear_48b", "SPEC 5 (the kimi_linear_48b preset): 20 KDA "
                   "layers (32 heads of 128) + 7 MLA layers (latent 512 + 64)",
                   load_preset("kimi_linear_48b").model),
  )


def architectures(names: Sequence[str] = ("all",)) -> list[Architecture]:
  """The named models; "presets", "published" and "all" name groups (kimi_linear_48b is both a
  preset and published)."""
  presets = {name: Architecture(name, "preset", load_preset(name).model)
             for name in available_presets()}
  published = {a.name: a for a in _published()}
  chosen = {}
  for name in names:
    if name in ("presets", "all"):
      chosen.update(presets)
    if name in ("published", "all"):
      chosen.update(published)
    if name in presets or name in published:
      chosen[name] = presets.get(name) or published[name]
    elif name not in ("presets", "published", "all"):
      raise SystemExit(f"--models: unknown model {name!r}; expected a preset "
                       f"{sorted(presets)}, a published architecture {sorted(published)}, or "
                       "presets / published / all")
  return list(chosen.values())


# ------------------------------------------------------------------------------- the numbers

def sized_config(config: ModelConfig, context: int, precision: str = "model") -> ModelConfig:
  """``config`` with caches of ``context`` tokens in the ``precision``'s dtype."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
  dtype = PRECISIONS[precision] or config.dtype
  return dataclasses.replace(config, max_cache_length=context, dtype=dtype)


def layer_summary(config: ModelConfig) -> str:
  """The layers by mixer, in order of first appearance: "15 K + 5 M"."""
  counts = collections.Counter(layer_letters(config))
  return " + ".join(f"{n} {letter}" for letter, n in counts.items())


def state_record(arch: Architecture, context: int, batch: int, precision: str = "model") -> dict:
  """The decode state of ``arch`` for ``batch`` sequences of ``context`` tokens."""
  config = sized_config(arch.config, context, precision)
  one, whole = decode_state_size(config, 1), decode_state_size(config, batch)
  total = whole.total()
  return dict(model=arch.name, source=arch.source, layers=layer_summary(config),
              dtype=config.dtype, context=context, batch=batch,
              cache_bytes_per_token=one.per_token_bytes, fixed_bytes_per_sequence=one.fixed_bytes,
              total_bytes=total, total_bytes_per_token=total / (batch * context))


COLUMNS = (("model", 26, lambda r: r["model"]), ("layers", 14, lambda r: r["layers"]),
           ("dtype", 13, lambda r: r["dtype"]), ("context", 7, lambda r: tokens_text(r["context"])),
           ("batch", 5, lambda r: str(r["batch"])),
           ("cache/token", 16, lambda r: f"{r['cache_bytes_per_token']:,} B"),
           ("fixed/seq", 10, lambda r: human_bytes(r["fixed_bytes_per_sequence"])),
           ("total", 10, lambda r: human_bytes(r["total_bytes"])),
           ("total/token", 11, lambda r: human_bytes(r["total_bytes_per_token"])))


def table(records: list[dict]) -> str:
  lines = [" ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w, _) in enumerate(COLUMNS))]
  for r in records:
    lines.append(" ".join(f(r).ljust(w) if i < 3 else f(r).rjust(w)
                          for i, (_, w, f) in enumerate(COLUMNS)))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.memory",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", nargs="+", default=["all"],
                      help="preset or published names, or the groups presets / published / all")
  parser.add_argument("--contexts", nargs="+", type=parse_tokens, default=[2**20],
                      help="context lengths in tokens: 4096, 4K, 1M (binary multiples)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--precision", choices=sorted(PRECISIONS), default="model",
                      help="cache dtype; 'model' keeps each config's compute dtype")
  parser.add_argument("--json", metavar="PATH", help="also write the records as JSON")
  args = parser.parse_args(argv)
  if args.batch < 1:
    parser.error("--batch must be >= 1")
  records = [state_record(arch, context, args.batch, args.precision)
             for context in args.contexts for arch in architectures(args.models)]
  print(f"# decode state bytes, precision {args.precision}, batch {args.batch} "
        "(from models.lm.decode_state_size)")
  print(table(records), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(precision=args.precision, batch=args.batch, contexts=args.contexts,
                     records=records), f, indent=1)
  return records


if __name__ == "__main__":
  main(sys.argv[1:])
