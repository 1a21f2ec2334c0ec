"""Softmax attention, the baseline mixer: multi-head, grouped-query and multi-query.

Public functions (activations [B, T, heads, dim], as ``jax.nn.dot_product_attention``):

  attention(q, k, v, ...)                  causal self-attention, or queries over a cache.
  attention_mask(batch, T, S, ...)         the boolean mask both modes use (shared with ops.mla).
  update_cache(cache, values, position)    writes new keys or values into a preallocated cache.

RoPE and YaRN live in ``ops.attention.rope``.

Masking. Without ``query_positions`` query t sees keys s <= t (T == S), and ``segment_ids``
of a packed batch also hide keys of other segments. With ``query_positions`` the keys are the
slots of a preallocated cache and query t sees slot s iff s <= query_positions[b, t] (decode,
or a prefill that continues a cache); slots past the position may hold any finite values.

Implementations: ``"reference"`` (float32 einsums, ``ops.attention.reference``), ``"xla"`` and
``"cudnn"`` (``jax.nn.dot_product_attention``; cuDNN flash attention needs a GPU and float16 or
bfloat16). ``None`` picks "cudnn" on GPU where it applies (16-bit inputs, plain causal
self-attention, an even length T, D and Dv multiples of 8 and at most 256), else "xla". All are
differentiable. (cuDNN's gradient rejects odd lengths: seen with jax 0.11.2 on an H200.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ops._validate import check_shape, resolve_implementation
from ops.attention import reference

IMPLEMENTATIONS = ("xla", "cudnn", "reference")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# cuDNN's flash attention on Hopper takes head dims up to 256 (MLA's 192 included): the "xla"
# alternative materialises the [B, H, T, S] scores, 8.6 GB per layer at B 8, H 16, T 4096.
CUDNN_MAX_HEAD_DIM = 256


def _check_index(name: str, x, batch: int, q_len: int) -> None:
  check_shape(name, x, (batch, q_len), "[B, T]")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be integers (int32), got {x.dtype}")


def _check_masking(batch: int, q_len: int, kv_len: int, segment_ids, query_positions) -> None:
  """Validates the masking arguments shared by ``attention`` and ``attention_mask``."""
  if query_positions is None:
    if q_len != kv_len:
      raise ValueError(f"without query_positions this is causal self-attention, which needs as "
                       f"many keys as queries; got T={q_len} queries and S={kv_len} keys "
                       f"(pass query_positions to attend over a cache)")
    if segment_ids is not None:
      _check_index("segment_ids", segment_ids, batch, q_len)
    return
  if segment_ids is not None:
    raise ValueError("segment_ids cannot be combined with query_positions: segment_ids mask "
                     "packed self-attention, query_positions a cache; give one of them")
  _check_index("query_positions", query_positions, batch, q_len)


def attention_mask(batch: int, q_len: int, kv_len: int, *, segment_ids=None,
                   query_positions=None) -> jax.Array:
  """The visibility of key s to query t, with ``attention``'s semantics (module docstring).

  Args:
    batch, q_len, kv_len: B, T and S.
    segment_ids: optional [B, T] integers of packed sequences (self-attention only).
    query_positions: optional [B, T] integers, each query's cache position.

  Returns:
    Boolean [B, T, S], or [1, T, S] for plain causal self-attention; True where visible.
  """
  _check_masking(batch, q_len, kv_len, segment_ids, query_positions)
  slots = jnp.arange(kv_len)
  if query_positions is not None:
    return slots[None, None, :] <= query_positions[:, :, None]
  mask = (slots[None, :] <= jnp.arange(q_len)[:, None])[None]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


def _check_qkv(q, k, v) -> None:
  if q.ndim != 4:
    raise ValueError(f"q must have shape [B, T, H, D], got {tuple(q.shape)}")
  B, _, H, D = q.shape
  check_shape("k", k, (B, None, None, D), f"[B, S, KH, D] with B={B}, D={D} from q")
  S, KH = k.shape[1:3]
  check_shape("v", v, (B, S, KH, None), f"[B, S, KH, Dv] with B={B}, S={S}, KH={KH} from k")
  if H % KH:
    raise ValueError(f"q's heads (H={H}) must be a multiple of k and v's heads (KH={KH})")


def _cudnn_applies(q, v, segment_ids, query_positions) -> bool:
  T, D, Dv = q.shape[1], q.shape[-1], v.shape[-1]
  return (q.dtype in CUDNN_DTYPES and segment_ids is None and query_positions is None
          and T % 2 == 0 and max(D, Dv) <= CUDNN_MAX_HEAD_DIM and D % 8 == 0 and Dv % 8 == 0)


def _pad_last(x, width: int):
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def attention(q, k, v, *, segment_ids=None, query_positions=None, scale=None,
              implementation=None) -> jax.Array:
  """Softmax attention with a causal or cache mask.

  Args:
    q: [B, T, H, D].
    k: [B, S, KH, D], H a multiple of KH (KH == H: multi-head; 1 < KH < H: grouped-query;
      KH == 1: multi-query); query head h reads key head h // (H // KH). Cast to q's dtype.
    v: [B, S, KH, Dv]; Dv may differ from D. Cast to q's dtype.
    segment_ids: optional [B, T] int32 ids of packed sequences; causal self-attention only.
    query_positions: optional [B, T] int32; query t sees cache slot s iff
      s <= query_positions[b, t]. Each query must see at least one slot (position >= 0).
    scale: the score scale; D ** -0.5 when None.
    implementation: None, "xla", "cudnn" or "reference".

  Returns:
    o [B, T, H, Dv] in q's dtype.
  """
  _check_qkv(q, k, v)
  B, T, _, D = q.shape
  S, Dv = k.shape[1], v.shape[-1]
  _check_masking(B, T, S, segment_ids, query_positions)
  scale = D ** -0.5 if scale is None else scale
  cudnn = _cudnn_applies(q, v, segment_ids, query_positions)
  implementation = resolve_implementation(implementation, IMPLEMENTATIONS,
                                          {"gpu": "cudnn"} if cudnn else None)
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  masks = dict(segment_ids=segment_ids, query_positions=query_positions)
  if implementation == "reference":
    return reference.attention(q, k, v, attention_mask(B, T, S, **masks), scale)
  if implementation == "cudnn":
    if jax.default_backend() != "gpu":
      raise ValueError(f"implementation='cudnn' needs a GPU, this backend is "
                       f"{jax.default_backend()!r}; use 'xla' or None")
    if q.dtype not in CUDNN_DTYPES:
      raise ValueError(f"implementation='cudnn' needs float16 or bfloat16 q, k and v, got "
                       f"{q.dtype}; use 'xla' or None")
  causal = segment_ids is None and query_positions is None
  mask = None if causal else attention_mask(B, T, S, **masks)[:, None]
  # dot_product_attention wants one head dim for q, k and v: zero columns change no score.
  width = max(D, Dv)
  o = jax.nn.dot_product_attention(
      _pad_last(q, width), _pad_last(k, width), _pad_last(v, width), mask=mask, scale=scale,
      is_causal=causal, implementation=implementation)
  return o[..., :Dv]


def update_cache(cache, values, position) -> jax.Array:
  """Writes ``values`` into ``cache`` at time slots ``position .. position + T - 1``.

  Args:
    cache: [B, S, ...] a preallocated cache (keys, values, or MLA's latents).
    values: [B, T, ...] with the cache's trailing shape; cast to the cache's dtype.
    position: int32 scalar, the first slot written; may be traced.

  Returns:
    The updated cache [B, S, ...].

  A concrete position outside [0, S - T] raises. A traced one is not checked: past S - T,
  ``lax.dynamic_update_slice`` clamps it and the values land in the last T slots, overwriting
  earlier tokens, so callers must check the lengths before (the generator does).
  """
  if cache.ndim < 2:
    raise ValueError(f"cache must have shape [B, S, ...], got {tuple(cache.shape)}")
  B, S = cache.shape[:2]
  rest = tuple(cache.shape[2:])
  if values.ndim != cache.ndim or values.shape[0] != B or tuple(values.shape[2:]) != rest:
    raise ValueError(f"values must have shape [B, T, ...] = [{B}, T, "
                     f"{', '.join(map(str, rest))}] to match cache {tuple(cache.shape)}, got "
                     f"{tuple(values.shape)}")
  T = values.shape[1]
  if T > S:
    raise ValueError(f"values has T={T} tokens, more than the cache's S={S} slots")
  position = jnp.asarray(position)
  if position.ndim != 0 or not jnp.issubdtype(position.dtype, jnp.integer):
    raise ValueError(f"position must be an integer scalar, got {position.dtype} of shape "
                     f"{tuple(position.shape)}")
  if not isinstance(position, jax.core.Tracer) and not 0 <= int(position) <= S - T:
    raise ValueError(f"position must be in [0, S - T] = [0, {S - T}] to write T={T} tokens "
                     f"into S={S} slots, got {int(position)}")
  start = (position.astype(jnp.int32),) + (jnp.int32(0),) * (cache.ndim - 2)
  return jax.lax.dynamic_update_slice(cache, values.astype(cache.dtype), (jnp.int32(0),) + start)
