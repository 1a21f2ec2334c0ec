"""One language model for every architecture, built from a layer-pattern string.

Each letter of ``config.layer_pattern`` (tiled to ``config.num_layers``) names a mixer:

  S  Mamba-1 selective scan (models.mamba.MambaMixer)
  K  Kimi Delta Attention (models.kda.KDAMixer)
  M  multi-head latent attention (models.mla.MLAMixer)
  A  softmax attention, multi-head or grouped-query, with RoPE (models.attention.AttentionMixer)

A pattern as long as the model gives every layer explicitly, e.g. Kimi-Linear's 27 layers
``"KKKM" * 6 + "KKM"`` (MLA at 0-indexed layers 3, 7, ..., 23, 26; SPEC 5).

Blocks are pre-norm residual: ``x += mixer(RMSNorm(x))``, then ``x += MLP(RMSNorm(x))`` when
``config.mlp`` names one (SPEC 5): "swiglu" everywhere, or "moe" with the first
``config.first_k_dense`` layers dense; the residual stream is float32.
``logits, state = model.apply(params, tokens, state=None, segment_ids=None)``: with a decode
state and one token per sequence the model takes one decode step; otherwise it runs the whole
sequence (continuing from ``state`` if given) and returns the state after the last token.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.attention import AttentionMixer
from models.kda import KDAMixer
from models.layers import Dense, RMSNorm
from models.mamba import MambaMixer
from models.mla import MLAMixer
from models.mlp import SwiGLU
from models.moe import MoE

MIXERS = {"S": MambaMixer, "K": KDAMixer, "M": MLAMixer, "A": AttentionMixer}
MLPS = {"none": None, "swiglu": SwiGLU, "moe": MoE}


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


def layer_mlps(config) -> tuple[str, ...]:
  """The MLP of each layer: ``config.mlp``, except that with "moe" the first
  ``config.first_k_dense`` layers are dense ("swiglu")."""
  if config.mlp not in MLPS:
    raise ValueError(f"mlp must be one of {sorted(MLPS)}, got {config.mlp!r}")
  if not 0 <= config.first_k_dense <= config.num_layers:
    raise ValueError(f"first_k_dense must be in [0, num_layers={config.num_layers}], got "
                     f"{config.first_k_dense}")
  dense = "swiglu" if config.mlp == "moe" else config.mlp
  return tuple(dense if i < config.first_k_dense else config.mlp
               for i in range(config.num_layers))


def init_decode_state(config, batch_size: int) -> tuple[Any, ...]:
  """A zero decode state: one pytree per layer, as the model returns and consumes it."""
  return tuple(MIXERS[letter].initial_state(config, batch_size) for letter in layer_letters(config))


CACHED_MIXERS = frozenset("MA")  # Their state is caches [batch, max_cache_length, ...] + position.


def decode_state_bytes(config, batch_size: int, context_length: int | None = None) -> int:
  """Bytes of the decode state for ``batch_size`` sequences, from the real structure's shapes.

  With ``context_length``, the attention caches (M, A layers) count only the positions a
  context of that many tokens fills, i.e. the bytes in use; recurrent states count whole.
  """
  shapes = jax.eval_shape(lambda: init_decode_state(config, batch_size))
  nbytes = lambda x: x.size * x.dtype.itemsize
  total = 0
  for letter, state in zip(layer_letters(config), shapes):
    if letter in CACHED_MIXERS and context_length is not None:
      used = min(context_length, config.max_cache_length)
      total += sum(nbytes(x) // config.max_cache_length * used if name != "position"
                   else nbytes(x) for name, x in state.items())
    else:
      total += sum(nbytes(x) for x in jax.tree.leaves(state))
  return total


def parameter_counts(config) -> tuple[int, int]:
  """(total, activated per token) parameter counts, from the model's abstract parameters.

  Activated counts the parameters that multiply a token's activations: the total less, in each
  MoE layer, the routed experts a token does not use ((E - k) / E of the expert weights), and
  less the input embedding table when it is not tied to the output head (a lookup reads one
  row).
  """
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  params = jax.eval_shape(lambda t: LanguageModel(config).init(jax.random.key(0), t), tokens)
  params = nn.meta.unbox(params)["params"]
  total = sum(x.size for x in jax.tree.leaves(params))
  inactive = 0 if config.tie_embeddings else params["embed"]["embedding"].size
  unused = (config.moe_num_experts - config.moe_top_k) / config.moe_num_experts
  for i, mlp in enumerate(layer_mlps(config)):
    if mlp == "moe":
      experts = params[f"layer_{i}"]["mlp"]
      inactive += round(unused * sum(experts[name].size for name in MoE.EXPERT_WEIGHTS))
  return total, total - inactive


class Block(nn.Module):
  """``x += mixer(RMSNorm(x))``, then ``x += MLP(RMSNorm(x))`` unless ``mlp`` is "none"."""

  config: Any
  letter: str
  mlp: str
  num_layers: int

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), name=name)
    constrain = lambda a: nn.with_logical_constraint(a, ("batch", "length", "embed"))
    y, state = MIXERS[self.letter](cfg, self.num_layers, name="mixer")(norm("norm")(x), state,
                                                                       segment_ids)
    x = constrain(x + y.astype(jnp.float32))
    if MLPS[self.mlp] is not None:
      y = MLPS[self.mlp](cfg, self.num_layers, name="mlp")(norm("mlp_norm")(x))
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
    letters, mlps = layer_letters(cfg), layer_mlps(cfg)
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
    for i, (letter, mlp) in enumerate(zip(letters, mlps)):
      x, layer_state = Block(cfg, letter, mlp, len(letters), name=f"layer_{i}")(
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
