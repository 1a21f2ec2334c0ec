"""Token-by-token RWKV-7 recurrence (SPEC 2.5) with ``lax.scan`` in float32: the ground truth.

Inputs arrive prepared by ``ops.rwkv7``: float32, r already scaled. Per head, with the key-major
state S in R^{K x V} (fla's layout, the transpose of the official value-major one) and w the
log decay:

    S <- diag(exp(w_t)) S + b_t (a_t^T S) + k_t v_t^T;   o_t = S^T r_t

The low-rank term reads the undecayed previous state; the output reads the updated one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ops._chunked import token_scan

HIGHEST = jax.lax.Precision.HIGHEST


def update(state, r_t, w_t, k_t, v_t, a_t, b_t):
  """One token for every (batch, head).

  Args:
    state: [B, H, K, V] float32.
    r_t, w_t, k_t, a_t, b_t: [B, H, K]; v_t: [B, H, V].

  Returns:
    o_t [B, H, V] and the new state.
  """
  removed = jnp.einsum("bhk,bhkv->bhv", a_t, state, precision=HIGHEST)  # a_t^T S_{t-1}
  state = (state * jnp.exp(w_t)[..., None] + b_t[..., None] * removed[..., None, :]
           + k_t[..., None] * v_t[..., None, :])
  return jnp.einsum("bhk,bhkv->bhv", r_t, state, precision=HIGHEST), state


@jax.jit
def scan(r, w, k, v, a, b, initial_state, segment_index):
  """Runs ``update`` over time.

  Args:
    r, w, k, a, b: [B, T, H, K]; v: [B, T, H, V]; all float32.
    initial_state: [B, H, K, V] float32.
    segment_index: None, or [B, T] non-decreasing integers; the state restarts from zero where
      it steps up.

  Returns:
    o [B, T, H, V] float32 and the final state.
  """
  return token_scan(update, (r, w, k, v, a, b), initial_state, segment_index)
