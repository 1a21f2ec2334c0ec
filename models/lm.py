"""One language model for every architecture, built from a layer-pattern string.

Each letter of ``config.layer_pattern`` (tiled to ``config.num_layers``) names a mixer:

  S  Mamba-1 selective scan (models.mamba.MambaMixer)
  K  Kimi Delta Attention (models.kda.KDAMixer)
  M  multi-head latent attention (models.mla.MLAMixer)
  A  softmax attention, multi-head or grouped-query, with RoPE (models.attention.AttentionMixer)
  F  RWKV-6 (Finch) time mixing (models.rwkv6.RWKV6TimeMix)
  R  RWKV-7 (Goose) time mixing (models.rwkv7.RWKV7TimeMix)

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

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.attention import AttentionMixer
from models.kda import KDAMixer
from models.layers import Dense, LayerNorm, RMSNorm
from models.mamba import MambaMixer
from models.mla import MLAMixer
from models.mlp import SwiGLU
from models.moe import MoE
from models.rwkv6 import RWKV6ChannelMix, RWKV6TimeMix
from models.rwkv7 import RWKV7ChannelMix, RWKV7TimeMix

MIXERS = {"S": MambaMixer, "K": KDAMixer, "M": MLAMixer, "A": AttentionMixer, "F": RWKV6TimeMix,
          "R": RWKV7TimeMix}
MLPS = {"none": None, "swiglu": SwiGLU, "moe": MoE, "rwkv6_channel_mix": RWKV6ChannelMix,
        "rwkv7_channel_mix": RWKV7ChannelMix}
NORMS = {"rms": RMSNorm, "layer": LayerNorm}


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


def _mlp_state(mlp: str, config, batch_size: int):
  """The decode state of a stateful MLP (RWKV's channel mixing keeps the previous token)."""
  module = MLPS[mlp]
  return module.initial_state(config, batch_size) if hasattr(module, "initial_state") else None


def init_decode_state(config, batch_size: int) -> tuple[dict[str, Any], ...]:
  """A zero decode state, as the model returns and consumes it: one ``{"mixer": ..., "mlp":
  ...}`` per layer ("mlp" is None unless the MLP carries a token shift)."""
  return tuple({"mixer": MIXERS[letter].initial_state(config, batch_size),
                "mlp": _mlp_state(mlp, config, batch_size)}
               for letter, mlp in zip(layer_letters(config), layer_mlps(config)))


CACHED_MIXERS = frozenset("MA")  # Their state is caches [batch, max_cache_length, ...] + position.


@dataclasses.dataclass(frozen=True)
class DecodeStateSize:
  """The decode state's bytes for a batch, split by how they grow with the context.

  ``per_token_bytes``: the attention caches (M, A layers) per cached token, whole batch;
  ``fixed_bytes``: everything else (recurrent states, conv windows, token shifts, cache
  positions), constant in the context; ``cache_length``: the tokens the caches hold
  (``max_cache_length``) when the model has caches, else 0.
  """

  fixed_bytes: int
  per_token_bytes: int
  cache_length: int

  def total(self, context_length: int | None = None) -> int:
    """Bytes allocated (``context_length`` None) or in use after ``context_length`` tokens."""
    used = self.cache_length if context_length is None else min(context_length,
                                                                self.cache_length)
    return self.fixed_bytes + self.per_token_bytes * used


def decode_state_size(config, batch_size: int) -> DecodeStateSize:
  """Sizes ``init_decode_state(config, batch_size)`` abstractly (``jax.eval_shape``: nothing is
  allocated, so any cache length and batch can be sized), leaf by leaf from its shapes and
  dtypes. The cache leaves of M and A layers have ``max_cache_length`` as their second axis;
  their bytes divided by it are the per-token bytes."""
  shapes = jax.eval_shape(lambda: init_decode_state(config, batch_size))
  nbytes = lambda x: x.size * x.dtype.itemsize
  fixed = per_token = 0
  for letter, state in zip(layer_letters(config), shapes):
    fixed += sum(nbytes(x) for x in jax.tree.leaves(state["mlp"]))
    for name, x in state["mixer"].items():
      if letter in CACHED_MIXERS and name != "position":
        assert x.shape[1] == config.max_cache_length, (letter, name, x.shape)
        per_token += nbytes(x) // config.max_cache_length
      else:
        fixed += sum(nbytes(leaf) for leaf in jax.tree.leaves(x))
  cached = bool(CACHED_MIXERS & set(layer_letters(config)))
  return DecodeStateSize(fixed, per_token, config.max_cache_length if cached else 0)


def decode_state_bytes(config, batch_size: int, context_length: int | None = None) -> int:
  """Bytes of the decode state for ``batch_size`` sequences, from the real structure's shapes
  (``decode_state_size``).

  With ``context_length``, the attention caches (M, A layers) count only the positions a
  context of that many tokens fills, i.e. the bytes in use; recurrent states count whole.
  """
  return decode_state_size(config, batch_size).total(context_length)


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


def _takes(module_class, field: str) -> bool:
  """Whether a Flax module class declares the attribute ``field``."""
  return field in getattr(module_class, "__dataclass_fields__", {})


def make_norm(config, name: str) -> nn.Module:
  """The model's block norm: RMSNorm, or LayerNorm (RWKV) when ``config.norm == "layer"``."""
  if config.norm not in NORMS:
    raise ValueError(f"norm must be one of {sorted(NORMS)}, got {config.norm!r}")
  return NORMS[config.norm](config.norm_eps, dtype=jnp.dtype(config.dtype), name=name)


class Block(nn.Module):
  """``x += mixer(Norm(x))``, then ``x += MLP(Norm(x))`` unless ``mlp`` is "none".

  Mixers and MLPs that declare ``layer_index`` get it (RWKV's depth-dependent initialisation);
  MLPs with an ``initial_state`` carry a decode state (RWKV's channel-mixing token shift);
  mixers with ``VALUE_RESIDUAL`` read and return the first such layer's values (RWKV-7's
  value residual).
  """

  config: Any
  letter: str
  mlp: str
  num_layers: int
  layer_index: int

  def _build(self, module_class, name: str) -> nn.Module:
    extra = {"layer_index": self.layer_index} if _takes(module_class, "layer_index") else {}
    return module_class(self.config, self.num_layers, name=name, **extra)

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None, v_first=None):
    cfg = self.config
    constrain = lambda a: nn.with_logical_constraint(a, ("batch", "length", "embed"))
    mixer_class, mlp_class = MIXERS[self.letter], MLPS[self.mlp]
    mixer = self._build(mixer_class, "mixer")
    h = make_norm(cfg, "norm")(x)
    mixer_state = None if state is None else state["mixer"]
    if getattr(mixer_class, "VALUE_RESIDUAL", False):
      y, mixer_state, v_first = mixer(h, mixer_state, segment_ids, v_first=v_first)
    else:
      y, mixer_state = mixer(h, mixer_state, segment_ids)
    x = constrain(x + y.astype(jnp.float32))
    mlp_state = None
    if mlp_class is not None:
      mlp = self._build(mlp_class, "mlp")
      h = make_norm(cfg, "mlp_norm")(x)
      if hasattr(mlp_class, "initial_state"):
        y, mlp_state = mlp(h, None if state is None else state["mlp"], segment_ids)
      else:
        y = mlp(h)
      x = constrain(x + y.astype(jnp.float32))
    return x, {"mixer": mixer_state, "mlp": mlp_state}, v_first


class LanguageModel(nn.Module):
  """Embedding (then a norm when ``embedding_norm``, RWKV's ln0), blocks from the layer
  pattern, final norm, output head.

  Call: tokens [batch, time] int32 -> (logits [batch, time, vocab] float32, state). With
  ``last_only=True`` the head runs on the last position alone and the logits are
  [batch, 1, vocab]: what a prefill needs, without the [batch, time, vocab] float32 logits of a
  long prompt.
  """

  config: Any  # train.config.ModelConfig

  @nn.compact
  def __call__(self, tokens, state=None, segment_ids=None, last_only: bool = False):
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
    if cfg.embedding_norm:
      x = make_norm(cfg, "embedding_norm")(x).astype(jnp.float32)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    new_state, v_first = [], None
    for i, (letter, mlp) in enumerate(zip(letters, mlps)):
      x, layer_state, v_first = Block(cfg, letter, mlp, len(letters), i, name=f"layer_{i}")(
          x, None if state is None else state[i], segment_ids, v_first)
      new_state.append(layer_state)
    if last_only:
      x = x[:, -1:]
    h = make_norm(cfg, "final_norm")(x)
    if cfg.tie_embeddings:
      logits = embed.attend(h)
    else:
      logits = Dense(cfg.vocab_size, ("embed", "vocab"), kernel_init=nn.initializers.normal(0.02),
                     dtype=jnp.dtype(cfg.dtype), name="head")(h)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits, tuple(new_state)
