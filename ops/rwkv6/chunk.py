"""Chunkwise-parallel RWKV-6 (gated linear attention with a bonus) in plain JAX (``"xla"``).

Per chunk of C tokens with the chunk-local inclusive cumulative log decay G, its exclusive
counterpart G~ (G~_r = G_{r-1}, the decay that has reached the state token r reads) and the
state S before the chunk:

    A[r, i] = sum_d r_rd k_id exp(G~_rd - G_id)     (i < r; r is pre-scaled)
    O  = (R * exp G~) S + A V
    S' = diag(exp G_C) S + (K * exp(G_C - G))^T V

The bonus b_t v_t, b_t = sum_d r_td u_d k_td, is token-local and is added to o outside the
chunk scan. (Inside the body, XLA:CPU of jax 0.10.2 fuses its reduction with the dot against a
constant state, zeros when the scan has one chunk and no initial state, into a YNNPACK fusion
that returns garbage.)

The pair products and the chunk scan are ``ops._chunked``'s (shared with KDA and RWKV-7): no
cumulative gate is exponentiated unreferenced (SPEC 3.5), and every exponent here is a
difference later-minus-earlier, <= 0 (G~ is G shifted by one token rather than G - w, which
would cancel). The scan's body is rematerialised (``jax.checkpoint``), so the backward keeps one
[K, V] state per chunk. All arithmetic is float32 with the highest matmul precision.

Packed rows (``segment_index``): the state restarts from zero where the index steps up. Inside a
chunk A is masked to the same segment; the incoming state reaches only rows of the segment that
continues from the previous chunk, and only rows of the chunk's last segment reach the outgoing
state.

Decays stronger than ``LOG_DECAY_FLOOR`` (w < -20) are raised to it. The weights are
exponentials of differences of cumulative gates; one token with w = -1000 leaves every later G
of its chunk near -1000, where the float32 spacing (6e-5) becomes a relative error of the
weights between the later tokens (measured up to 5e-4 on the final state with a fifth of the
entries at -1000). At the floor the spacing is 32 times finer, and such a token keeps
exp(-20) = 2e-9 of the state instead of (about) nothing: below float32's relative resolution
(6e-8) next to terms of the state's size. Its gradient becomes 0 instead of exp(w) (< 2e-9)
times a bounded factor.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ops._chunked import chunk_scan, einsum, gated_products

LOG_DECAY_FLOOR = -20.0


def _chunk(state, chunk, masks):
  """One chunk for every (batch, head). state: [B, H, K, V]; r, k, w [B, H, C, K]."""
  r, k, v, w = chunk
  G = jnp.cumsum(w, axis=-2)
  G_read = jnp.concatenate([jnp.zeros_like(G[..., :1, :]), G[..., :-1, :]], axis=-2)
  A = gated_products(r, k, G_read, G, strict=True) * masks.same
  carried = masks.carried[..., None]
  o = (einsum("...rk,...kv->...rv", r * jnp.exp(G_read) * carried, state)
       + einsum("...ri,...iv->...rv", A, v))
  G_last = G[..., -1:, :]
  k_to_end = k * jnp.exp(G_last - G) * masks.last[..., None]
  state_kept = jnp.exp(G_last[..., 0, :])[..., None] * masks.carried[..., -1, None, None]
  state = state * state_kept + einsum("...ik,...iv->...kv", k_to_end, v)
  return state, o


@functools.partial(jax.jit, static_argnames=("chunk_size", "remat"))
def scan(r, k, v, w, u, initial_state, segment_index, *, chunk_size: int = 64,
         remat: bool = True):
  """Same contract as ``reference.scan``.

  Args:
    chunk_size: tokens per chunk, a multiple of ``ops._chunked.SUB_CHUNK``.
    remat: recompute each chunk in the backward (bounded memory). False keeps every
      intermediate, as plain autodiff would (for memory comparisons).
  """
  # Padded tokens have r = k = v = w = 0: they leave the state unchanged.
  w = jnp.maximum(w, LOG_DECAY_FLOOR)
  o, final_state = chunk_scan(_chunk, (r, k, v, w), initial_state, segment_index,
                              chunk_size=chunk_size, remat=remat)
  return o + jnp.sum(r * u * k, axis=-1, keepdims=True) * v, final_state
