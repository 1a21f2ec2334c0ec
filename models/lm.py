"""One language model for every architecture, built from a layer-pattern string.

Each letter of ``config.layer_pattern`` (tiled to ``config.num_layers``) names a mixer:

  S  Mamba-1 selective scan (models.mamba.MambaMixer)
  K  Kimi Delta Attention (models.kda.KDAMixer)

Blocks are pre-norm residual: ``x += mixer(RMSNorm(x))``, then ``x += MLP(RMSNorm(x))`` when
``config.mlp`` names one (SPEC 5); the residual stream is float32.
``logits, state = model.apply(params, tokens, state=None, segment_ids=None)``: with a decode
state and one token per sequence the model takes one decode step; otherwise it runs the whole
sequence (continuing from ``state`` if given) and returns the state after the last token.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.kda import KDAMixer
from models.layers import Dense, RMSNorm
from models.mamba import MambaMixer
from models.mlp import SwiGLU

MIXERS = {"S": MambaMixer, "K": KDAMixer}
MLPS = {"none": None, "swiglu": SwiGLU}


def layer_letters(config) -> str:
  """The pattern tiled to ``num_layers``; raises ValueError on an unknown letter."""
  pattern = config.layer_pattern
  unknown = sorted(set(pattern) - set(MIXERS))
  if not pattern or unknown:
    raise ValueError(f"layer_pattern must be a non-empty string of {sorted(MIXERS)}, got "
                     f"{pattern!r} (unknown letters: {unknown})")
  if config.num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {config.num_layers}")
  return (pattern * config.num_layers)[:config.num_layers]


def _check_mlp(config) -> None:
  if config.mlp not in MLPS:
    raise ValueError(f"mlp must be one of {sorted(MLPS)}, got {config.mlp!r}")


def init_decode_state(config, batch_size: int) -> tuple[Any, ...]:
  """A zero decode state: one pytree per layer, as the model returns and consumes it."""
  return tuple(MIXERS[letter].initial_state(config, batch_size) for letter in layer_letters(config))


def decode_state_bytes(config, batch_size: int) -> int:
  """Bytes of the decode state for ``batch_size`` sequences, from the real structure's shapes."""
  shapes = jax.eval_shape(lambda: init_decode_state(config, batch_size))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


class Block(nn.Module):
  """``x += mixer(RMSNorm(x))``, then ``x += MLP(RMSNorm(x))`` unless ``config.mlp`` is "none"."""

  config: Any
  letter: str
  num_layers: int

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), name=name)
    constrain = lambda a: nn.with_logical_constraint(a, ("batch", "length", "embed"))
    y, state = MIXERS[self.letter](cfg, self.num_layers, name="mixer")(norm("norm")(x), state,
                                                                       segment_ids)
    x = constrain(x + y.astype(jnp.float32))
    if MLPS[cfg.mlp] is not None:
      y = MLPS[cfg.mlp](cfg, self.num_layers, name="mlp")(norm("mlp_norm")(x))
      x = constrain(x + y.astype(jnp.float32))
    return x, state


class LanguageModel(nn.Module):
  """Embedding, blocks from the layer pattern, final RMSNorm, output head.

  Call: tokens [batch, time] int32 -> (logits [batch, time, vocab] float32, state).
  """

  config: Any  # train.config.ModelConfig

  @nn.compact
  def __call__(self, tokens, state=None, segment_ids=None):
    cfg = self.config
    letters = layer_letters(cfg)
    _check_mlp(cfg)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must have shape [batch, time], got {tuple(tokens.shape)}")
    if state is not None and len(state) != len(letters):
      raise ValueError(f"state must hold one entry per layer ({len(letters)}), got {len(state)}")
    embed = nn.Embed(
        cfg.vocab_size, cfg.d_model,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    ("vocab", "embed")),
        dtype=jnp.dtype(cfg.dtype), name="embed")
    x = embed(tokens).astype(jnp.float32)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    new_state = []
    for i, letter in enumerate(letters):
      x, layer_state = Block(cfg, letter, len(letters), name=f"layer_{i}")(
          x, None if state is None else state[i], segment_ids)
      new_state.append(layer_state)
    h = RMSNorm(cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(h)
    else:
      logits = Dense(cfg.vocab_size, ("embed", "vocab"), kernel_init=nn.initializers.normal(0.02),
                     dtype=jnp.dtype(cfg.dtype), name="head")(h)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits, tuple(new_state)
