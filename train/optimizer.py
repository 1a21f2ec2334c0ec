"""AdamW with linear warmup and cosine decay, after global-norm clipping."""

from __future__ import annotations

import jax
import optax

# Parameters that are not weights of a matrix product: no weight decay (SPEC 1.4 for A_log, D).
NO_DECAY_NAMES = frozenset({"A_log", "D", "bias", "conv_bias", "dt_bias", "scale"})


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Warmup from 0 to ``learning_rate``, then cosine to ``learning_rate * final_ratio``."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
      end_value=cfg.learning_rate * cfg.final_learning_rate_ratio)


def _decay_mask(params):
  def decays(path, leaf):
    return getattr(path[-1], "key", None) not in NO_DECAY_NAMES and leaf.ndim >= 2

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """The optimizer for a ``TrainConfig``."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm),
      optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                  weight_decay=cfg.weight_decay, mask=_decay_mask))
