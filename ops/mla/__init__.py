"""Multi-head latent attention (MLA, SPEC 4): attention whose keys and values come from a
per-token latent ``c_kv`` shared by all heads, plus one head-shared positional key part.

  mla(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, *, scale, ...)

Per head h, query t and key s (``w_uk``, ``w_uv``: the two halves of kv_b_proj):

    k_nope^h_s = c_kv_s @ w_uk[:, h]      v^h_s = c_kv_s @ w_uv[:, h]
    score^h_ts = scale * (q_nope^h_t . k_nope^h_s + q_pe^h_t . k_pe_s)
    o^h_t      = sum_s softmax_s(score^h_t)_s v^h_s

Masking is ``ops.attention.attention``'s: causal self-attention (optionally with
``segment_ids``), or queries at ``query_positions`` over preallocated latent caches.

Implementations:

* ``"expanded"``: builds per-head k [B, S, H, Dn + R] and v [B, S, H, Dv] and calls
  ``ops.attention.attention`` (with ``attention_implementation``): training and prefill.
* ``"absorbed"``: folds ``w_uk`` into the query and ``w_uv`` after the weighted sum, so the
  scores are multi-query attention over the (C + R)-d latent key and the C-d latent value of
  each token, read straight from the cache: decode.

``None`` picks "absorbed" for one query token (T == 1), else "expanded". Products accumulate in
float32; the operands of each product are in the inputs' dtype (the absorbed query and the
probabilities are rounded to q_nope's dtype, as the expanded k and v are).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ops._validate import check_shape, resolve_implementation
from ops.attention import attention, attention_mask
from ops.attention.reference import masked_softmax

IMPLEMENTATIONS = ("expanded", "absorbed")


def _check(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv) -> None:
  if q_nope.ndim != 4:
    raise ValueError(f"q_nope must have shape [B, T, H, Dn], got {tuple(q_nope.shape)}")
  B, T, H, Dn = q_nope.shape
  if q_pe.ndim != 4 or tuple(q_pe.shape[:3]) != (B, T, H) or q_pe.shape[3] < 1:
    raise ValueError(f"q_pe must have shape [B, T, H, R] = [{B}, {T}, {H}, R] with R >= 1, "
                     f"got {tuple(q_pe.shape)}")
  R = q_pe.shape[3]
  if c_kv.ndim != 3 or c_kv.shape[0] != B:
    raise ValueError(f"c_kv must have shape [B, S, C] with B={B}, got {tuple(c_kv.shape)}")
  S, C = c_kv.shape[1:]
  check_shape("k_pe", k_pe, (B, S, R), f"[B, S, R] with R={R} from q_pe")
  check_shape("w_uk", w_uk, (C, H, Dn), f"[C, H, Dn] with C={C} from c_kv and H, Dn from q_nope")
  check_shape("w_uv", w_uv, (C, H, None), f"[C, H, Dv] with C={C} from c_kv and H from q_nope")


def _einsum(spec: str, a, b):
  """``jnp.einsum`` accumulating in float32.

  XLA:CPU cannot run some 16-bit x 16-bit -> float32 dots, so on CPU the operands are widened
  first; that is exact (the product of two 16-bit floats is exact in float32).
  """
  if jax.default_backend() == "cpu":
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _expanded(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, scale, masks, attention_implementation):
  dtype = q_nope.dtype
  H = q_nope.shape[2]
  k_nope = _einsum("bsc,chd->bshd", c_kv, w_uk).astype(dtype)
  v = _einsum("bsc,chd->bshd", c_kv, w_uv).astype(dtype)
  k_pe = jnp.broadcast_to(k_pe.astype(dtype)[:, :, None], k_pe.shape[:2] + (H, k_pe.shape[-1]))
  q = jnp.concatenate([q_nope, q_pe.astype(dtype)], axis=-1)
  k = jnp.concatenate([k_nope, k_pe], axis=-1)
  return attention(q, k, v, scale=scale, implementation=attention_implementation, **masks)


def _absorbed(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, scale, masks):
  dtype = q_nope.dtype
  B, T = q_nope.shape[:2]
  mask = attention_mask(B, T, c_kv.shape[1], **masks)
  q_lat = _einsum("bthd,chd->bthc", q_nope, w_uk).astype(dtype)
  scores = _einsum("bthc,bsc->bhts", q_lat, c_kv) + _einsum("bthr,bsr->bhts", q_pe, k_pe)
  p = masked_softmax(scores * scale, mask[:, None]).astype(dtype)
  o_lat = _einsum("bhts,bsc->bthc", p, c_kv).astype(dtype)
  return _einsum("bthc,chd->bthd", o_lat, w_uv).astype(dtype)


def mla(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, *, scale, segment_ids=None, query_positions=None,
        implementation=None, attention_implementation=None) -> jax.Array:
  """Multi-head latent attention.

  Args:
    q_nope: [B, T, H, Dn] the queries' content part.
    q_pe: [B, T, H, R] the queries' positional part, R >= 1 (already rotated, or never rotated
      for NoPE: Kimi-Linear keeps an unrotated 64-d part).
    c_kv: [B, S, C] the normalised latent (kv_lora_rank C), or a latent cache.
    k_pe: [B, S, R] the positional key part shared by all heads, rotated by the caller or not at
      all (this op never applies RoPE), or its cache.
    w_uk: [C, H, Dn] the key half of kv_b_proj.
    w_uv: [C, H, Dv] the value half of kv_b_proj.
    scale: the score scale, e.g. (Dn + R) ** -0.5 (times YaRN's factor squared if extended).
    segment_ids: optional [B, T] int32 ids of packed sequences (self-attention, S == T).
    query_positions: optional [B, T] int32 cache positions; query t sees slot s iff
      s <= query_positions[b, t].
    implementation: None, "expanded" or "absorbed".
    attention_implementation: ``ops.attention.attention``'s implementation for "expanded";
      "absorbed" ignores it.

  Returns:
    o [B, T, H, Dv] in q_nope's dtype.
  """
  _check(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv)
  if implementation is None:
    implementation = "absorbed" if q_nope.shape[1] == 1 else "expanded"
  implementation = resolve_implementation(implementation, IMPLEMENTATIONS)
  args = (q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, scale,
          dict(segment_ids=segment_ids, query_positions=query_positions))
  if implementation == "expanded":
    return _expanded(*args, attention_implementation)
  return _absorbed(*args)
