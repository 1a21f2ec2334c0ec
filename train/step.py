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


def next_token_loss(model: nn.Module, params, tokens: jax.Array) -> tuple[jax.Array, Any]:
  """Mean cross entropy of predicting tokens[:, 1:] from tokens[:, :-1]; tokens [batch, time+1].

  Returns (loss, the values the layers sowed: the MoE layers' expert loads).
  """
  (logits, _), variables = model.apply({"params": params}, tokens[:, :-1],
                                       mutable=["intermediates"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  return loss, variables.get("intermediates", {})


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
  """

  state_sharding: Any
  abstract_state: Any
  init: Callable
  train_step: Callable
  eval_loss: Callable


def make_trainer(model: nn.Module, optimizer: optax.GradientTransformation, mesh, seq_len: int,
                 learning_rate: Callable[[jax.Array], jax.Array] | None = None) -> Trainer:
  """Builds the sharded init, train step and eval step for ``model`` on ``mesh``."""

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

  def train_step(state: TrainState, tokens):
    (loss, sown), grads = jax.value_and_grad(
        lambda p: next_token_loss(model, p, tokens), has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = update_router_bias(params, sown, model.config.moe_bias_update_rate)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **load_balance_stats(sown)}
    if learning_rate is not None:
      metrics["learning_rate"] = learning_rate(state.step)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def eval_loss(params, tokens):
    return next_token_loss(model, params, tokens)[0]

  return Trainer(
      state_sharding=state_sharding,
      abstract_state=abstract_state,
      init=on_mesh(jax.jit(with_rules(init), out_shardings=state_sharding)),
      train_step=on_mesh(jax.jit(with_rules(train_step),
                                 in_shardings=(state_sharding, tokens_sharding),
                                 out_shardings=(state_sharding, None), donate_argnums=0)),
      eval_loss=on_mesh(jax.jit(with_rules(eval_loss),
                                in_shardings=(state_sharding.params, tokens_sharding))),
  )
