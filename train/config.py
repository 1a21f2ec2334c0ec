"""Typed run configuration: the schema, preset loading and command-line overrides.

A preset is a Python file under ``configs/`` that defines ``get_config() -> Config``. Any field
can be overridden from the command line as ``--section.field=value``, for example::

    python -m train --config configs/mamba_tiny.py --train.steps=50 --model.d_model=96

Unknown presets, sections and fields raise ``ConfigError`` naming what was asked for and what
exists.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import types
import typing
from typing import Any, Sequence

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
  """A preset, section, field or value that the schema does not accept."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of the language model.

  ``layer_pattern`` is tiled to ``num_layers`` letters; each letter names a mixer
  (``S`` = Mamba selective scan, ``K`` = KDA, ``M`` = MLA, ``A`` = softmax attention, ``F`` =
  RWKV-6, ``R`` = RWKV-7). Each block
  is ``x += mixer(RMSNorm(x))``, then ``x += MLP(RMSNorm(x))`` unless ``mlp`` is "none"
  ("swiglu": dense; "moe": mixture of experts after the first ``first_k_dense`` layers). ``dtype`` is the compute dtype; parameters
  stay float32. ``norm_eps`` serves every RMSNorm, KDA's per-head output norm included.
  """

  vocab_size: int = 256
  d_model: int = 64
  num_layers: int = 2
  layer_pattern: str = "S"
  norm_eps: float = 1e-5
  norm: str = "rms"  # The block and final norms: "rms" (RMSNorm) or "layer" (LayerNorm, RWKV).
  embedding_norm: bool = False  # A norm right after the embedding (RWKV's ln0).
  tie_embeddings: bool = True
  dtype: str = "float32"
  # MLP after each mixer: "none", "swiglu" (down(silu(gate(x)) * up(x))) or "moe".
  mlp: str = "none"
  d_ff: int | None = None  # SwiGLU width; None: 8/3 d_model rounded up to a multiple of 256.
  # Shared by Mamba and KDA: the short-conv width and the dt-bias initialisation, softplus^-1(dt)
  # with dt log-uniform in [dt_min, dt_max] and at least dt_init_floor (SPEC 1.4, 3.2).
  d_conv: int = 4
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  # Mamba mixer (SPEC 1.3-1.4).
  d_state: int = 16
  expand: int = 2
  dt_rank: int | None = None  # None: ceil(d_model / 16).
  dt_scale: float = 1.0
  scan_implementation: str | None = None  # None: the fastest one for the platform.
  # KDA mixer (SPEC 3.2): q/k heads of kda_head_dim, value heads of kda_v_head_dim (grouped
  # when kda_num_v_heads is a multiple of kda_num_heads), one float32 state
  # [kda_head_dim, kda_v_head_dim] per value head.
  kda_num_heads: int = 4
  kda_head_dim: int = 16
  kda_num_v_heads: int | None = None  # None: kda_num_heads.
  kda_v_head_dim: int | None = None  # None: kda_head_dim.
  kda_implementation: str | None = None  # None: the fastest one for the platform.
  kda_chunk_size: int = 64  # Tokens per chunk of the chunkwise form, a multiple of 16.
  # RWKV-6 (F) and RWKV-7 (R) time mixing (SPEC 2): heads of rwkv_head_size channels; LoRA
  # ranks None take the official rules (RWKV-6: mix 32, decay 64; RWKV-7: max(32, round(f sqrt(C)
  # / 32) 32) with f = 2.5 decay, 2.5 a, 1.7 value, 5 gate). Their channel mixing is the MLP
  # "rwkv6_channel_mix" (width 3.5 C) or "rwkv7_channel_mix" (width 4 C) unless rwkv_ffn_dim.
  rwkv_head_size: int = 64
  rwkv_ffn_dim: int | None = None
  rwkv_mix_lora: int = 32
  rwkv_decay_lora: int | None = None
  rwkv_a_lora: int | None = None
  rwkv_value_lora: int | None = None
  rwkv_gate_lora: int | None = None
  rwkv_implementation: str | None = None  # None: the fastest one for the platform.
  rwkv_chunk_size: int = 64  # Tokens per chunk of the chunkwise form, a multiple of 16.
  # Softmax attention (A: multi-head / grouped-query with RoPE) and MLA (M) share the cache
  # length (the longest prompt + generation a decode state holds) and the attention backend.
  max_cache_length: int = 2048
  attention_implementation: str | None = None  # None: cuDNN on GPU where it applies, else XLA.
  attn_num_heads: int = 4
  attn_num_kv_heads: int | None = None  # None: attn_num_heads (multi-head); 1: multi-query.
  attn_head_dim: int = 16
  rope_theta: float = 10000.0
  # YaRN context extension (SPEC 4): > 1 stretches RoPE's long wavelengths by this factor beyond
  # rope_original_max_length and scales the logits by (0.1 ln factor + 1)^2.
  rope_yarn_factor: float = 1.0
  rope_original_max_length: int = 4096
  # MLA (SPEC 4): queries from W_q x (mla_q_lora_rank None) or W_qb RMSNorm(W_qa x); keys and
  # values from a latent of mla_kv_lora_rank plus a head-shared mla_qk_rope_head_dim part that
  # is rotated only when mla_use_rope (Kimi-Linear: NoPE, never rotated).
  mla_num_heads: int = 4
  mla_q_lora_rank: int | None = None
  mla_kv_lora_rank: int = 32
  mla_qk_nope_head_dim: int = 16
  mla_qk_rope_head_dim: int = 8
  mla_v_head_dim: int = 16
  mla_use_rope: bool = False
  # Mixture of experts (mlp="moe", SPEC 5): layers [0, first_k_dense) use a dense SwiGLU of
  # width d_ff; the others route each token to moe_top_k of moe_num_experts SwiGLU experts of
  # width moe_d_ff (sigmoid router, correction bias, renormalised weights times
  # moe_routed_scaling_factor) plus moe_num_shared_experts always-on experts.
  first_k_dense: int = 0
  moe_num_experts: int = 8
  moe_top_k: int = 2
  moe_num_shared_experts: int = 1
  moe_d_ff: int = 64
  moe_routed_scaling_factor: float = 1.0
  moe_renormalize: bool = True
  moe_dispatch: str = "dropless"  # "dropless" (sorted ragged matmuls) or "dense" (reference).
  # Auxiliary-loss-free balancing (DeepSeek-V3): after each step the correction bias of each
  # expert moves by this much towards equal load; 0 disables it.
  moe_bias_update_rate: float = 1e-3


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the tokens come from: a TFDS dataset of text, read as bytes.

  The default is ``stdlib_bytes``, built offline from the Python standard library's sources.
  ``data_dir`` None means TFDS's default directory.
  """

  dataset: str = "stdlib_bytes"
  data_dir: str | None = None
  text_key: str = "text"
  train_split: str = "train"
  eval_split: str = "validation"
  seq_len: int = 128
  shuffle_seed: int = 0
  num_workers: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, mesh, evaluation, checkpointing and logging.

  ``batch_size`` is global (over all hosts and devices). ``mesh_shape`` gives the sizes of the
  ("data", "fsdp", "expert", "tensor") axes; one entry may be -1 to take the remaining devices.
  """

  workdir: str = "runs/default"
  steps: int = 200
  batch_size: int = 16
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  final_learning_rate_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip_norm: float = 1.0
  seed: int = 0
  mesh_shape: tuple[int, int, int, int] = (-1, 1, 1, 1)
  eval_every: int = 50
  eval_batches: int = 4
  checkpoint_every: int = 50
  keep_checkpoints: int = 3
  log_every: int = 10


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """Text generation after training and from ``python -m train.generate``."""

  prompt: str = "def "
  max_new_tokens: int = 200
  temperature: float = 0.8
  top_k: int = 0  # 0: no top-k filter.
  top_p: float = 1.0  # 1.0: no nucleus filter.
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  sample: SampleConfig = SampleConfig()


def available_presets() -> list[str]:
  return sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))


def load_preset(name_or_path: str) -> Config:
  """Loads ``configs/<name>.py`` (a bare name or a path to a file) and calls its get_config()."""
  path = pathlib.Path(name_or_path)
  if path.suffix != ".py":
    path = CONFIGS_DIR / f"{name_or_path}.py"
  if not path.is_file():
    raise ConfigError(
        f"--config: unknown preset {name_or_path!r}; expected a file under configs/ "
        f"or one of {available_presets()}")
  spec = importlib.util.spec_from_file_location(f"_preset_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config: preset {str(path)!r} defines no get_config()")
  config = module.get_config()
  if not isinstance(config, Config):
    raise ConfigError(f"--config: {str(path)}'s get_config() returned {type(config).__name__}, "
                      "expected train.config.Config")
  return config


def _field_types(cls) -> dict[str, Any]:
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_value(text: str, annotation: Any, where: str) -> Any:
  """Converts the command-line text to the field's annotated type."""
  origin = typing.get_origin(annotation)
  args = typing.get_args(annotation)
  if origin in (typing.Union, types.UnionType):
    if text.lower() == "none" and type(None) in args:
      return None
    (inner,) = [a for a in args if a is not type(None)]
    return _parse_value(text, inner, where)
  if origin is tuple:
    parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
    if len(parts) != len(args):
      raise ConfigError(f"{where}: expected {len(args)} comma-separated values, got {text!r}")
    return tuple(_parse_value(p.strip(), a, where) for p, a in zip(parts, args))
  if annotation is bool:
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"{where}: expected true or false, got {text!r}")
  try:
    return annotation(text)
  except ValueError:
    raise ConfigError(f"{where}: expected a value of type {annotation.__name__}, got {text!r}")


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
  """Applies ``section.field=value`` strings (a leading ``--`` is allowed) to ``config``."""
  sections = _field_types(Config)
  for item in overrides:
    key, sep, text = item.removeprefix("--").partition("=")
    if not sep:
      raise ConfigError(f"override {item!r}: expected --section.field=value")
    section_name, _, field_name = key.partition(".")
    if section_name not in sections:
      raise ConfigError(f"override {item!r}: unknown config section {section_name!r}; "
                        f"expected one of {sorted(sections)}")
    section = getattr(config, section_name)
    fields = _field_types(type(section))
    if field_name not in fields:
      raise ConfigError(f"override {item!r}: unknown config field {key!r}; fields of "
                        f"{section_name!r} are {sorted(fields)}")
    value = _parse_value(text, fields[field_name], f"override {key}")
    section = dataclasses.replace(section, **{field_name: value})
    config = dataclasses.replace(config, **{section_name: section})
  return config
