"""Presets and overrides: every preset loads; bad names and values give clear errors."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from models.lm import LanguageModel, layer_letters
from train.cli import parse_args
from train.config import Config, ConfigError, apply_overrides, available_presets, load_preset


@pytest.mark.parametrize("name", available_presets())
def test_every_preset_loads_and_builds_a_valid_pattern(name):
  config = load_preset(name)
  assert isinstance(config, Config)
  assert len(layer_letters(config.model)) == config.model.num_layers


def test_preset_by_path_equals_by_name():
  assert load_preset("configs/mamba_tiny.py") == load_preset("mamba_tiny")


def test_mamba_130m_matches_the_paper():
  model = load_preset("mamba_130m").model
  assert (model.num_layers, model.d_model, model.d_state, model.expand) == (24, 768, 16, 2)


def test_kda_1b_has_about_a_billion_parameters():
  model = load_preset("kda_1b").model
  shapes = jax.eval_shape(
      lambda: LanguageModel(model).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 1_047_839_264


def test_overrides_are_typed():
  config = apply_overrides(load_preset("mamba_tiny"), [
      "--train.steps=7", "--model.dtype=bfloat16", "--train.mesh_shape=2,2,1,2",
      "--model.dt_rank=None", "--model.tie_embeddings=false", "--train.learning_rate=1e-4"])
  assert config.train.steps == 7
  assert config.model.dtype == "bfloat16"
  assert config.train.mesh_shape == (2, 2, 1, 2)
  assert config.model.dt_rank is None
  assert config.model.tie_embeddings is False
  assert config.train.learning_rate == 1e-4


@pytest.mark.parametrize("override, message", [
    ("--train.stepz=3", r"unknown config field 'train.stepz'.*steps"),
    ("--trian.steps=3", r"unknown config section 'trian'"),
    ("--train.steps=three", r"train.steps: expected a value of type int"),
    ("--train.mesh_shape=2,2", r"train.mesh_shape: expected 4"),
    ("--model.tie_embeddings=maybe", r"model.tie_embeddings: expected true or false"),
    ("train.steps", r"expected --section.field=value"),
])
def test_bad_overrides_name_the_field(override, message):
  with pytest.raises(ConfigError, match=message):
    apply_overrides(Config(), [override])


def test_unknown_preset_lists_the_available_ones():
  with pytest.raises(ConfigError, match=r"unknown preset 'mamba_huge'.*mamba_tiny"):
    load_preset("mamba_huge")


def test_cli_reports_config_errors_and_exits(capsys):
  with pytest.raises(SystemExit) as exit_info:
    parse_args(["--config", "configs/mamba_tiny.py", "--model.d_modle=3"], prog="train")
  assert exit_info.value.code == 2
  assert "unknown config field 'model.d_modle'" in capsys.readouterr().err


def test_cli_applies_overrides():
  config = parse_args(["--config", "mamba_tiny", "--train.steps=3"], prog="train")
  assert config.train.steps == 3
  assert dataclasses.replace(config, train=load_preset("mamba_tiny").train) == load_preset(
      "mamba_tiny")
