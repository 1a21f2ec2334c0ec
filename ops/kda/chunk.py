"""Chunkwise-parallel KDA (SPEC 3.3-3.5) in plain JAX (implementation ``"xla"``).

Per chunk of C tokens with the chunk-local cumulative gate G (Gamma = exp G) and the state S
before the chunk:

    A_kk[r, i] = beta_r sum_d k_rd k_id exp(G_rd - G_id)   (i < r)
    A_qk[r, i] =        sum_d q_rd k_id exp(G_rd - G_id)   (i <= r; q is pre-scaled)
    T = (I + A_kk)^-1,  W = T diag(beta) (K * Gamma),  U = T diag(beta) V
    V~ = U - W S,  O = (Q * Gamma) S + A_qk V~,  S' = diag(Gamma_C) S + (K * exp(G_C - G))^T V~

The pair products, the triangular inverse and the chunk scan are ``ops._chunked``'s (shared
with RWKV-6 and RWKV-7): no cumulative gate is exponentiated unreferenced (SPEC 3.5), and every
other exponent here is a difference later-minus-earlier, <= 0. The scan's body is rematerialised
(``jax.checkpoint``), so the backward keeps one [K, V] state per chunk. All arithmetic is float32
with the highest matmul precision.

Packed rows (``segment_index``): the state restarts from zero where the index steps up. Inside a
chunk the pair products are masked to the same segment; the incoming state reaches only rows of
the segment that continues from the previous chunk, and only rows of the chunk's last segment
reach the outgoing state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ops._chunked import SUB_CHUNK, chunk_scan, einsum, gated_products, unit_lower_inverse


def _chunk(state, chunk, masks):
  """One chunk for every (batch, head). state: [B, HV, K, V]; q, k, g [B, HV, C, K]."""
  q, k, v, g, beta = chunk
  G = jnp.cumsum(g, axis=-2)
  A_qk = gated_products(q, k, G, G, strict=False) * masks.same
  A_kk = gated_products(k, k, G, G, strict=True) * masks.same * beta[..., :, None]
  T = unit_lower_inverse(A_kk)
  gamma = jnp.exp(G)
  carried = masks.carried[..., None]
  W = einsum("...ri,...ik->...rk", T, beta[..., None] * k * gamma) * carried
  U = einsum("...ri,...iv->...rv", T, beta[..., None] * v)
  pseudo_values = U - einsum("...rk,...kv->...rv", W, state)
  o = (einsum("...rk,...kv->...rv", q * gamma * carried, state)
       + einsum("...ri,...iv->...rv", A_qk, pseudo_values))
  G_last = G[..., -1:, :]
  k_to_end = k * jnp.exp(G_last - G) * masks.last[..., None]
  state_kept = jnp.exp(G_last[..., 0, :])[..., None] * masks.carried[..., -1, None, None]
  state = state * state_kept + einsum("...ik,...iv->...kv", k_to_end, pseudo_values)
  return state, o


@functools.partial(jax.jit, static_argnames=("chunk_size", "remat"))
def scan(q, k, v, g, beta, initial_state, segment_index, *, chunk_size: int = 64,
         remat: bool = True):
  """Same contract as ``reference.scan``.

  Args:
    chunk_size: tokens per chunk, a multiple of SUB_CHUNK.
    remat: recompute each chunk in the backward (bounded memory). False keeps every
      intermediate, as plain autodiff would (for memory comparisons).
  """
  # Padded tokens have k = v = g = beta = 0: they leave the state unchanged.
  return chunk_scan(_chunk, (q, k, v, g, beta), initial_state, segment_index,
                    chunk_size=chunk_size, remat=remat)
