"""Token-by-token selective scan (SPEC 1.2) with ``lax.scan`` in float32: the ground truth.

All arrays here are already float32 and in the grouped layout that the public function prepares:
channels are split as ``[groups, channels_per_group]`` so that B and C broadcast without copies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def update(h, u_t, delta_t, A, B_t, C_t):
  """Advances the state by one token and reads it out.

  Args:
    h: [batch, groups, group_channels, state] float32, the state before the token.
    u_t, delta_t: [batch, groups, group_channels] float32 (delta already biased and activated).
    A: [groups, group_channels, state] float32.
    B_t, C_t: [batch, groups, state] float32.

  Returns:
    y_t [batch, groups, group_channels] and the new state (same shape as ``h``).
  """
  decay = jnp.exp(delta_t[..., None] * A)
  h = decay * h + (delta_t * u_t)[..., None] * B_t[:, :, None, :]
  y_t = jnp.einsum("bgcn,bgn->bgc", h, C_t, precision=jax.lax.Precision.HIGHEST)
  return y_t, h


@jax.jit
def scan(u, delta, A, B, C, keep, initial_state):
  """Runs ``update`` over time.

  Args:
    u, delta: [batch, time, groups, group_channels] float32.
    A: [groups, group_channels, state] float32.
    B, C: [batch, time, groups, state] float32.
    keep: [batch, time] float32, 0 where the state resets before the token, else 1.
    initial_state: [batch, groups, group_channels, state] float32.

  Returns:
    y [batch, time, groups, group_channels] float32 and the final state.
  """

  def step(h, xs):
    u_t, delta_t, B_t, C_t, keep_t = xs
    h = h * keep_t[:, None, None, None]
    y_t, h = update(h, u_t, delta_t, A, B_t, C_t)
    return h, y_t

  time_first = lambda x: jnp.moveaxis(x, 1, 0)
  final_state, y = jax.lax.scan(
      step, initial_state, tuple(map(time_first, (u, delta, B, C, keep))))
  return time_first(y), final_state
