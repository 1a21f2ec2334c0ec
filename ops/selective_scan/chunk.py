"""Chunked parallel selective scan in plain JAX (implementation ``"xla"``).

Time is cut into chunks of ``chunk_size`` tokens. Inside a chunk the linear recurrence
``h_t = a_t h_{t-1} + b_t`` runs as an associative scan over ``(a, b)`` pairs; a ``lax.scan``
over chunks carries the state from one chunk to the next. The chunk body is rematerialised
(``jax.checkpoint``), so the forward keeps one state per chunk and the backward recomputes the
chunk's ``[batch, chunk, channels, state]`` intermediates: peak memory grows with
``batch x chunk x channels x state`` (plus ``time / chunk`` states), not with the whole sequence.
``docs/selective_scan.md`` records the measurement behind ``DEFAULT_CHUNK_SIZE``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 128


def _combine(left, right):
  """Composes two affine maps h -> a h + b (left first, then right)."""
  a_left, b_left = left
  a_right, b_right = right
  return a_left * a_right, a_right * b_left + b_right


def _chunk(h, xs, A):
  """One chunk. h: [batch, groups, group_channels, state]; xs time-major within the chunk."""
  u, delta, B, C, keep = xs  # u, delta [b, L, g, c]; B, C [b, L, g, n]; keep [b, L]
  decay = jnp.exp(delta[..., None] * A) * keep[:, :, None, None, None]
  drive = (delta * u)[..., None] * B[:, :, :, None, :]
  decay_prefix, drive_prefix = jax.lax.associative_scan(_combine, (decay, drive), axis=1)
  states = decay_prefix * h[:, None] + drive_prefix  # [b, L, g, c, n]
  y = jnp.einsum("blgcn,blgn->blgc", states, C, precision=jax.lax.Precision.HIGHEST)
  return states[:, -1], y


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def scan(u, delta, A, B, C, keep, initial_state, *, chunk_size: int = DEFAULT_CHUNK_SIZE):
  """Same contract as ``reference.scan``; ``chunk_size`` bounds the parallel work per step."""
  batch, time = u.shape[:2]
  num_chunks = -(-time // chunk_size)
  pad = num_chunks * chunk_size - time

  def to_chunks(x):
    # Padded steps have delta = 0 and keep = 1: decay 1, drive 0, so the state passes unchanged.
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((batch, num_chunks, chunk_size) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  keep = jnp.pad(keep, [(0, 0), (0, pad)], constant_values=1.0)
  xs = tuple(map(to_chunks, (u, delta, B, C))) + (jnp.moveaxis(
      keep.reshape(batch, num_chunks, chunk_size), 1, 0),)
  body = jax.checkpoint(functools.partial(_chunk, A=A))
  final_state, y = jax.lax.scan(body, initial_state, xs)
  y = jnp.moveaxis(y, 0, 1).reshape((batch, num_chunks * chunk_size) + y.shape[3:])
  return y[:, :time], final_state
