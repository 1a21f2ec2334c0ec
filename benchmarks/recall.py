"""Recall: every architecture trained and tested on MQAR and on passkey retrieval, in one command.

    python -m benchmarks.recall                       # the five tiny presets on the CPU
    python -m benchmarks.recall --presets recall_attention,recall_kda --steps 300 --out runs/recall

For each preset (a file under ``configs/``; the defaults are the tiny ``recall_*`` presets of
equal width and depth, see ``configs/_recall.py``) and each task, a fresh model is trained with
the project's own trainer (``train.step.make_trainer`` with a loss on the answer positions only,
``train.optimizer``) for a fixed number of steps, then tested on held-out sequences:

MQAR
  Trained on a shuffled mix of every (pairs, length) setting of the grid (``--mqar_pairs`` x
  ``--mqar_lengths``, those that fit), right-padded to the longest; tested on each setting at its
  own length. Accuracy: the fraction of answers (values of queried keys) predicted exactly.
Passkey
  Trained on ``--passkey_train_lengths`` (needle depths of ``--passkey_depths``), tested at each
  of ``--passkey_lengths`` (which may be longer: extrapolation) and each depth. Accuracy: the
  fraction of passkeys whose digits are all predicted exactly, which is what greedy decoding
  after the question would give; the digit accuracy is in the JSON too.

Datasets are the TFDS builders of ``train.data.recall`` (built offline into ``--data_dir``, TFDS's
default when not given; each setting once). Outputs under ``--out``: ``recall.json`` (settings,
per-model parameters, loss curve, timings and every accuracy), ``recall.md`` (the tables),
``mqar.png`` (accuracy against pairs, one panel per length) and ``passkey_<preset>.png`` (a depth
x length heat map per model) plus ``passkey.png`` (all of them side by side).

A preset's ``train`` section gives the defaults for steps, batch size, learning rate and warmup;
``--override section.field=value`` changes any field of every preset (e.g. a larger model on a
GPU: ``--presets kda_1b,gqa_1b --override model.dtype=bfloat16``). The model's vocabulary must
hold 256 byte values for passkey and ``--mqar_vocab`` tokens for MQAR. On the CPU the models run
on one device (``--devices`` to change it); elsewhere on all devices, data parallel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import sys
import time
from typing import Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from models.lm import LanguageModel
from train.config import Config, apply_overrides, load_preset
from train.data import recall
from train.optimizer import learning_rate_schedule, make_optimizer
from train.sharding import make_mesh
from train.step import make_trainer

DEFAULT_PRESETS = ("recall_attention", "recall_kda", "recall_mamba", "recall_rwkv7", "recall_hybrid")
TASKS = ("mqar", "passkey")


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
  return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.recall", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--presets", type=_names, default=list(DEFAULT_PRESETS),
                 help="comma-separated presets (configs/ names or paths)")
  p.add_argument("--tasks", type=_names, default=list(TASKS), help="mqar, passkey or both")
  p.add_argument("--steps", type=int, default=None,
                 help="MQAR training steps (default: the preset's train.steps)")
  p.add_argument("--passkey_steps", type=int, default=None,
                 help="passkey training steps (default: the MQAR steps)")
  p.add_argument("--batch_size", type=int, default=None, help="default: the preset's")
  p.add_argument("--passkey_batch_size", type=int, default=None,
                 help="default: half of --batch_size (passkey sequences are longer)")
  p.add_argument("--learning_rate", type=float, default=None, help="default: the preset's")
  p.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
  p.add_argument("--mqar_vocab", type=int, default=32)
  p.add_argument("--mqar_pairs", type=_ints, default=[2, 4, 8])
  p.add_argument("--mqar_lengths", type=_ints, default=[32, 64])
  p.add_argument("--mqar_queries", type=int, default=None,
                 help="queries per sequence (default: every key once)")
  p.add_argument("--mqar_train_examples", type=int, default=4096, help="per setting")
  p.add_argument("--mqar_test_examples", type=int, default=128, help="per setting")
  p.add_argument("--passkey_lengths", type=_ints, default=[128, 256, 512],
                 help="tested context lengths (bytes read by the model)")
  p.add_argument("--passkey_train_lengths", type=_ints, default=[128])
  p.add_argument("--passkey_depths", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
  p.add_argument("--passkey_digits", type=int, default=5)
  p.add_argument("--passkey_train_examples", type=int, default=4096, help="per length")
  p.add_argument("--passkey_test_examples", type=int, default=100,
                 help="per length, shared out among the depths")
  p.add_argument("--data_dir", default=None, help="TFDS data directory (default: TFDS's)")
  p.add_argument("--out", default="runs/recall", help="output directory")
  p.add_argument("--devices", type=int, default=None,
                 help="devices to train on (default: 1 on the CPU, all elsewhere)")
  p.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                 help="applied to every preset; repeatable")
  p.add_argument("--log_every", type=int, default=20, help="steps between loss records")
  p.add_argument("--from_json", default=None, metavar="PATH",
                 help="only rewrite the markdown and the plots of a recall.json into --out")
  args = p.parse_args(argv)
  unknown = sorted(set(args.tasks) - set(TASKS))
  if unknown or not args.tasks:
    p.error(f"--tasks: expected a list of {TASKS}, got {args.tasks}")
  if not args.presets:
    p.error("--presets: give at least one preset")
  return args


# ------------------------------------------------------------------------------------------ data

def mqar_settings(args) -> list[recall.MqarConfig]:
  """The grid's settings that fit (2 pairs + 2 queries tokens per pair within the length)."""
  settings = []
  for length in args.mqar_lengths:
    for pairs in args.mqar_pairs:
      queries = pairs if args.mqar_queries is None else min(args.mqar_queries, pairs)
      if length + 1 >= 2 * pairs + 2 * queries and pairs <= (args.mqar_vocab - 1) // 2:
        settings.append(recall.mqar_config(
            vocab_size=args.mqar_vocab, num_pairs=pairs, num_queries=queries, seq_len=length,
            num_train=args.mqar_train_examples, num_test=args.mqar_test_examples,
            seed=args.seed))
  if not settings:
    raise SystemExit("MQAR: no (pairs, length) setting of the grid fits; a sequence of length L "
                     "holds at most (L + 1) // 4 pairs when every key is asked")
  return settings


def passkey_settings(args, lengths: Sequence[int], num_train: int):
  return [recall.passkey_config(seq_len=length, depths=args.passkey_depths,
                                digits=args.passkey_digits, num_train=num_train,
                                num_test=args.passkey_test_examples, seed=args.seed)
          for length in lengths]


def _quiet_custom_config(record: logging.LogRecord) -> bool:
  """Drops TFDS's warning for every config that is not listed in the builder class."""
  return not str(record.msg).startswith("Using custom data configuration")


def _build(builder_class, configs, data_dir) -> list[tfds.core.DatasetBuilder]:
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(_quiet_custom_config)
  try:
    return [recall.prepare(builder_class(config=c, data_dir=data_dir)) for c in configs]
  finally:
    absl_logger.removeFilter(_quiet_custom_config)


# ------------------------------------------------------------------------------ train and test

@dataclasses.dataclass
class Run:
  """One preset's model, trainer and mesh for one task."""

  config: Config
  trainer: object
  mesh: object
  state: object = None


def _devices(args) -> list:
  devices = jax.devices()
  count = args.devices or (1 if jax.default_backend() == "cpu" else len(devices))
  if not 1 <= count <= len(devices):
    raise SystemExit(f"--devices: expected 1 to {len(devices)}, got {count}")
  return devices[:count]


def train_task(config: Config, builders, seq_len: int, steps: int, batch_size: int, *,
               devices, seed: int, log_every: int, label: str) -> tuple[Run, dict]:
  """Trains a fresh model of ``config`` on the mixed train splits; returns it and a record."""
  tc = dataclasses.replace(config.train, steps=steps, batch_size=batch_size,
                           warmup_steps=min(config.train.warmup_steps, max(steps // 5, 1)),
                           seed=seed)
  if batch_size % len(devices):
    raise SystemExit(f"{label}: batch size {batch_size} is not a multiple of the "
                     f"{len(devices)} devices")
  mesh = make_mesh((len(devices), 1, 1, 1), devices)
  model = LanguageModel(config.model)
  trainer = make_trainer(model, make_optimizer(tc), mesh, seq_len, learning_rate_schedule(tc),
                         loss_weights=True)
  state = trainer.init(jax.random.key(tc.seed))
  batches = recall.padded_batches(builders, batch_size, seq_len, seed=seed)
  losses, window = [], []
  start = time.perf_counter()
  bar = tqdm.tqdm(total=steps, desc=label, unit="step", dynamic_ncols=True, file=sys.stdout,
                  mininterval=1.0)
  for step in range(steps):
    batch = next(batches)
    state, metrics = trainer.train_step(state, batch["tokens"], batch["weights"])
    window.append(metrics["loss"])
    if (step + 1) % log_every == 0 or step + 1 == steps:
      loss = float(np.mean(jax.device_get(window)))
      if not math.isfinite(loss):
        raise FloatingPointError(f"{label}: non-finite loss at step {step + 1}")
      losses.append([step + 1, loss])
      window.clear()
      bar.set_postfix(loss=f"{loss:.3f}")
    bar.update(1)
  jax.block_until_ready(state.params)
  seconds = time.perf_counter() - start
  bar.close()
  record = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len,
            "learning_rate": tc.learning_rate, "warmup_steps": tc.warmup_steps,
            "train_seconds": round(seconds, 2), "final_loss": losses[-1][1], "losses": losses}
  return Run(config, trainer, mesh, state), record


def answer_accuracy(run: Run, examples: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
  """Per sequence (right answers, answers), [num, 2], in batches of ``batch_size`` (the last
  filled with rows that have no answers)."""
  tokens, weights = examples["tokens"], examples["weights"]
  out = []
  for i in range(0, len(tokens), batch_size):
    t, w = tokens[i:i + batch_size], weights[i:i + batch_size]
    n = len(t)
    if n < batch_size:
      t = np.concatenate([t, np.zeros((batch_size - n, t.shape[1]), t.dtype)])
      w = np.concatenate([w, np.zeros((batch_size - n, w.shape[1]), w.dtype)])
    right, total = jax.device_get(run.trainer.answer_counts(run.state.params, t, w))
    out.append(np.stack([right[:n], total[:n]], axis=1))
  return np.concatenate(out)


def evaluate_mqar(run: Run, builders, batch_size: int) -> list[dict]:
  results = []
  for builder in builders:
    c = builder.builder_config
    counts = answer_accuracy(run, recall.padded_examples(builder), batch_size)
    results.append({"num_pairs": c.num_pairs, "num_queries": c.num_queries, "seq_len": c.seq_len,
                    "accuracy": float(counts[:, 0].sum() / counts[:, 1].sum()),
                    "sequence_accuracy": float(np.mean(counts[:, 0] == counts[:, 1])),
                    "answers": int(counts[:, 1].sum()), "sequences": len(counts)})
  return results


def evaluate_passkey(run: Run, builders, batch_size: int) -> list[dict]:
  results = []
  for builder in builders:
    examples = recall.padded_examples(builder)
    counts = answer_accuracy(run, examples, batch_size)
    for depth in builder.builder_config.depths:
      rows = np.isclose(examples["depth"], depth)
      right, total = counts[rows, 0], counts[rows, 1]
      results.append({"seq_len": builder.builder_config.seq_len, "depth": depth,
                      "accuracy": float(np.mean(right == total)),
                      "digit_accuracy": float(right.sum() / total.sum()),
                      "sequences": int(rows.sum())})
  return results


# ------------------------------------------------------------------------------------- outputs

def _short(name: str) -> str:
  return name.removeprefix("recall_")


def markdown(results: dict) -> str:
  lines = [f"Command: `{results['command']}`", "",
           f"Platform: {results['platform']} ({results['devices']} device(s)); "
           f"{results['total_seconds'] / 60:.1f} minutes in all.", ""]
  models = results["models"]
  lines += ["| model | layers | width | parameters |", "|---|---|---|---:|"]
  for name, m in models.items():
    lines.append(f"| {_short(name)} | {m['num_layers']} `{m['layer_pattern']}` | "
                 f"{m['d_model']} | {m['parameters']:,} |")
  if any("mqar" in m for m in models.values()):
    s = results["settings"]["mqar"]
    settings = [(r["num_pairs"], r["seq_len"]) for r in next(
        m["mqar"]["results"] for m in models.values() if "mqar" in m)]
    lines += ["", f"**MQAR** answer accuracy (vocabulary {s['vocab_size']}, every key queried "
              f"once unless noted; {s['test_sequences']} test sequences per setting), after "
              f"{s['steps']} steps of batch {s['batch_size']} on the mixed settings:", "",
              "| model | " + " | ".join(f"{p} pairs, L={l}" for p, l in settings)
              + " | mean | train s |",
              "|---|" + "---:|" * (len(settings) + 2)]
    for name, m in models.items():
      if "mqar" in m:
        accs = [r["accuracy"] for r in m["mqar"]["results"]]
        lines.append(f"| {_short(name)} | " + " | ".join(f"{a:.3f}" for a in accs)
                     + f" | {np.mean(accs):.3f} | {m['mqar']['train_seconds']:.0f} |")
  if any("passkey" in m for m in models.values()):
    s = results["settings"]["passkey"]
    lengths = sorted({r["seq_len"] for m in models.values() if "passkey" in m
                      for r in m["passkey"]["results"]})
    lines += ["", f"**Passkey** retrieval accuracy: the fraction of passkeys with all "
              f"{s['digits']} digits right (and, in brackets, of digits right), mean over depths "
              f"{s['depths']}; trained on lengths {s['train_lengths']} for {s['steps']} steps "
              f"of batch {s['batch_size']}:", "",
              "| model | " + " | ".join(f"L={l}" for l in lengths) + " | train s |",
              "|---|" + "---:|" * (len(lengths) + 1)]
    for name, m in models.items():
      if "passkey" in m:
        cells = []
        for l in lengths:
          rows = [r for r in m["passkey"]["results"] if r["seq_len"] == l]
          cells.append(f"{np.mean([r['accuracy'] for r in rows]):.2f} "
                       f"({np.mean([r['digit_accuracy'] for r in rows]):.2f})")
        lines.append(f"| {_short(name)} | " + " | ".join(cells)
                     + f" | {m['passkey']['train_seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def plots(results: dict, out: pathlib.Path) -> list[pathlib.Path]:
  """mqar.png, passkey.png and passkey_<preset>.png; returns the paths written."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  models = results["models"]
  mqar = {n: m["mqar"]["results"] for n, m in models.items() if "mqar" in m}
  if mqar:
    lengths = sorted({r["seq_len"] for rs in mqar.values() for r in rs})
    fig, axes = plt.subplots(1, len(lengths), figsize=(3.2 * len(lengths) + 0.8, 3.0),
                             squeeze=False, sharey=True)
    for ax, length in zip(axes[0], lengths):
      for name, rs in mqar.items():
        rows = sorted((r["num_pairs"], r["accuracy"]) for r in rs if r["seq_len"] == length)
        ax.plot(*zip(*rows), marker="o", label=_short(name))
      ax.set_xscale("log", base=2)
      pairs = sorted({r["num_pairs"] for rs in mqar.values() for r in rs})
      ax.set_xticks(pairs, [str(p) for p in pairs])
      ax.minorticks_off()
      ax.set_title(f"MQAR, length {length}", fontsize=9)
      ax.set_xlabel("key-value pairs", fontsize=8)
      ax.set_ylim(-0.02, 1.02)
      ax.grid(alpha=0.3)
      ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("answer accuracy", fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    written.append(out / "mqar.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)

  passkey = {n: m["passkey"]["results"] for n, m in models.items() if "passkey" in m}

  def heat_map(ax, name, rs, ylabel=True):
    lengths = sorted({r["seq_len"] for r in rs})
    depths = sorted({r["depth"] for r in rs})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in rs:
      grid[depths.index(r["depth"]), lengths.index(r["seq_len"])] = r["accuracy"]
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
      ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
              color="black" if value > 0.6 else "white")
    ax.set_xticks(range(len(lengths)), [str(l) for l in lengths], fontsize=7)
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
    ax.set_xlabel("context length", fontsize=8)
    if ylabel:
      ax.set_ylabel("needle depth", fontsize=8)
    ax.set_title(f"passkey: {_short(name)}", fontsize=9)
    return image

  for name, rs in passkey.items():
    fig, ax = plt.subplots(figsize=(3.4, 2.8))
    fig.colorbar(heat_map(ax, name, rs), ax=ax, shrink=0.8)
    fig.tight_layout()
    written.append(out / f"passkey_{_short(name)}.png")
    fig.savefig(written[-1], dpi=90)
    plt.close(fig)
  if passkey:
    fig, axes = plt.subplots(1, len(passkey), figsize=(2.9 * len(passkey) + 0.6, 2.8),
                             squeeze=False)
    for i, (ax, (name, rs)) in enumerate(zip(axes[0], passkey.items())):
      image = heat_map(ax, name, rs, ylabel=i == 0)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
    written.append(out / "passkey.png")
    fig.savefig(written[-1], dpi=90, bbox_inches="tight")
    plt.close(fig)
  return written


# ------------------------------------------------------------------------------------------ main

def main(argv: Sequence[str] | None = None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  tfds.disable_progress_bar()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.from_json:
    results = json.loads(pathlib.Path(args.from_json).read_text())
    (out / "recall.md").write_text(markdown(results))
    plots(results, out)
    return results
  began = time.perf_counter()
  devices = _devices(args)
  configs = {name: apply_overrides(load_preset(name), args.override) for name in args.presets}
  batch = {name: args.batch_size or c.train.batch_size for name, c in configs.items()}
  steps = {name: args.steps or c.train.steps for name, c in configs.items()}
  if args.learning_rate is not None:
    configs = {n: dataclasses.replace(c, train=dataclasses.replace(
        c.train, learning_rate=args.learning_rate)) for n, c in configs.items()}
  needed = max(256 if "passkey" in args.tasks else 0,
               args.mqar_vocab if "mqar" in args.tasks else 0)
  for name, c in configs.items():
    if c.model.vocab_size < needed:
      raise SystemExit(f"preset {name}: vocab_size {c.model.vocab_size} < {needed}, the tokens "
                       "the tasks use")

  settings, data = {}, {}
  t0 = time.perf_counter()
  if "mqar" in args.tasks:
    data["mqar"] = _build(recall.Mqar, mqar_settings(args), args.data_dir)
    settings["mqar"] = {
        "vocab_size": args.mqar_vocab, "pairs": args.mqar_pairs, "lengths": args.mqar_lengths,
        "queries": args.mqar_queries, "train_sequences": args.mqar_train_examples,
        "test_sequences": args.mqar_test_examples,
        "settings": [b.builder_config.name for b in data["mqar"]],
        "steps": steps[args.presets[0]], "batch_size": batch[args.presets[0]]}
  if "passkey" in args.tasks:
    train_lengths = sorted(set(args.passkey_train_lengths))
    # One builder per length; lengths that are only tested hold a single train sequence.
    passkey = {length: _build(recall.Passkey, passkey_settings(
        args, [length], args.passkey_train_examples if length in train_lengths else 1),
                              args.data_dir)[0]
               for length in sorted(set(train_lengths) | set(args.passkey_lengths))}
    data["passkey_train"] = [passkey[length] for length in train_lengths]
    data["passkey_test"] = [passkey[length] for length in args.passkey_lengths]
    pk_steps = {n: args.passkey_steps or s for n, s in steps.items()}
    pk_batch = {n: args.passkey_batch_size or max(1, b // 2) for n, b in batch.items()}
    settings["passkey"] = {
        "lengths": args.passkey_lengths, "train_lengths": train_lengths,
        "depths": args.passkey_depths, "digits": args.passkey_digits,
        "train_sequences": args.passkey_train_examples,
        "test_sequences": args.passkey_test_examples,
        "steps": pk_steps[args.presets[0]], "batch_size": pk_batch[args.presets[0]]}
  print(f"datasets ready in {time.perf_counter() - t0:.1f} s; training {len(configs)} "
        f"preset(s) on {len(devices)} {jax.default_backend()} device(s)", flush=True)

  results = {"command": "python -m benchmarks.recall " + " ".join(argv),
             "platform": jax.default_backend(), "device_kind": devices[0].device_kind,
             "devices": len(devices), "jax_version": jax.__version__, "seed": args.seed,
             "settings": settings, "models": {}}
  for name, config in configs.items():
    mc = config.model
    record = {"layer_pattern": mc.layer_pattern, "num_layers": mc.num_layers,
              "d_model": mc.d_model, "mlp": mc.mlp}
    results["models"][name] = record
    if "mqar" in args.tasks:
      builders = data["mqar"]
      run, record["mqar"] = train_task(
          config, builders, max(b.builder_config.seq_len for b in builders), steps[name],
          batch[name], devices=devices, seed=args.seed, log_every=args.log_every,
          label=f"{_short(name)} mqar")
      record["mqar"]["results"] = evaluate_mqar(run, builders, batch[name])
      record["parameters"] = sum(x.size for x in jax.tree.leaves(run.state.params))
      accs = " ".join(f"{r['num_pairs']}p/L{r['seq_len']}={r['accuracy']:.2f}"
                      for r in record["mqar"]["results"])
      print(f"  {name} MQAR: {accs}", flush=True)
    if "passkey" in args.tasks:
      run, record["passkey"] = train_task(
          config, data["passkey_train"], max(settings["passkey"]["train_lengths"]),
          pk_steps[name], pk_batch[name], devices=devices, seed=args.seed,
          log_every=args.log_every, label=f"{_short(name)} passkey")
      record["passkey"]["results"] = evaluate_passkey(run, data["passkey_test"], pk_batch[name])
      record["parameters"] = sum(x.size for x in jax.tree.leaves(run.state.params))
      by_length = {}
      for r in record["passkey"]["results"]:
        by_length.setdefault(r["seq_len"], []).append(r["accuracy"])
      print(f"  {name} passkey: " + " ".join(f"L{l}={np.mean(a):.2f}"
                                             for l, a in by_length.items()), flush=True)
    (out / "recall.json").write_text(json.dumps(results, indent=1))  # Partial results so far.

  results["total_seconds"] = round(time.perf_counter() - began, 1)
  (out / "recall.json").write_text(json.dumps(results, indent=1))
  table = markdown(results)
  (out / "recall.md").write_text(table)
  written = plots(results, out)
  print(table)
  print(f"wrote {out / 'recall.json'}, {out / 'recall.md'}, "
        + ", ".join(str(p) for p in written), flush=True)
  return results


if __name__ == "__main__":
  main()
