"""Command-line parsing shared by the entry points: a preset plus ``--section.field=value``."""

from __future__ import annotations

import argparse
import dataclasses

import jax

from train.config import Config, ConfigError, apply_overrides, available_presets, load_preset

DEFAULT_PRESET = "kimi_linear_tiny"


def describe(config: Config) -> str:
  """Every field of the config, one ``section.field = value`` line each."""
  lines = []
  for section in dataclasses.fields(config):
    for field in dataclasses.fields(getattr(config, section.name)):
      lines.append(f"  {section.name}.{field.name} = {getattr(getattr(config, section.name), field.name)!r}")
  return "\n".join(lines)


def parse_args(argv: list[str], prog: str) -> Config:
  """``--config PRESET_OR_PATH`` then any number of ``--section.field=value`` overrides."""
  parser = argparse.ArgumentParser(
      prog=prog, allow_abbrev=False, description=f"Presets: {', '.join(available_presets())}. Override any field with "
      "--section.field=value (e.g. --train.steps=100); --print_config lists them.")
  parser.add_argument("--config", default=DEFAULT_PRESET,
                      help="a preset name or a path such as configs/kimi_linear_tiny.py")
  parser.add_argument("--print_config", action="store_true", help="print the config and exit")
  parser.add_argument("--distributed", action="store_true",
                      help="join the other hosts with jax.distributed.initialize() (cluster "
                      "auto-detection, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
  args, overrides = parser.parse_known_args(argv)
  try:
    config = apply_overrides(load_preset(args.config), overrides)
  except ConfigError as error:
    parser.exit(2, f"{prog}: error: {error}\n")
  if args.print_config:
    print(describe(config))
    parser.exit(0)
  if args.distributed:
    jax.distributed.initialize()
  return config
