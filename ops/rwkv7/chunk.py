"""Chunkwise-parallel RWKV-7 (diagonal plus low rank, the generalised delta rule) in plain JAX
(implementation ``"xla"``).

Per chunk of C tokens, with r, k, a, b [C, K] and v [C, V] its rows, S the state before the
chunk, G the chunk-local inclusive cumulative log decay, G~ the exclusive one (G shifted down
by one token) and u_t = a_t^T S_{t-1} the row that token t removes (over V). Unrolling

    S_t = diag(exp(G_t)) S + sum_{i<=t} diag(exp(G_t - G_i)) (b_i u_i + k_i v_i^T)

gives, with the pair products

    A_ab[t, i] = sum_d a_td b_id exp(G~_td - G_id)   (i < t);   A_ak likewise with k
    A_rb[t, i] = sum_d r_td b_id exp(G_td - G_id)    (i <= t);  A_rk likewise with k,

    U = (I - A_ab)^-1 ((a * exp(G~)) S + A_ak v)
    o = (r * exp(G)) S + A_rb U + A_rk v
    S' = diag(exp(G_C)) S + (b * exp(G_C - G))^T U + (k * exp(G_C - G))^T v.

KDA's chunk is the special case b = k, a = -beta exp(g) k with the key beta k. The pair
products, the triangular inverse and the chunk scan are ``ops._chunked``'s: no cumulative gate
is exponentiated unreferenced (SPEC 3.5) and every exponent is a difference later-minus-earlier,
<= 0. The scan's body is rematerialised (``jax.checkpoint``), so the backward keeps one [K, V]
state per chunk. All arithmetic is float32 with the highest matmul precision.

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
  """One chunk for every (batch, head). state: [B, H, K, V]; r, w, k, a, b [B, H, C, K];
  v [B, H, C, V]."""
  r, w, k, v, a, b = chunk
  G = jnp.cumsum(w, axis=-2)
  # G~ is G shifted by one token, not G - w: the rounding of G - w (a spacing of 6e-5 at
  # G = -640) would put an error on the undecayed weight exp(G~_r - G_{r-1}) = 1 of neighbours.
  G_before = jnp.pad(G[..., :-1, :], [(0, 0)] * (G.ndim - 2) + [(1, 0), (0, 0)])
  A_ab = gated_products(a, b, G_before, G, strict=True) * masks.same
  A_ak = gated_products(a, k, G_before, G, strict=True) * masks.same
  A_rb = gated_products(r, b, G, G, strict=False) * masks.same
  A_rk = gated_products(r, k, G, G, strict=False) * masks.same
  carried = masks.carried[..., None]
  matmul = lambda x, y: einsum("...ri,...iv->...rv", x, y)
  U = matmul(unit_lower_inverse(-A_ab),
             matmul(a * jnp.exp(G_before) * carried, state) + matmul(A_ak, v))
  o = matmul(r * jnp.exp(G) * carried, state) + matmul(A_rb, U) + matmul(A_rk, v)
  G_last = G[..., -1:, :]
  to_end = jnp.exp(G_last - G) * masks.last[..., None]
  state_kept = jnp.exp(G_last[..., 0, :])[..., None] * masks.carried[..., -1, None, None]
  state = (state * state_kept + einsum("...ik,...iv->...kv", b * to_end, U)
           + einsum("...ik,...iv->...kv", k * to_end, v))
  return state, o


@functools.partial(jax.jit, static_argnames=("chunk_size", "remat"))
def scan(r, w, k, v, a, b, initial_state, segment_index, *, chunk_size: int = 64,
         remat: bool = True):
  """Same contract as ``reference.scan``.

  Args:
    chunk_size: tokens per chunk, a multiple of SUB_CHUNK.
    remat: recompute each chunk in the backward (bounded memory). False keeps every
      intermediate, as plain autodiff would (for memory comparisons).
  """
  # Padded tokens have r = w = k = v = a = b = 0: they leave the state unchanged.
  return chunk_scan(_chunk, (r, w, k, v, a, b), initial_state, segment_index,
                    chunk_size=chunk_size, remat=remat)
