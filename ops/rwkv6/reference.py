"""Token-by-token RWKV-6 wkv recurrence (SPEC 2.1) with ``lax.scan`` in float32: the ground truth.

Inputs arrive prepared by ``ops.rwkv6``: float32, r already scaled. Per head, with state S in
R^{K x V}, log decay w_t and bonus u:

    o_t = S^T r_t + (sum_d r_td u_d k_td) v_t;   S <- diag(exp(w_t)) S + k_t v_t^T

The output reads the state before token t's decay and write; the bonus is the current token's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ops._chunked import token_scan

HIGHEST = jax.lax.Precision.HIGHEST


def update(state, r_t, k_t, v_t, w_t, u):
  """One token for every (batch, head).

  Args:
    state: [B, H, K, V] float32.
    r_t, k_t, w_t: [B, H, K]; v_t: [B, H, V]; u: [H, K].

  Returns:
    o_t [B, H, V] and the new state.
  """
  bonus = jnp.sum(r_t * u * k_t, axis=-1, keepdims=True)
  o_t = jnp.einsum("bhk,bhkv->bhv", r_t, state, precision=HIGHEST) + bonus * v_t
  state = (state * jnp.exp(w_t)[..., None]
           + jnp.einsum("bhk,bhv->bhkv", k_t, v_t, precision=HIGHEST))
  return o_t, state


@jax.jit
def scan(r, k, v, w, u, initial_state, segment_index):
  """Runs ``update`` over time.

  Args:
    r, k, w: [B, T, H, K]; v: [B, T, H, V]; u: [H, K]; all float32.
    initial_state: [B, H, K, V] float32.
    segment_index: None, or [B, T] non-decreasing integers; the state restarts from zero where
      it steps up (before that token reads it).

  Returns:
    o [B, T, H, V] float32 and the final state.
  """
  return token_scan(lambda state, *token: update(state, *token, u), (r, k, v, w),
                    initial_state, segment_index)
