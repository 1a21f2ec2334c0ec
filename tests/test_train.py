"""The train loop: sharded steps equal one device, non-finite steps stop, resume is exact."""

import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from models.lm import LanguageModel
from tests._numerics import assert_close
from train import data
from train.checkpoint import Checkpointer
from train.config import Config, DataConfig, ModelConfig, TrainConfig
from train.loop import NonFiniteError, train
from train.optimizer import learning_rate_schedule, make_optimizer
from train.sharding import make_mesh, resolve_mesh_shape
from train.step import make_trainer

REPO = pathlib.Path(__file__).resolve().parent.parent
MODEL = ModelConfig(vocab_size=256, d_model=32, num_layers=2, d_state=4)
pytestmark = pytest.mark.compile_bound  # conftest: XLA's optimisation passes off


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  data.prepare(DataConfig(data_dir=str(path)))
  return str(path)


def _config(workdir, data_dir, **train_fields) -> Config:
  fields = dict(workdir=str(workdir), batch_size=8, warmup_steps=2, eval_every=1000,
                eval_batches=1, log_every=1000)
  train_cfg = TrainConfig(**{**fields, **train_fields})
  return Config(model=MODEL, data=DataConfig(data_dir=data_dir, seq_len=32), train=train_cfg,
                sample=dataclasses.replace(Config().sample, max_new_tokens=0))


# The tiny Kimi-Linear hybrid: KDA, KDA, MLA; a dense first layer, then MoE with its experts
# divided over the mesh's expert axis.
HYBRID = dataclasses.replace(
    MODEL, num_layers=3, layer_pattern="KKM", kda_num_heads=2, kda_head_dim=8,
    kda_chunk_size=16, mla_num_heads=2, mla_kv_lora_rank=8, mla_qk_nope_head_dim=8,
    mla_qk_rope_head_dim=4, mla_v_head_dim=8, max_cache_length=32, mlp="moe", first_k_dense=1,
    d_ff=32, moe_num_experts=4, moe_top_k=2, moe_d_ff=16)


# RWKV-7: two layers (the value residual crosses them), LayerNorm blocks, channel mixing.
RWKV7 = dataclasses.replace(MODEL, layer_pattern="R", mlp="rwkv7_channel_mix", norm="layer",
                            embedding_norm=True, tie_embeddings=False, rwkv_head_size=8,
                            rwkv_ffn_dim=64, rwkv_chunk_size=16)


@pytest.mark.parametrize("model, mesh_8", [
    (HYBRID, (2, 1, 2, 2)),  # data x expert x tensor.
    (RWKV7, (2, 2, 1, 2)),  # data x fsdp x tensor.
], ids=["kimi_linear", "rwkv7"])
def test_train_step_on_8_devices_equals_1_device(model, mesh_8):
  """8 devices give the same losses, parameters (MoE router biases included) and MoE load
  statistics as a single device, over 3 steps."""
  assert jax.device_count() == 8
  tc = TrainConfig(steps=3, warmup_steps=1)
  tokens = jax.random.randint(jax.random.key(0), (8, 33), 0, model.vocab_size)
  results = {}
  for shape in [(1, 1, 1, 1), mesh_8]:
    mesh = make_mesh(shape, jax.devices()[:int(np.prod(shape))])
    trainer = make_trainer(LanguageModel(model), make_optimizer(tc), mesh, 32,
                           learning_rate_schedule(tc))
    state = trainer.init(jax.random.key(1))
    history = []
    for _ in range(tc.steps):
      state, metrics = trainer.train_step(state, tokens)
      history.append({k: float(v) for k, v in metrics.items()})
    results[shape] = history, jax.device_get(state.params)
    first_projection = {HYBRID: "q_proj", RWKV7: "receptance"}[model]
    kernel = state.params["layer_0"]["mixer"][first_projection]["kernel"]
    assert len(kernel.sharding.device_set) == int(np.prod(shape))
  (history_1, params_1), (history_8, params_8) = results[(1, 1, 1, 1)], results[mesh_8]
  for name in history_1[0]:
    np.testing.assert_allclose([h[name] for h in history_1], [h[name] for h in history_8],
                               rtol=1e-5, err_msg=name)
  jax.tree.map(lambda a, b: assert_close(a, b, 1e-5, "params"), params_1, params_8)
  if model is HYBRID:
    assert {"moe_max_load", "moe_balance_loss"} <= set(history_1[0])
    bias = params_1["layer_1"]["mlp"]["e_score_correction_bias"]
    assert np.any(bias != 0), "the correction bias should have moved towards balance"


def test_mesh_shape_errors_name_the_problem():
  assert resolve_mesh_shape((-1, 2, 1, 1), 8) == (4, 2, 1, 1)
  with pytest.raises(ValueError, match="mesh_shape"):
    resolve_mesh_shape((3, -1, 1, 1), 8)
  with pytest.raises(ValueError, match="mesh_shape"):
    resolve_mesh_shape((2, 2, 1, 1), 8)


def test_non_finite_step_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
  """A huge learning rate blows up the parameters; the run stops naming the step."""
  config = _config(tmp_path, data_dir, steps=10, checkpoint_every=1, learning_rate=1e30,
                   warmup_steps=0)
  with pytest.raises(NonFiniteError, match=r"step (\d+): non-finite") as error:
    train(config)
  failed_step = int(re.search(r"step (\d+)", str(error.value)).group(1))
  assert failed_step >= 2
  assert Checkpointer(tmp_path / "checkpoints", 3).latest_step() == failed_step - 1


def _losses(workdir) -> dict[int, list[float]]:
  losses = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    losses.setdefault(record["step"], []).append(record["loss"])
  return losses


def _train_command(workdir, data_dir, steps):
  overrides = {"train.workdir": workdir, "train.steps": steps, "train.checkpoint_every": 1,
               "train.batch_size": 8, "train.warmup_steps": 2, "train.eval_every": 1000,
               "train.eval_batches": 1, "train.keep_checkpoints": 10, "data.data_dir": data_dir,
               "data.seq_len": 32, "model.d_model": 64, "model.num_layers": 2,
               "sample.max_new_tokens": 0}
  return [sys.executable, "-m", "train", "--config", "configs/mamba_tiny.py"] + [
      f"--{k}={v}" for k, v in overrides.items()]


def _train_env(cache_dir):
  """The runs' environment: one compilation cache for the three runs of a test (the straight run
  writes it; the killed run and the resumed one, compiling the same programs, read it back), and
  XLA's optimisation passes off as in this module's other tests (the runs are compile-bound)."""
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


def _run(command, env):
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_resume_after_sigkill_during_a_checkpoint_is_exact(tmp_path, data_dir):
  """2N steps straight == N steps, SIGKILL while a checkpoint is written, restart to 2N."""
  total = 8
  env = _train_env(tmp_path / "compilation_cache")
  straight = tmp_path / "straight"
  _run(_train_command(straight, data_dir, total), env)
  expected = {step: losses[0] for step, losses in _losses(straight).items()}
  assert sorted(expected) == list(range(1, total + 1))

  killed = tmp_path / "killed"
  process = subprocess.Popen(_train_command(killed, data_dir, total), cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  checkpoints, partial = killed / "checkpoints", None
  deadline = time.monotonic() + 240
  while partial is None and process.poll() is None and time.monotonic() < deadline:
    if checkpoints.is_dir():
      partial = next((p for p in os.scandir(checkpoints)
                      if ".orbax-checkpoint-tmp" in p.name and not p.name.startswith("1.")), None)
    if partial is None:
      time.sleep(0.0005)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert partial is not None, "the run finished before a checkpoint write could be interrupted"
  assert os.path.exists(partial.path), "the checkpoint write finished before the kill landed"
  killed_step = int(partial.name.split(".")[0])

  finished = Checkpointer(checkpoints, 10).latest_step()
  assert finished == killed_step - 1, "the partial checkpoint must not count as finished"
  output = _run(_train_command(killed, data_dir, total), env)
  assert f"resuming from step {finished}" in output
  for step, losses in _losses(killed).items():
    assert all(loss == expected[step] for loss in losses), (step, losses, expected[step])
  assert max(_losses(killed)) == total
