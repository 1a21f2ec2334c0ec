"""Whole models against context length: prefill, decode, training step, memory.

On an H200 (the 1B presets, all within 0.3% of 1.13B parameters; contexts 1K to 1M)::

    python -m benchmarks.compare --presets kimi_linear_1b,mla_1b,gqa_1b,mamba_1b,rwkv7_1b \
        --contexts 1K,4K,16K,64K,256K,1M --out runs/compare_h200

(a training step of an attention model at 1M tokens takes minutes: ``--max_train_context 256K``
skips it; ``--max_call_s`` already stops timing after one such call). On a CPU, tiny presets::

    python -m benchmarks.compare --presets kimi_linear_tiny,mamba_tiny,rwkv7_tiny \
        --contexts 32,64,128 --warmup 1 --iters 3 --train_tokens 256 --max_decode_batch 4 \
        --peak_tflops 0.1 --out /tmp/compare

(tests/test_compare.py runs a smaller version of this).

A model is a preset name, optionally with model-field overrides after colons
(``gqa_1b:attention_implementation=xla``). For each model and context length (ascending), on the
first device:

* **prefill**: one jitted forward over a prompt of ``context`` tokens at batch 1 that returns the
  decode state (``train.generate.make_decoder``'s prefill; the head runs on the last position).
* **decode, batch 1** and **decode, largest batch**: the decode step (``make_decoder``'s step,
  greedy) from a state whose caches hold ``context`` tokens (zeros: the cost of a step does not
  depend on the values), its state donated on accelerators. The largest batch doubles from 1
  while the parameters plus the decode state (``models.lm.decode_state_bytes``, twice over on a
  CPU, where buffers are not donated) fit in 90% of the device's memory, up to
  ``--max_decode_batch``; a batch whose compiled program does not fit, or that runs out of
  memory, is halved. Tokens/s = batch / median step time.
* **train**: a jitted AdamW step (``train.step.next_token_loss``, ``train.optimizer``) on
  sequences of ``context`` tokens, ``max(1, --train_tokens // context)`` of them. Model FLOPs per
  token = 6 N + 3 sum_attn h (d_qk + d_v) T: N the parameters a token activates
  (``models.lm.parameter_counts``: the MoE experts it is routed to, the head, not the input
  embedding lookup), the second term the causal score and value products of the softmax (A) and
  MLA (M) layers over T = context (forward h (d_qk + d_v) T per token, times 3 with the backward).
  The state updates of the recurrent mixers (KDA, Mamba, RWKV; O(h d_k d_v) a token, a few percent
  of 6 N at 1B) are not counted, so their MFU is slightly understated. MFU = model FLOPs/s over
  the device's dense bf16 peak (``PEAK_TFLOPS`` by device kind, or ``--peak_tflops``); none when
  neither knows the device (a CPU).

Each program is compiled once (``benchmarks.harness.compile_fn``), warmed up ``--warmup`` calls,
then timed over ``--iters`` calls; the median is reported (a call slower than ``--max_call_s``
ends the timing after it). Memory: each program's compiled footprint (arguments + outputs +
scratch - donated, from ``memory_analysis``), checked against the device before it runs; ``peak
memory`` is the largest footprint of a context's programs. Where the device reports
``memory_stats`` (GPU, TPU), the process's ``peak_bytes_in_use`` so far is recorded too. The
decode state bytes come from the same calculator as ``python -m benchmarks.memory``.

A measurement that does not fit is skipped, and so is the same measurement at the longer contexts
of that model; the table says so. Writes ``compare.json``, ``compare.md`` (the table) and
``throughput.png`` / ``memory.png`` (matplotlib; one line per model, log-log against context)
under ``--out``; a progress bar runs meanwhile. The JSON and the table are rewritten after every
measurement, so an interrupted run keeps what it measured; ``--merge A/compare.json B/compare.json``
joins runs made separately on one device (say one model per call, or ``--measurements train``
at other settings) into one table and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics
import sys
import time
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from benchmarks import harness
from benchmarks.memory import human_bytes, parse_tokens, tokens_text
from models.lm import (LanguageModel, decode_state_bytes, init_decode_state, layer_letters,
                       parameter_counts)
from models.moe import update_router_bias
from train.config import (ConfigError, ModelConfig, SampleConfig, TrainConfig, apply_overrides,
                          load_preset)
from train.generate import make_decoder
from train.optimizer import make_optimizer
from train.step import next_token_loss

DEFAULT_PRESETS = "kimi_linear_1b,mla_1b,gqa_1b,mamba_1b,rwkv7_1b"
DEFAULT_CONTEXTS = "1K,4K,16K,64K,256K,1M"
# Dense bf16 peak TFLOP/s by a substring of jax's device_kind, the first match wins.
PEAK_TFLOPS = (("H200", 989.4), ("H100", 989.4), ("B200", 2250.0), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0), ("TPU v6", 918.0), ("TPU v5 lite", 197.0),
               ("TPU v5e", 197.0), ("TPU v5", 459.0), ("TPU v4", 275.0))
MEASUREMENTS = (("prefill", "prefill"), ("decode_batch_1", "decode, batch 1"),
                ("decode_max_batch", "decode, largest batch"), ("train", "train step"))
GREEDY = SampleConfig(temperature=0.0)
MEMORY_FRACTION = 0.9  # of the device's memory, for the decode batch search
NOT_MEASURED = "not measured (--measurements)"
NOT_REACHED = "not reached: the run stopped first"
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Resource exhausted", "out of memory", "Out of memory")


class DoesNotFit(Exception):
  """A measurement that needs more memory than the device has."""


# ------------------------------------------------------------------------------ the device

def device_memory(device, override_gib: float | None) -> int:
  """Bytes the device can hold: ``--memory_gib``, else ``memory_stats()["bytes_limit"]``, else
  (a CPU) the host's physical memory."""
  if override_gib:
    return int(override_gib * 2**30)
  stats = _memory_stats(device)
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _memory_stats(device) -> dict | None:
  try:
    return device.memory_stats()
  except Exception:  # Backends without allocator statistics raise or return None.
    return None


def peak_tflops(device_kind: str, override: float | None) -> float | None:
  if override:
    return override
  return next((peak for key, peak in PEAK_TFLOPS if key in device_kind), None)


# ---------------------------------------------------------------------------- the model

def load_model(spec: str) -> ModelConfig:
  """``preset[:field=value[:field=value...]]`` -> the preset's ModelConfig with the overrides."""
  name, *overrides = spec.split(":")
  config = apply_overrides(load_preset(name), [f"model.{item}" for item in overrides])
  return config.model


def train_flops_per_token(config: ModelConfig, context: int, activated: int) -> float:
  """6 N + 3 sum over A and M layers of h (d_qk + d_v) T (see the module docstring)."""
  attention = 0
  for letter in layer_letters(config):
    if letter == "A":
      attention += config.attn_num_heads * 2 * config.attn_head_dim
    elif letter == "M":
      attention += config.mla_num_heads * (config.mla_qk_nope_head_dim
                                           + config.mla_qk_rope_head_dim + config.mla_v_head_dim)
  return 6.0 * activated + 3.0 * attention * context


def inference_params(params, dtype):
  """Matrices in the compute dtype (as a server would hold them); vectors stay float32."""
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2 else x
  return jax.jit(lambda p: jax.tree.map(cast, p))(params)


def nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------- measuring

def footprint(compiled) -> int | None:
  """Arguments + outputs + scratch - donated (aliased) bytes of a compiled program."""
  memory = harness.memory_bytes(compiled)
  if memory["temp_bytes"] is None:
    return None
  return (memory["argument_bytes"] + memory["output_bytes"] + memory["temp_bytes"]
          - (memory["alias_bytes"] or 0))


def compile_checked(fn: Callable, args: Sequence, limit: int, donate: Sequence[int] = ()):
  """Compiles ``fn``; raises DoesNotFit when its footprint exceeds the device's memory."""
  compiled, compile_s = harness.compile_fn(fn, args, donate)
  needed = footprint(compiled)
  if needed is not None and needed > limit:
    raise DoesNotFit(f"needs {human_bytes(needed)} > {human_bytes(limit)}")
  return compiled, compile_s, needed


def time_calls(call: Callable[[], None], warmup: int, iters: int, max_call_s: float) -> list:
  """Seconds of each timed call of ``call`` (which blocks until done), after ``warmup`` calls;
  a call slower than ``max_call_s`` is the last one (and is timed if none was yet)."""
  times = []
  for i in range(warmup + iters):
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    if i >= warmup:
      times.append(seconds)
    if seconds > max_call_s:
      return times or [seconds]
  return times


@dataclasses.dataclass
class Bench:
  """What every measurement of one model at one context needs."""

  spec: str
  config: ModelConfig  # with caches of context + margin tokens
  context: int
  params: object  # float32 master parameters
  serving_params: object  # matrices in the compute dtype
  activated: int
  args: argparse.Namespace
  limit: int  # device bytes
  donate: bool  # whether the platform reuses donated buffers

  @property
  def model(self) -> LanguageModel:
    return LanguageModel(self.config)

  def timed(self, call: Callable[[], None]) -> tuple[float, int]:
    times = time_calls(call, self.args.warmup, self.args.iters, self.args.max_call_s)
    return statistics.median(times), len(times)


def measure_prefill(bench: Bench) -> dict:
  prefill, _ = make_decoder(bench.model, GREEDY)
  if nbytes(bench.serving_params) + decode_state_bytes(bench.config, 1) > bench.limit:
    raise DoesNotFit("the parameters and the decode state alone exceed the device")
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, bench.config.vocab_size, (1, bench.context)), jnp.int32)
  args = (bench.serving_params, tokens, jax.random.key(0))
  compiled, compile_s, memory = compile_checked(prefill, args, bench.limit)
  median, calls = bench.timed(lambda: jax.block_until_ready(compiled(*args)))
  return dict(batch=1, median_s=median, tokens_per_s=bench.context / median, calls=calls,
              compile_s=compile_s, memory_bytes=memory)


def _at_position(state, position: int):
  """The decode state with every attention cache's position set to ``position``."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.full_like(x, position) if getattr(path[-1], "key", None) == "position"
      else x, state)


def measure_decode(bench: Bench, batch: int) -> dict:
  _, step = make_decoder(bench.model, GREEDY)
  state = jax.jit(lambda: _at_position(init_decode_state(bench.config, batch), bench.context))()
  token, key = jnp.zeros((batch,), jnp.int32), jax.random.key(0)
  compiled, compile_s, memory = compile_checked(
      step, (bench.serving_params, token, state, key), bench.limit, (2,) if bench.donate else ())
  carry = [token, state]

  def call():
    carry[:] = compiled(bench.serving_params, carry[0], carry[1], key)
    jax.block_until_ready(carry)

  median, calls = bench.timed(call)
  del carry[:], state
  return dict(batch=batch, median_s=median, tokens_per_s=batch / median, calls=calls,
              compile_s=compile_s, memory_bytes=memory,
              state_bytes=decode_state_bytes(bench.config, batch, bench.context))


def decode_batch_candidates(bench: Bench, cap: int) -> tuple[list[int], str]:
  """Batches to try, largest first: doubling from 1 while the parameters and the decode state
  fit ``MEMORY_FRACTION`` of the device (by the calculator), at most ``cap``."""
  copies = 1 if bench.donate else 2
  fits = lambda b: (nbytes(bench.serving_params) + copies * decode_state_bytes(bench.config, b)
                    <= MEMORY_FRACTION * bench.limit)
  batch = 1
  while batch * 2 <= cap and fits(batch * 2):
    batch *= 2
  limited_by = "cap" if batch * 2 > cap else "memory"
  candidates = []
  while batch >= 1:
    candidates.append(batch)
    batch //= 2
  return candidates, limited_by


def measure_decode_max(bench: Bench, cap: int, batch_1: dict) -> dict:
  candidates, limited_by = decode_batch_candidates(bench, cap)
  for batch in candidates:
    if batch == 1 and "tokens_per_s" in batch_1:
      return {**batch_1, "limited_by": limited_by}
    try:
      return {**measure_decode(bench, batch), "limited_by": limited_by}
    except Exception as err:  # Too big after all: halve.
      if not (isinstance(err, DoesNotFit) or is_oom(err)):
        raise
      limited_by = "memory"
  raise DoesNotFit("not even batch 1 fits")


def measure_train(bench: Bench) -> dict:
  config, context = bench.config, bench.context
  model = bench.model
  batch = max(1, bench.args.train_tokens // context)
  optimizer = make_optimizer(TrainConfig())

  def train_step(params, opt_state, tokens):
    (loss, sown), grads = jax.value_and_grad(
        lambda p: next_token_loss(model, p, tokens), has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return update_router_bias(params, sown, config.moe_bias_update_rate), opt_state, loss

  params = jax.tree.map(jnp.copy, bench.params)  # The step consumes (donates) its copy.
  opt_state = jax.jit(optimizer.init)(params)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, context + 1)), jnp.int32)
  compiled, compile_s, memory = compile_checked(
      train_step, (params, opt_state, tokens), bench.limit, (0, 1) if bench.donate else ())
  carry = [params, opt_state]

  def call():
    carry[0], carry[1], loss = compiled(carry[0], carry[1], tokens)
    jax.block_until_ready((carry, loss))

  median, calls = bench.timed(call)
  del carry[:], params, opt_state
  tokens_per_s = batch * context / median
  flops = train_flops_per_token(config, context, bench.activated)
  peak = peak_tflops(jax.devices()[0].device_kind, bench.args.peak_tflops)
  return dict(batch=batch, median_s=median, tokens_per_s=tokens_per_s, calls=calls,
              compile_s=compile_s, memory_bytes=memory, flops_per_token=flops,
              model_flops_per_s=tokens_per_s * flops,
              mfu=None if peak is None else tokens_per_s * flops / (peak * 1e12))


def is_oom(err: BaseException) -> bool:
  return any(marker in str(err) for marker in OOM_MARKERS)


def guarded(measure: Callable[[], dict], strict: bool) -> tuple[dict, bool]:
  """Runs ``measure``; a measurement that does not fit (or fails, unless ``strict``) becomes
  ``{"skipped": reason}``. Returns (result, whether it ran out of memory)."""
  try:
    return measure(), False
  except DoesNotFit as err:
    return {"skipped": f"does not fit: {err}"}, True
  except Exception as err:
    if is_oom(err):
      return {"skipped": "out of memory"}, True
    if strict:
      raise
    first_line = (str(err).strip().splitlines() or [""])[0][:200]
    return {"skipped": f"failed: {type(err).__name__}: {first_line}"}, False


# ---------------------------------------------------------------------------------- output

def _cell(result: dict, text: Callable[[dict], str], notes: list[str], where: str) -> str:
  if "skipped" in result:
    notes.append(f"{where}: {result['skipped']}")
    return f"skipped [{len(notes)}]"
  return text(result)


def markdown(records: list[dict], meta: dict) -> str:
  """The table, one row per model and context, with the skipped measurements as notes."""
  fmt = lambda value: f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
  notes: list[str] = []
  head = ("| model | context | prefill s | prefill tok/s | decode tok/s, B=1 | decode tok/s, "
          "largest B (B) | train tok/s (B) | MFU | peak memory | decode state, B=1 |")
  lines = [f"Device: {meta['device_kind']} ({meta['platform']}), "
           f"{human_bytes(meta['memory_limit_bytes'])}; "
           f"peak {meta['peak_tflops'] or '-'} TFLOP/s; "
           f"jax {meta['jax_version']}; median of {meta['iters']} calls after {meta['warmup']} "
           "warm-up.", "", head,
           "|" + "---|" * (head.count("|") - 1)]
  for r in records:
    where = lambda name: f"{r['model']} at {tokens_text(r['context'])}, {name}"
    cells = [
        r["model"], tokens_text(r["context"]),
        _cell(r["prefill"], lambda m: f"{m['median_s']:.3g}", notes, where("prefill")),
        "-" if "skipped" in r["prefill"] else fmt(r["prefill"]["tokens_per_s"]),
        _cell(r["decode_batch_1"], lambda m: fmt(m["tokens_per_s"]), notes, where("decode B=1")),
        _cell(r["decode_max_batch"], lambda m: f"{fmt(m['tokens_per_s'])} ({m['batch']})", notes,
              where("decode, largest batch")),
        _cell(r["train"], lambda m: f"{fmt(m['tokens_per_s'])} ({m['batch']})", notes,
              where("train")),
        "-" if "skipped" in r["train"] or r["train"]["mfu"] is None
        else f"{100 * r['train']['mfu']:.1f}%",
        "-" if r.get("peak_memory_bytes") is None else human_bytes(r["peak_memory_bytes"]),
        human_bytes(r["decode_state_bytes"]),
    ]
    lines.append("| " + " | ".join(cells) + " |")
  if notes:
    lines += ["", "Skipped:", ""] + [f"{i}. {note}" for i, note in enumerate(notes, 1)]
  return "\n".join(lines) + "\n"


def _series(records: list[dict], model: str, value: Callable[[dict], float | None]):
  xs, ys = [], []
  for r in records:
    if r["model"] == model:
      y = value(r)
      xs.append(r["context"])
      ys.append(math.nan if y is None else y)
  return xs, ys


def plot(records: list[dict], out: pathlib.Path, title: str) -> list[pathlib.Path]:
  """throughput.png and memory.png: one line per model against the context (log-log)."""
  import matplotlib
  import matplotlib.lines
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  def get(measurement, field, scale=1.0):
    return lambda r: (r[measurement][field] * scale if field in r[measurement]
                      and r[measurement][field] is not None else None)

  figures = {
      "throughput.png": [
          ("prefill tokens/s (batch 1)", get("prefill", "tokens_per_s")),
          ("decode tokens/s, batch 1", get("decode_batch_1", "tokens_per_s")),
          ("decode tokens/s, largest batch", get("decode_max_batch", "tokens_per_s")),
          ("largest decode batch", get("decode_max_batch", "batch")),
          ("training tokens/s", get("train", "tokens_per_s")),
          ("training MFU (%)", get("train", "mfu", 100.0))],
      "memory.png": [
          ("decode state, batch 1 (GiB)", lambda r: r["decode_state_bytes"] / 2**30),
          ("decode state, largest batch (GiB)", get("decode_max_batch", "state_bytes", 2**-30)),
          ("prefill program memory (GiB)", get("prefill", "memory_bytes", 2**-30)),
          ("training step memory (GiB)", get("train", "memory_bytes", 2**-30))],
  }
  models = list(dict.fromkeys(r["model"] for r in records))
  contexts = sorted({r["context"] for r in records})
  paths = []
  for filename, panels in figures.items():
    columns = 3 if len(panels) > 4 else 2
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for ax, (label, value) in zip(axes.flat, panels):
      for i, model in enumerate(models):  # One colour per model in every panel.
        xs, ys = _series(records, model, value)
        if any(math.isfinite(y) and y > 0 for y in ys):
          ax.plot(xs, ys, marker="o", color=f"C{i % 10}", label=model)
      ax.set_xscale("log", base=2)
      if ax.lines:
        ax.set_yscale("log")
      ax.set_xticks(contexts, [tokens_text(c) for c in contexts])
      ax.set_title(label)
      ax.set_xlabel("context (tokens)")
      ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
      ax.axis("off")
    handles = [matplotlib.lines.Line2D([], [], marker="o", color=f"C{i % 10}")
               for i in range(len(models))]
    fig.legend(handles, models, loc="lower center", ncol=min(len(models), 5))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    path = out / filename
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


# ------------------------------------------------------------------------------------ main

def _comma_list(text: str) -> list[str]:
  return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.compare",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--presets", default=DEFAULT_PRESETS,
                      help="comma-separated models: preset[:field=value...]")
  parser.add_argument("--contexts", default=DEFAULT_CONTEXTS,
                      help="comma-separated context lengths: 1024, 1K, 1M (binary multiples)")
  parser.add_argument("--measurements", default=",".join(name for name, _ in MEASUREMENTS),
                      help="comma-separated subset of: "
                           + ", ".join(name for name, _ in MEASUREMENTS))
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--max_call_s", type=float, default=60.0,
                      help="a call slower than this ends the timing of its program")
  parser.add_argument("--train_tokens", type=int, default=65_536,
                      help="tokens per training step (batch = max(1, this // context))")
  parser.add_argument("--max_train_context", type=parse_tokens, default=None,
                      help="skip the training step above this context (default: none)")
  parser.add_argument("--max_decode_batch", type=int, default=None,
                      help="cap of the decode batch search (default 4096; 8 on a CPU)")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="the device's peak TFLOP/s for MFU (default: by device kind)")
  parser.add_argument("--memory_gib", type=float, default=None,
                      help="the device memory to plan for (default: what the device reports)")
  parser.add_argument("--strict", action="store_true",
                      help="raise on a failure that is not out-of-memory instead of skipping")
  parser.add_argument("--no_plots", action="store_true")
  parser.add_argument("--out", default="runs/compare", help="output directory")
  parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                      help="measure nothing: one table and plots under --out from these runs' "
                           "compare.json files (one device)")
  args = parser.parse_args(argv)
  try:
    args.contexts = sorted({parse_tokens(c) for c in _comma_list(args.contexts)})
  except argparse.ArgumentTypeError as err:
    parser.error(f"--contexts: {err}")
  args.presets = _comma_list(args.presets)
  args.measurements = _comma_list(args.measurements)
  known = [name for name, _ in MEASUREMENTS]
  if unknown := sorted(set(args.measurements) - set(known)):
    parser.error(f"--measurements: unknown {unknown}; expected some of {known}")
  if not args.presets or not args.contexts or args.iters < 1 or args.warmup < 0:
    parser.error("expected at least one preset and context, --iters >= 1, --warmup >= 0")
  return args


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  if args.merge:
    return merge(args.merge, pathlib.Path(args.out), plots=not args.no_plots)
  device = jax.devices()[0]
  limit = device_memory(device, args.memory_gib)
  cap = args.max_decode_batch or (8 if device.platform == "cpu" else 4096)
  donate = device.platform != "cpu"
  margin = args.warmup + args.iters + 2  # decode steps the caches must hold after the context
  try:
    models = [(spec, load_model(spec)) for spec in args.presets]
  except ConfigError as err:
    raise SystemExit(str(err))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  meta = dict(platform=device.platform, device_kind=device.device_kind,
              jax_version=jax.__version__, memory_limit_bytes=limit,
              peak_tflops=peak_tflops(device.device_kind, args.peak_tflops), warmup=args.warmup,
              iters=args.iters, max_decode_batch=cap, train_tokens=args.train_tokens)
  print(f"# benchmarks.compare on {device.platform} ({device.device_kind}), "
        f"{human_bytes(limit)}, jax {jax.__version__}: {', '.join(args.presets)} at "
        f"{', '.join(tokens_text(c) for c in args.contexts)} tokens; median of {args.iters} calls "
        f"after {args.warmup} warm-up", flush=True)

  records = []
  total, done = len(models) * len(args.contexts) * len(MEASUREMENTS), 0
  # The bar shows on a terminal; every finished measurement also prints a line "[k/total] ...".
  with tqdm(total=total, unit="measurement", file=sys.stderr, dynamic_ncols=True,
            disable=None) as bar:
    for spec, base in models:
      bar.set_description(f"{spec}: parameters")
      params = jax.jit(lambda: LanguageModel(base).init(
          jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])()
      params = nn.meta.unbox(params)
      serving = inference_params(params, jnp.dtype(base.dtype))
      total_params, activated = parameter_counts(base)
      stopped: dict[str, int] = {}  # measurement -> the context at which it stopped fitting
      for context in args.contexts:
        config = dataclasses.replace(base, max_cache_length=context + margin)
        bench = Bench(spec, config, context, params, serving, activated, args, limit, donate)
        record = dict(model=spec, context=context, layers=base.layer_pattern,
                      num_layers=base.num_layers, dtype=base.dtype, params_total=total_params,
                      params_activated=activated,
                      decode_state_bytes=decode_state_bytes(config, 1, context),
                      **{name: {"skipped": NOT_REACHED} for name, _ in MEASUREMENTS},
                      peak_memory_bytes=None)
        records.append(record)
        for name, label in MEASUREMENTS:
          bar.set_description(f"{spec} {tokens_text(context)}: {label}")
          if name not in args.measurements:
            result = {"skipped": NOT_MEASURED}
          elif name in stopped:
            result = {"skipped": f"did not fit at {tokens_text(stopped[name])}"}
          elif name == "train" and args.max_train_context and context > args.max_train_context:
            result = {"skipped": f"above --max_train_context={tokens_text(args.max_train_context)}"}
          else:
            measure = {"prefill": lambda: measure_prefill(bench),
                       "decode_batch_1": lambda: measure_decode(bench, 1),
                       "decode_max_batch": lambda: measure_decode_max(
                           bench, cap, record["decode_batch_1"]),
                       "train": lambda: measure_train(bench)}[name]
            result, out_of_memory = guarded(measure, args.strict)
            # Longer contexts need more (training: once its batch is down to one sequence).
            if out_of_memory and (name != "train" or args.train_tokens // context <= 1):
              stopped[name] = context
          record[name] = result
          record["peak_memory_bytes"] = peak_memory(record)
          write_outputs(records, meta, out, plots=False, quiet=True)  # Partial runs keep it.
          bar.update(1)
          done += 1
          summary = (f"skipped: {result['skipped']}" if "skipped" in result else
                     f"{result['tokens_per_s']:,.1f} tokens/s (batch {result['batch']}, median "
                     f"{1e3 * result['median_s']:.2f} ms, compile {result['compile_s']:.1f} s)")
          tqdm.write(f"[{done}/{total}] {spec} {tokens_text(context)} {label}: {summary}",
                     file=sys.stdout)
        stats = _memory_stats(device)
        if stats and stats.get("peak_bytes_in_use"):
          record["device_peak_bytes_in_use_so_far"] = int(stats["peak_bytes_in_use"])
      del params, serving

  return dict(meta, records=write_outputs(records, meta, out, plots=not args.no_plots))


def peak_memory(record: dict) -> int | None:
  """The largest compiled footprint among a record's measurements."""
  footprints = [record[name].get("memory_bytes") for name, _ in MEASUREMENTS]
  return max((f for f in footprints if f is not None), default=None)


def write_outputs(records: list[dict], meta: dict, out: pathlib.Path, *, plots: bool,
                  quiet: bool = False) -> list[dict]:
  """Writes compare.json and compare.md (and the plots) under ``out``; returns ``records``."""
  with open(out / "compare.json", "w") as f:
    json.dump(dict(meta, records=records), f, indent=1)
  table = markdown(records, meta)
  (out / "compare.md").write_text(table)
  if quiet:
    return records
  print(table, flush=True)
  if plots:
    try:
      paths = plot(records, out, f"{meta['device_kind']} ({meta['platform']})")
      print("plots: " + ", ".join(str(p) for p in paths))
    except ImportError:
      print("plots skipped: matplotlib is not installed (pip install matplotlib)")
  print(f"wrote {out / 'compare.json'} and {out / 'compare.md'}")
  return records


def merge(paths: Sequence[str], out: pathlib.Path, plots: bool) -> dict:
  """One table and one set of plots from several runs' compare.json (same device), each run's
  settings kept under ``runs``. Records of one model and context are joined: a later run's
  measurement replaces an earlier one, except where the later run did not measure it. Rows go by
  model (in the order the runs first name them), then by context."""
  runs = [json.loads(pathlib.Path(path).read_text()) for path in paths]
  kinds = {run["device_kind"] for run in runs}
  if len(kinds) != 1:
    raise SystemExit(f"--merge: the runs come from different devices: {sorted(kinds)}")
  settings = [{k: v for k, v in run.items() if k != "records"} for run in runs]
  meta = dict(settings[0], runs=settings)
  if len({(s["warmup"], s["iters"]) for s in settings}) > 1:
    meta["iters"] = "/".join(str(s["iters"]) for s in settings)
    meta["warmup"] = "/".join(str(s["warmup"]) for s in settings)
  out.mkdir(parents=True, exist_ok=True)
  records: dict[tuple[str, int], dict] = {}
  for run in runs:
    for record in run["records"]:
      key = (record["model"], record["context"])
      merged = dict(records.get(key, {}))
      for field, value in record.items():
        if not (isinstance(value, dict) and value.get("skipped") in (NOT_MEASURED, NOT_REACHED)
                and field in merged):
          merged[field] = value
      merged["peak_memory_bytes"] = peak_memory(merged)
      records[key] = merged
  models = list(dict.fromkeys(model for model, _ in records))
  records = [records[key] for key in sorted(records, key=lambda k: (models.index(k[0]), k[1]))]
  return dict(meta, records=write_outputs(records, meta, out, plots=plots))


if __name__ == "__main__":
  main(sys.argv[1:])
