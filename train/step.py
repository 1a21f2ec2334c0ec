"""Train state, its sharded initialisation, and the jitted train and eval steps.

Parameters and optimizer state are float32 (master weights); the model computes in
``ModelConfig.dtype``. Shardings come from the parameters' logical axis names through
``train.sharding.LOGICAL_RULES``; the step is one ``jax.jit`` with explicit in/out shardings and
the state donated, so the same code runs on one device, one host or many.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from models.moe import load_balance_stats, update_router_bias
from train.sharding import LOGICAL_RULES, batch_sharding, logical_sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: the number of optimizer updates applied.
  params: Any
  opt_state: Any


def next_token_loss(model: nn.Module, params, tokens: jax.Array,
                    weights: jax.Array | None = None) -> tuple[jax.Array, Any]:
  """Mean cross entropy of predicting tokens[:, 1:] from tokens[:, :-1]; tokens [batch, time+1].

  With ``weights`` [batch, time] (aligned with the targets tokens[:, 1:]) the mean is weighted:
  ``sum(w * loss) / sum(w)``, e.g. a 0/1 mask that keeps only the answer positions of a recall
  task (0 when every weight is 0).

  Returns (loss, the values the layers sowed: the MoE layers' expert loads).
  """
  (logits, _), variables = model.apply({"params": params}, tokens[:, :-1],
                                       mutable=["intermediates"])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  if weights is None:
    loss = losses.mean()
  else:
    weights = weights.astype(losses.dtype)
    loss = (losses * weights).sum() / jnp.maximum(weights.sum(), 1e-9)
  return loss, variables.get("intermediates", {})


def weighted_answer_counts(model: nn.Module, params, tokens: jax.Array,
                           weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per sequence, the weight of the targets predicted exactly (greedy argmax) and the total.

  Returns two float32 [batch] arrays: ``sum_t w[b, t] * (argmax logits[b, t] == tokens[b, t+1])``
  and ``sum_t w[b, t]``. With a 0/1 answer mask their ratio is the answer accuracy, and a
  sequence is fully right (as greedy decoding would give it) when they are equal.
  """
  logits, _ = model.apply({"params": params}, tokens[:, :-1])
  right = (jnp.argmax(logits, axis=-1) == tokens[:, 1:]).astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  return (right * weights).sum(axis=1), weights.sum(axis=1)


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The compiled functions of one run, bound to a model, an optimizer and a mesh.

  Attributes:
    state_sharding: NamedShardings of the TrainState pytree.
    init: (rng) -> TrainState, created directly in its shardings.
    train_step: (TrainState, tokens [batch, time+1] int32) -> (TrainState, metrics dict): loss,
      grad_norm, learning_rate and, with MoE layers, moe_max_load and moe_balance_loss. After
      the optimizer update the MoE routers' correction biases move towards equal load.
    eval_loss: (params, tokens) -> scalar loss.
    abstract_state: the TrainState's ShapeDtypeStructs with shardings (for restoring).
    answer_counts: only with ``loss_weights``: (params, tokens, weights) -> the per-sequence
      (right, total) weights of ``weighted_answer_counts``.

  With ``make_trainer(..., loss_weights=True)``, ``train_step`` and ``eval_loss`` take one more
  argument, ``weights`` [batch, time] aligned with tokens[:, 1:], and the loss is their weighted
  mean (see ``next_token_loss``).
  """

  state_sharding: Any
  abstract_state: Any
  init: Callable
  train_step: Callable
  eval_loss: Callable
  answer_counts: Callable | None = None


def make_trainer(model: nn.Module, optimizer: optax.GradientTransformation, mesh, seq_len: int,
                 learning_rate: Callable[[jax.Array], jax.Array] | None = None, *,
                 loss_weights: bool = False) -> Trainer:
  """Builds the sharded init, train step and eval step for ``model`` on ``mesh``.

  ``loss_weights``: the steps take per-target weights after the tokens (a masked loss).
  """

  def init_boxed(rng):
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(nn.meta.unbox(params)))

  with nn.logical_axis_rules(LOGICAL_RULES):
    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    state_sharding = logical_sharding(boxed, mesh)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.meta.unbox(boxed), state_sharding)
  tokens_sharding = batch_sharding(mesh)

  def with_rules(fn):
    """Traces fn under the logical rules, so activation constraints apply."""

    def traced(*args):
      with nn.logical_axis_rules(LOGICAL_RULES):
        return fn(*args)

    return traced

  def on_mesh(compiled):
    """Calls the jitted function with the mesh set (jax.set_mesh is not allowed inside jit)."""

    def call(*args):
      with jax.set_mesh(mesh):
        return compiled(*args)

    return call

  def init(rng):
    return nn.meta.unbox(init_boxed(rng))

  def train_step(state: TrainState, tokens, *weights):
    (loss, sown), grads = jax.value_and_grad(
        lambda p: next_token_loss(model, p, tokens, *weights), has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = update_router_bias(params, sown, model.config.moe_bias_update_rate)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **load_balance_stats(sown)}
    if learning_rate is not None:
      metrics["learning_rate"] = learning_rate(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def eval_loss(params, tokens, *weights):
    return next_token_loss(model, params, tokens, *weights)[0]

  def answer_counts(params, tokens, weights):
    return weighted_answer_counts(model, params, tokens, weights)

  batch_shardings = (tokens_sharding,) * (2 if loss_weights else 1)
  return Trainer(
      state_sharding=state_sharding,
      abstract_state=abstract_state,
      init=on_mesh(jax.jit(with_rules(init), out_shardings=state_sharding)),
      train_step=on_mesh(jax.jit(with_rules(train_step),
                                 in_shardings=(state_sharding, *batch_shardings),
                                 out_shardings=(state_sharding, None), donate_argnums=0)),
      eval_loss=on_mesh(jax.jit(with_rules(eval_loss),
                                in_shardings=(state_sharding.params, *batch_shardings))),
      answer_counts=on_mesh(jax.jit(with_rules(answer_counts),
                                    in_shardings=(state_sharding.params, *batch_shardings)))
      if loss_weights else None,
  )
