"""The training loop: data, sharded steps, evaluation, checkpoints, logs and a final sample."""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from models.lm import LanguageModel
from train import data
from train.checkpoint import Checkpointer
from train.config import Config
from train.generate import print_sample
from train.optimizer import learning_rate_schedule, make_optimizer
from train.sharding import batch_sharding, make_mesh
from train.step import make_trainer


class NonFiniteError(FloatingPointError):
  """A step produced a loss or gradient norm that is NaN or infinite."""


def _global_batch(local_batch: np.ndarray, mesh) -> jax.Array:
  """Assembles the hosts' [batch / hosts, time] arrays into one global sharded array."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)


class MetricsLog:
  """Appends JSON lines to ``<workdir>/metrics.jsonl`` (process 0 only)."""

  def __init__(self, workdir: pathlib.Path):
    self._path = workdir / "metrics.jsonl" if jax.process_index() == 0 else None

  def write(self, **record) -> None:
    if self._path is not None:
      with self._path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _check_finite(step: int, metrics: dict) -> None:
  """Raises NonFiniteError naming ``step`` (1-based, as logged) if any metric is NaN or inf."""
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    raise NonFiniteError(
        f"step {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; the run "
        "stops without saving this step, and the last checkpoint before it stays the latest")


def _evaluate(trainer, params, batches, mesh) -> float:
  losses = [float(trainer.eval_loss(params, _global_batch(b, mesh))) for b in batches]
  return float(np.mean(losses))


def train(config: Config) -> dict:
  """Trains (or resumes) the run in ``config.train.workdir``; returns the final metrics."""
  tc, dc = config.train, config.data
  workdir = pathlib.Path(tc.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    data.prepare(dc)
  multihost_utils.sync_global_devices("data prepared")

  mesh = make_mesh(tc.mesh_shape)
  model = LanguageModel(config.model)
  trainer = make_trainer(model, make_optimizer(tc), mesh, dc.seq_len, learning_rate_schedule(tc))
  hosts = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_batches = data.train_iterator(dc, tc.batch_size, **hosts)
  eval_set = data.eval_batches(dc, tc.batch_size, tc.eval_batches, **hosts)

  checkpointer = Checkpointer(workdir / "checkpoints", tc.keep_checkpoints)
  start = checkpointer.latest_step()
  if start is None:
    state, start = trainer.init(jax.random.key(tc.seed)), 0
  else:
    state = checkpointer.restore(start, trainer.abstract_state, train_batches)
  log = MetricsLog(workdir)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  tokens_per_step = tc.batch_size * dc.seq_len
  print(f"model: {num_params:,} parameters, layers {config.model.num_layers} "
        f"({config.model.layer_pattern!r}), width {config.model.d_model}; mesh "
        f"{dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} device(s); "
        + (f"resuming from step {start}" if start else "starting from scratch"), flush=True)

  metrics, eval_loss, recent_losses = {}, None, []
  bar = tqdm.tqdm(total=tc.steps, initial=start, unit="step", dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  try:
    for step in range(start, tc.steps):
      t0 = time.perf_counter()
      state, metrics = trainer.train_step(state, _global_batch(next(train_batches), mesh))
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      done = step + 1
      _check_finite(done, metrics)
      seconds = time.perf_counter() - t0
      metrics.update(step_time=seconds, tokens_per_second=tokens_per_step / seconds)
      recent_losses.append(metrics["loss"])
      bar.update(1)
      bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_second']:,.0f}",
                      step_s=f"{seconds:.3f}")
      if done % tc.eval_every == 0 or done == tc.steps:
        eval_loss = _evaluate(trainer, state.params, eval_set, mesh)
        metrics["eval_loss"] = eval_loss
      log.write(step=done, **metrics)
      if done % tc.log_every == 0 or "eval_loss" in metrics:
        bar.write(f"step {done:>6}  loss {np.mean(recent_losses):.4f} (mean of "
                  f"{len(recent_losses)})  "
                  + (f"eval {eval_loss:.4f}  " if "eval_loss" in metrics else "")
                  + f"grad_norm {metrics['grad_norm']:.3f}  lr {metrics['learning_rate']:.2e}  "
                  + (f"moe max load {metrics['moe_max_load']:.2f}  "
                     if "moe_max_load" in metrics else "")
                  + f"{metrics['tokens_per_second']:,.0f} tok/s")
        recent_losses.clear()
      if done % tc.checkpoint_every == 0 or done == tc.steps:
        checkpointer.save(done, state, train_batches)
  finally:
    bar.close()
    checkpointer.wait()
    checkpointer.close()
  if jax.process_index() == 0 and config.sample.max_new_tokens:
    print_sample(model, state.params, config.sample)
  return metrics


def load_for_inference(config: Config):
  """The model and the parameters of the latest checkpoint under ``config.train.workdir``."""
  checkpointer = Checkpointer(pathlib.Path(config.train.workdir) / "checkpoints", 1)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"train.workdir: no finished checkpoint under "
                            f"{config.train.workdir}/checkpoints; train first")
  mesh = make_mesh((-1, 1, 1, 1))
  model = LanguageModel(config.model)
  trainer = make_trainer(model, make_optimizer(config.train), mesh, config.data.seq_len)
  state = checkpointer.restore(step, trainer.abstract_state)
  checkpointer.close()
  print(f"loaded step {step} from {config.train.workdir}")
  return model, state.params
