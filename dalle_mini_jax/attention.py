"""Multi-head attention maths shared by the encoder, the decoder and the KV-cached step.

Pure functions over arrays; the weights live in `transformer.py`. Shapes:
B batch, Q query length, L key length, H heads, K head dim.

The released DalleBart scales the logits by 1/sqrt(K) *after* the QK product and
turns masks into a bias (0 / -inf) added before a softmax in the compute dtype. We
compute the softmax in float32 whatever the compute dtype: it costs nothing at these
sizes and keeps bf16 sampling stable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A finite "minus infinity": a fully masked row then gives a uniform softmax instead of
# NaN, and the additions below cannot overflow.
NEG_INF = -1e30


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None
) -> jax.Array:
    """Softmax attention.

    Args:
      q: [B, Q, H, K] queries.
      k: [B, L, H, K] keys.
      v: [B, L, H, K] values.
      mask: broadcastable to [B, H, Q, L]; True/1 where attending is allowed.

    Returns:
      [B, Q, H, K] in q's dtype.
    """
    weights = attention_weights(q, k, mask).astype(v.dtype)
    return jnp.einsum("bhql,blhk->bqhk", weights, v)


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`attention`'s softmax: float32 [B, H, Q, L] (q, k, mask as there)."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhk,blhk->bhql", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, NEG_INF)
    return jax.nn.softmax(logits, axis=-1)


def cached_attention(
    q: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    position: jax.Array,
) -> jax.Array:
    """One decode step of causal self-attention against a preallocated cache.

    The cache holds keys/values of positions < `position`; the current token's own
    key/value are attended separately, so the cache is only written once per step,
    after all layers (one in-place update instead of one per layer).

    Args:
      q, k_new, v_new: [B, H, K] for the token at `position`.
      k_cache, v_cache: [B, S, H, K]; entries at >= position are ignored.
      position: scalar int, index of the current token.

    Returns:
      [B, H, K].
    """
    scale = q.shape[-1] ** -0.5
    logits_cache = jnp.einsum(
        "bhk,bshk->bhs", q, k_cache, preferred_element_type=jnp.float32
    ) * scale
    valid = jnp.arange(k_cache.shape[1]) < position
    logits_cache = jnp.where(valid[None, None, :], logits_cache, NEG_INF)
    logit_self = jnp.einsum("bhk,bhk->bh", q, k_new, preferred_element_type=jnp.float32) * scale
    m = jnp.maximum(logits_cache.max(axis=-1), logit_self)
    w_cache = jnp.exp(logits_cache - m[..., None])
    w_self = jnp.exp(logit_self - m)
    denom = w_cache.sum(axis=-1) + w_self
    out = jnp.einsum("bhs,bshk->bhk", w_cache.astype(v_cache.dtype), v_cache)
    out = out.astype(jnp.float32) + w_self[..., None] * v_new.astype(jnp.float32)
    return (out / denom[..., None]).astype(q.dtype)


def attend_cache(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, position: jax.Array
) -> jax.Array:
    """One decode step of causal self-attention over a cache that already holds the token.

    Written as multiply-and-reduce rather than einsum: a dot would need the cache
    transposed to [B, H, S, K] (a copy of the whole layer cache every step on XLA:CPU),
    while the fused reductions read it once, in place.

    Args:
      q: [B, H, K] query of the token at `position`.
      k_cache, v_cache: [B, S, H, K]; entries at <= position are valid (the current
        token's key/value included), later ones are ignored.
      position: scalar int, index of the current token.

    Returns:
      [B, H, K] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5
    qf = q.astype(jnp.float32)
    logits = (qf[:, None] * k_cache.astype(jnp.float32)).sum(-1) * scale  # [B, S, H]
    valid = jnp.arange(k_cache.shape[1]) <= position
    logits = jnp.where(valid[None, :, None], logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=1)  # over S
    out = (weights[..., None] * v_cache.astype(jnp.float32)).sum(1)  # [B, H, K]
    return out.astype(q.dtype)


def causal_mask(length: int) -> jax.Array:
    """[1, 1, length, length] lower-triangular mask (True = may attend)."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def padding_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T] (1 = real token) -> [B, 1, 1, T]: only keys are masked, as released."""
    return attention_mask.astype(bool)[:, None, None, :]
