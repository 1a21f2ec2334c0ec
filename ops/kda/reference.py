"""Token-by-token KDA recurrence (SPEC 3.1) with ``lax.scan`` in float32: the ground truth.

Inputs arrive prepared by ``ops.kda``: float32, q already scaled (and L2-normalised if asked),
q and k repeated to the value heads. Per head, with state S in R^{K x V}:

    S <- diag(exp(g_t)) S;   S <- S + beta_t k_t (v_t - S^T k_t)^T;   o_t = S^T q_t
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ops._chunked import token_scan

HIGHEST = jax.lax.Precision.HIGHEST


def update(state, q_t, k_t, v_t, g_t, beta_t):
  """One token for every (batch, head).

  Args:
    state: [B, HV, K, V] float32.
    q_t, k_t, g_t: [B, HV, K]; v_t: [B, HV, V]; beta_t: [B, HV].

  Returns:
    o_t [B, HV, V] and the new state.
  """
  state = state * jnp.exp(g_t)[..., None]
  predicted = jnp.einsum("bhk,bhkv->bhv", k_t, state, precision=HIGHEST)
  state = state + jnp.einsum("bhk,bhv->bhkv", beta_t[..., None] * k_t, v_t - predicted,
                             precision=HIGHEST)
  return jnp.einsum("bhk,bhkv->bhv", q_t, state, precision=HIGHEST), state


@jax.jit
def scan(q, k, v, g, beta, initial_state, segment_index):
  """Runs ``update`` over time.

  Args:
    q, k, g: [B, T, HV, K]; v: [B, T, HV, V]; beta: [B, T, HV]; all float32.
    initial_state: [B, HV, K, V] float32.
    segment_index: None, or [B, T] non-decreasing integers; the state restarts from zero where
      it steps up.

  Returns:
    o [B, T, HV, V] float32 and the final state.
  """
  return token_scan(update, (q, k, v, g, beta), initial_state, segment_index)
