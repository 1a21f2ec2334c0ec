"""The mixture-of-experts MLP of Kimi-Linear and DeepSeek-V3 (SPEC 5).

Per token x, with E routed experts of hidden width F, k of them active:

  scores  = sigmoid(x W_router)                        [E] float32
  choice  = top_k(scores + e_score_correction_bias)    k expert indices
  weights = scores[choice], divided by their sum when moe_renormalize, times
            moe_routed_scaling_factor
  y       = sum_j weights_j Expert_{choice_j}(x) + SharedSwiGLU(x)

Each expert is a SwiGLU, ``down(silu(x gate_e) * (x up_e))``. The correction bias only decides
which experts are chosen: it never enters the weights and gets no gradient. It is trained
outside the optimizer by ``update_router_bias`` (DeepSeek-V3's auxiliary-loss-free balancing),
from the load statistics each layer sows into the "intermediates" collection.

Two dispatches compute the same function from the same parameters:

  dropless  sort the N k (token, expert) assignments by expert and run the expert matmuls with
            ``jax.lax.ragged_dot`` over the contiguous groups; scatter-add back to the tokens.
  dense     the reference: every expert on every token, combined with a [N, E] weight matrix
            that is zero for the experts not chosen.

Dropless is the default because it is exact: it equals the dense reference, has no capacity
factor and drops no token, so a token's output does not depend on the other tokens in the batch
and training, prefill and decoding give the same result (the decode-equals-forward tests need
this). Its costs are the sort, gather and scatter around the ragged matmuls; on CPU, where
``ragged_dot`` lowers to a masked dense product, k times the dense dispatch's FLOPs; and, under
GSPMD, that an expert-sharded weight is gathered onto every device instead of the tokens being
sent to the experts' devices. An all-to-all ``shard_map`` dispatch is the follow-up for large
expert-parallel runs.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from models.layers import Initializer, fan_in_uniform, param
from models.mlp import SwiGLU

DISPATCHES = ("dropless", "dense")
BIAS = "e_score_correction_bias"
EXPERT_IN = ("expert", "embed", "mlp")  # gate, up: [E, d_model, F].
EXPERT_OUT = ("expert", "mlp", "embed")  # down: [E, F, d_model].


def expert_uniform(scale: float = 1.0) -> Initializer:
  """``fan_in_uniform`` for stacked [E, fan_in, fan_out] weights: each expert's own fan-in."""
  return nn.initializers.variance_scaling(scale**2 / 3.0, "fan_in", "uniform", batch_axis=(0,))


class MoE(nn.Module):
  """Routed SwiGLU experts plus optional shared ones: [batch, time, d_model] -> same.

  x may be any float dtype; the output is in ``config.dtype``. The router runs in float32, the
  experts in ``config.dtype`` with float32 accumulation. Parameters (float32): ``router``
  [d_model, E], ``e_score_correction_bias`` [E], ``gate``, ``up`` [E, d_model, F], ``down``
  [E, F, d_model] and, when moe_num_shared_experts > 0, the SwiGLU ``shared_experts`` of width
  moe_num_shared_experts * F. Sows ``expert_load`` and ``router_probability`` (both [E] float32)
  into "intermediates" (see ``load_balance_stats``).
  """

  config: Any  # train.config.ModelConfig (models never imports train).
  num_layers: int = 1  # Scales the down projections' initialisation by 1 / sqrt(num_layers).

  EXPERT_WEIGHTS: ClassVar[tuple[str, ...]] = ("gate", "up", "down")  # The stacked [E, ...] ones.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    num_experts, top_k, width = cfg.moe_num_experts, cfg.moe_top_k, cfg.moe_d_ff
    if not 1 <= top_k <= num_experts:
      raise ValueError(f"moe_top_k must be between 1 and moe_num_experts ({num_experts}), "
                       f"got {top_k}")
    if cfg.moe_dispatch not in DISPATCHES:
      raise ValueError(f"moe_dispatch must be one of {DISPATCHES}, got {cfg.moe_dispatch!r}")
    if x.ndim != 3 or x.shape[-1] != cfg.d_model:
      raise ValueError(f"x must have shape [batch, time, d_model={cfg.d_model}], "
                       f"got {tuple(x.shape)}")
    dtype = jnp.dtype(cfg.dtype)
    tokens = x.reshape(-1, cfg.d_model)  # [N, d_model]

    router = param(self, "router", fan_in_uniform(), (cfg.d_model, num_experts), ("embed", None))
    bias = param(self, BIAS, nn.initializers.zeros, (num_experts,), (None,))
    scores = jax.nn.sigmoid(tokens.astype(jnp.float32) @ router)  # [N, E]
    # Selection only: top_k's indices carry no gradient, and the bias none at all.
    _, choice = jax.lax.top_k(jax.lax.stop_gradient(scores + bias), top_k)  # [N, k]
    weights = jnp.take_along_axis(scores, choice, axis=-1)  # [N, k] float32
    if cfg.moe_renormalize:
      weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    weights = weights * cfg.moe_routed_scaling_factor

    counts = jnp.bincount(choice.reshape(-1), length=num_experts)
    self.sow("intermediates", "expert_load", counts.astype(jnp.float32) / choice.size)
    self.sow("intermediates", "router_probability",
             jnp.mean(scores / scores.sum(-1, keepdims=True), axis=0))

    init_down = expert_uniform(1.0 / math.sqrt(self.num_layers))
    gate = param(self, "gate", expert_uniform(), (num_experts, cfg.d_model, width), EXPERT_IN)
    up = param(self, "up", expert_uniform(), (num_experts, cfg.d_model, width), EXPERT_IN)
    down = param(self, "down", init_down, (num_experts, width, cfg.d_model), EXPERT_OUT)
    experts = tuple(w.astype(dtype) for w in (gate, up, down))
    dispatch = _on_data_shards(_dropless) if cfg.moe_dispatch == "dropless" else _dense
    y = dispatch(tokens.astype(dtype), choice, weights, *experts)  # [N, d_model] float32

    y = y.reshape(x.shape)
    if cfg.moe_num_shared_experts > 0:
      shared = SwiGLU(cfg, self.num_layers, features=cfg.moe_num_shared_experts * width,
                      name="shared_experts")
      y = y + shared(x.astype(dtype)).astype(jnp.float32)
    return y.astype(dtype)


def _swiglu_hidden(gate_out: jax.Array, up_out: jax.Array, dtype) -> jax.Array:
  """silu(gate) * up in float32, returned in ``dtype`` for the down projection."""
  return (jax.nn.silu(gate_out) * up_out).astype(dtype)


def _on_data_shards(dispatch):
  """``dispatch`` run by each data-parallel shard on its own tokens.

  The sort inside the dropless dispatch mixes all N tokens, so under GSPMD alone every device
  would compute the experts for the whole global batch. With a mesh set, this maps the dispatch
  over the mesh axes that the logical "batch" axis is sharded on (``jax.shard_map``, manual
  over those axes only); the expert weights enter whole over them (gathered, as FSDP gathers a
  layer's weights), and the other mesh axes stay automatic.
  """

  def run(tokens, choice, weights, *experts):
    mesh = jax.sharding.get_abstract_mesh()
    batch_spec = nn.logical_to_mesh_axes(("batch",))[0]
    axes = () if batch_spec is None else (
        (batch_spec,) if isinstance(batch_spec, str) else tuple(batch_spec))
    axes = tuple(a for a in axes if not mesh.empty and mesh.shape.get(a, 1) > 1)
    if not axes or tokens.shape[0] % math.prod(mesh.shape[a] for a in axes):
      return dispatch(tokens, choice, weights, *experts)
    rows = PartitionSpec(axes)
    return jax.shard_map(dispatch, in_specs=(rows, rows, rows) + (PartitionSpec(),) * 3,
                         out_specs=rows, axis_names=frozenset(axes))(tokens, choice, weights,
                                                                       *experts)

  return run


def _dropless(tokens, choice, weights, gate, up, down) -> jax.Array:
  """Sorted assignments through ragged matmuls: tokens [N, D], choice and weights [N, k],
  expert weights [E, ...] in the compute dtype -> [N, D] float32."""
  top_k = choice.shape[-1]
  counts = jnp.bincount(choice.reshape(-1), length=gate.shape[0])
  order = jnp.argsort(choice.reshape(-1), stable=True)  # [N k], grouped by expert.
  token = order // top_k
  rows = tokens[token]  # [N k, D]
  matmul = lambda a, w: jax.lax.ragged_dot(a, w, counts, preferred_element_type=jnp.float32)
  h = _swiglu_hidden(matmul(rows, gate), matmul(rows, up), tokens.dtype)
  out = matmul(h, down) * weights.reshape(-1)[order][:, None]
  return jnp.zeros(tokens.shape, jnp.float32).at[token].add(out)


def _dense(tokens, choice, weights, gate, up, down) -> jax.Array:
  """Every expert on every token, combined with zero weight for the unchosen ones (the
  reference; same arguments as ``_dropless``).

  The operands are cast to float32: products of compute-dtype values are exact in float32, so
  this is float32 accumulation as in ``_dropless`` (XLA:CPU has no batched bf16 x bf16 -> f32
  dot).
  """
  einsum = lambda spec, a, w: jnp.einsum(spec, a.astype(jnp.float32), w.astype(jnp.float32))
  h = _swiglu_hidden(einsum("nd,edf->nef", tokens, gate), einsum("nd,edf->nef", tokens, up),
                     tokens.dtype)
  out = einsum("nef,efd->ned", h, down)  # [N, E, D]
  combine = jnp.einsum("nk,nke->ne", weights, jax.nn.one_hot(choice, gate.shape[0]))
  return jnp.einsum("ned,ne->nd", out, combine)


def _collection(tree, name: str):
  """``tree[name]`` when ``tree`` is a whole variables dict holding the collection ``name``."""
  return tree[name] if name in tree else tree


def _moe_layers(intermediates) -> dict[tuple[str, ...], dict[str, list[jax.Array]]]:
  """Module path -> {"expert_load": [...], "router_probability": [...]}, one entry per sow."""
  layers: dict[tuple[str, ...], dict[str, list[jax.Array]]] = {}
  leaves, _ = jax.tree_util.tree_flatten_with_path(_collection(intermediates, "intermediates"))
  for path, leaf in leaves:
    names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    if names and names[-1] in ("expert_load", "router_probability"):
      layers.setdefault(names[:-1], {"expert_load": [], "router_probability": []})
      layers[names[:-1]][names[-1]].append(leaf)
  return layers


def load_balance_stats(intermediates) -> dict[str, jax.Array]:
  """Load-balance statistics over the MoE layers of a flax "intermediates" tree.

  Returns ``moe_max_load``, the mean over layers of E * max(load) (1.0: perfectly balanced), and
  ``moe_balance_loss``, the mean over layers of E * sum(load * router_probability) (the
  Switch-Transformer auxiliary statistic; 1.0 when both are uniform), as float32 scalars; an
  empty dict when the tree has no MoE layer. Every sow counts as one layer, and leading axes of
  a sown value (layers stacked by ``nn.scan``) as more.
  """
  loads, probs = [], []
  for stats in _moe_layers(intermediates).values():
    for load, prob in zip(stats["expert_load"], stats["router_probability"]):
      loads.append(load.reshape(-1, load.shape[-1]))
      probs.append(prob.reshape(-1, prob.shape[-1]))
  if not loads:
    return {}
  load, prob = jnp.concatenate(loads), jnp.concatenate(probs)  # [layers, E]
  num_experts = load.shape[-1]
  return {"moe_max_load": jnp.mean(num_experts * load.max(-1)),
          "moe_balance_loss": jnp.mean(num_experts * jnp.sum(load * prob, -1))}


def update_router_bias(params, intermediates, rate: float):
  """DeepSeek-V3's auxiliary-loss-free balancing step, applied to every MoE layer.

  ``e_score_correction_bias += rate * sign(mean(load) - load)``: under-loaded experts become
  more likely to be chosen, over-loaded ones less. ``params`` is the (unboxed) "params"
  collection or a variables dict holding it, and ``intermediates`` what the same model sowed;
  each layer's load is matched to its bias by module path (the mean when a layer sowed more
  than once). Returns params of the same structure with only the biases changed.
  """
  layers = _moe_layers(intermediates)
  root = ("params",) if "params" in params else ()
  found = set()

  def update(path, leaf):
    names = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    module = names[len(root):-1]
    if names[-1:] != (BIAS,) or module not in layers:
      return leaf
    found.add(module)
    load = jnp.mean(jnp.stack(layers[module]["expert_load"]), axis=0)
    return leaf + rate * jnp.sign(jnp.mean(load, -1, keepdims=True) - load)

  new_params = jax.tree_util.tree_map_with_path(update, params)
  if missing := sorted(set(layers) - found):
    raise ValueError(f"intermediates hold MoE statistics for {['/'.join(m) for m in missing]}, "
                     f"but params has no {BIAS} there")
  return new_params
