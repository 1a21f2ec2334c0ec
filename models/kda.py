"""The KDA mixer (Kimi Delta Attention, SPEC 3.2), as in fla's ``KimiDeltaAttention``.

Per token x, with H query/key heads of size K and HV value heads of size V:

  q, k  = SiLU(ShortConv(W_q x)), SiLU(ShortConv(W_k x))      L2-normalised inside the op
  v     = SiLU(ShortConv(W_v x))
  g     = -exp(A_log[h]) * softplus(W_f_b W_f_a x + dt_bias)   per-channel log decay [HV, K]
  beta  = sigmoid(W_b x)                                       [HV]
  o     = W_o( RMSNorm_head(KDA(q, k, v, g, beta)) * sigmoid(W_g_b W_g_a x) )

The gate and output-gate projections are low rank (rank V). Parameter names follow the released
Kimi-Linear checkpoint (q_proj, f_a_proj, f_b_proj, g_a_proj, g_b_proj, b_proj, o_proj, ...).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import Dense, RMSNorm, dt_bias_init, fan_in_uniform, param, symmetric_uniform
from ops.kda import kda, kda_gate, kda_step
from ops.short_conv import short_conv, short_conv_step

FLAT = ("batch", "length", "heads")  # [batch, time, heads * dim], head-major.
PER_HEAD = ("batch", "length", "heads", "kv")  # [batch, time, heads, dim].


def step_implementation(implementation: str | None) -> str | None:
  """The decode step's form for a ``kda_implementation``: the kernels decode with their own step
  kernels, and "xla" (``kda_step`` has no chunkwise form) with the plain-JAX "reference" update,
  so that a model pinned to plain JAX never decodes through a Pallas kernel."""
  return "reference" if implementation == "xla" else implementation


class KDADims(NamedTuple):
  num_heads: int  # H: query/key heads.
  head_dim: int  # K.
  num_v_heads: int  # HV: value heads, a multiple of H.
  v_head_dim: int  # V.


def kda_dims(config) -> KDADims:
  """The head counts and sizes from the config's ``kda_*`` fields (None: the q/k value)."""
  dims = KDADims(config.kda_num_heads, config.kda_head_dim,
                 config.kda_num_v_heads or config.kda_num_heads,
                 config.kda_v_head_dim or config.kda_head_dim)
  if dims.num_v_heads % dims.num_heads:
    raise ValueError(f"kda_num_v_heads ({dims.num_v_heads}) must be a multiple of kda_num_heads "
                     f"({dims.num_heads})")
  return dims


def _a_log_init(key, shape, dtype=jnp.float32):
  """A_log = log U(1, 16) (SPEC 3.2)."""
  return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


class KDAMixer(nn.Module):
  """Kimi Delta Attention mixer.

  ``y, state = mixer(x, state=None, segment_ids=None)`` with x [batch, time, d_model]. With a
  state and one token it takes the decode step (``kda_step``); otherwise it runs ``kda`` over the
  sequence (from the state if given) and returns the final state. The state is a dict with
  ``conv``, the causal-conv windows ``{"q", "k": [batch, d_conv - 1, H * K], "v": [batch,
  d_conv - 1, HV * V]}`` in the compute dtype, and ``recurrent`` [batch, HV, K, V] float32.
  """

  config: Any  # train.config.ModelConfig (models never imports train).
  num_layers: int = 1  # Scales o_proj's initialisation by 1 / sqrt(num_layers).

  @staticmethod
  def initial_state(config, batch_size: int) -> dict[str, Any]:
    d = kda_dims(config)
    window = lambda width: jnp.zeros((batch_size, config.d_conv - 1, width),
                                     jnp.dtype(config.dtype))
    qk_width, v_width = d.num_heads * d.head_dim, d.num_v_heads * d.v_head_dim
    return {
        "conv": {"q": window(qk_width), "k": window(qk_width), "v": window(v_width)},
        "recurrent": jnp.zeros((batch_size, d.num_v_heads, d.head_dim, d.v_head_dim),
                               jnp.float32),
    }

  @nn.compact
  def __call__(self, x, state=None, segment_ids=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    d = kda_dims(cfg)
    decoding = state is not None and x.shape[1] == 1
    batch, time = x.shape[:2]
    dense = lambda width, axes, name, **kw: Dense(width, axes, dtype=dtype, name=name, **kw)
    per_head = lambda a, heads: nn.with_logical_constraint(
        a.reshape(batch, time, heads, -1), PER_HEAD)

    def conv_branch(name: str, width: int):
      """Projection, causal depthwise conv (no bias, as fla's ShortConvolution) and SiLU."""
      y = nn.with_logical_constraint(dense(width, ("embed", "heads"), f"{name}_proj")(x), FLAT)
      weight = param(self, f"{name}_conv_weight", symmetric_uniform(1.0 / math.sqrt(cfg.d_conv)),
                     (cfg.d_conv, width), ("conv", "heads"))  # PyTorch's Conv1d default.
      cache = None if state is None else state["conv"][name]
      if decoding:
        y, cache = short_conv_step(y[:, 0], weight, cache=cache, activation="silu")
        return y[:, None], cache
      return short_conv(y, weight, cache=cache, activation="silu", segment_ids=segment_ids)

    def low_rank(name: str, width: int):
      """Linear(d_model, V) -> Linear(V, width), no biases: [batch, time, width]."""
      down = dense(d.v_head_dim, ("embed", "proj"), f"{name}_a_proj")(x)
      return dense(width, ("proj", "heads"), f"{name}_b_proj")(down)

    (q, conv_q), (k, conv_k), (v, conv_v) = (
        conv_branch(name, heads * size) for name, heads, size in (
            ("q", d.num_heads, d.head_dim), ("k", d.num_heads, d.head_dim),
            ("v", d.num_v_heads, d.v_head_dim)))
    q, k, v = per_head(q, d.num_heads), per_head(k, d.num_heads), per_head(v, d.num_v_heads)

    A_log = param(self, "A_log", _a_log_init, (d.num_v_heads,), ("heads",))
    dt_bias = param(self, "dt_bias", dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor),
                    (d.num_v_heads * d.head_dim,), ("heads",))
    g = kda_gate(per_head(low_rank("f", d.num_v_heads * d.head_dim), d.num_v_heads), A_log,
                 dt_bias)
    beta = jax.nn.sigmoid(dense(d.num_v_heads, ("embed", "heads"), "b_proj")(x)
                          .astype(jnp.float32))

    if decoding:
      o, recurrent = kda_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0],
                              state["recurrent"], use_qk_l2norm_in_kernel=True,
                              implementation=step_implementation(cfg.kda_implementation))
      o = o[:, None]
    else:
      o, recurrent = kda(q, k, v, g, beta, initial_state=None if state is None else
                         state["recurrent"], return_final_state=True, segment_ids=segment_ids,
                         use_qk_l2norm_in_kernel=True, implementation=cfg.kda_implementation,
                         chunk_size=cfg.kda_chunk_size)

    # The released checkpoint's g_b_proj has no bias; current fla adds one (SPEC 3.2).
    gate = per_head(low_rank("g", d.num_v_heads * d.v_head_dim), d.num_v_heads)
    # FusedRMSNormGated: normalise each head's V values, then gate.
    o = RMSNorm(cfg.norm_eps, axis_name="kv", name="o_norm")(per_head(o, d.num_v_heads))
    o = (o * jax.nn.sigmoid(gate.astype(jnp.float32))).astype(dtype)
    o = nn.with_logical_constraint(o.reshape(batch, time, -1), FLAT)
    out = dense(cfg.d_model, ("heads", "embed"), "o_proj",
                kernel_init=fan_in_uniform(1.0 / math.sqrt(self.num_layers)))(o)
    return out, {"conv": {"q": conv_q, "k": conv_k, "v": conv_v}, "recurrent": recurrent}
