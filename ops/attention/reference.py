"""Softmax attention spelled out: float32 einsum scores, a boolean mask, float32 softmax.

The ground truth of ``ops.attention``; also the masked softmax that ``ops.mla``'s absorbed path
shares.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A masked score. Finite, like jax.nn.dot_product_attention's, so a row without a visible key
# gives the mean of all values rather than NaN (and both implementations agree on it).
MASKED = float(jnp.finfo(jnp.float32).min)


def masked_softmax(scores, mask):
  """Softmax over the last axis in float32, with ``mask`` False entries left out.

  Args:
    scores: [..., T, S] scores, any float dtype.
    mask: boolean, broadcastable to ``scores``; True where a key is visible.

  Returns:
    Probabilities [..., T, S] float32.
  """
  scores = jnp.where(mask, scores.astype(jnp.float32), MASKED)
  return jax.nn.softmax(scores, axis=-1)


def attention(q, k, v, mask, scale: float):
  """Grouped-query softmax attention in float32.

  Args:
    q: [B, T, H, D].
    k: [B, S, KH, D], H a multiple of KH; query head h reads key head h // (H // KH).
    v: [B, S, KH, Dv].
    mask: boolean [B or 1, T, S]; True where query t sees key s.
    scale: the score scale.

  Returns:
    o [B, T, H, Dv] in q's dtype.
  """
  B, T, H, D = q.shape
  KH, Dv = v.shape[2:]
  dtype = q.dtype
  highest = jax.lax.Precision.HIGHEST
  q = q.astype(jnp.float32).reshape(B, T, KH, H // KH, D)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(jnp.float32), precision=highest)
  p = masked_softmax(scores * scale, mask[:, None, None])
  o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32), precision=highest)
  return o.reshape(B, T, H, Dv).astype(dtype)
