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
    return jax.nn.softmax(logits, axis=-1) if mask is None else masked_softmax(logits, mask)


def masked_softmax(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """Softmax over the last axis of `logits`, only where `valid` (broadcast to them)."""
    return jax.nn.softmax(jnp.where(valid, logits, NEG_INF), axis=-1)


def attend_one_weights(q: jax.Array, k: jax.Array, valid: jax.Array) -> jax.Array:
    """`attend_one`'s softmax: float32 [B, H, S] (q, k, valid as there)."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bhk,bhsk->bhs", q, k, preferred_element_type=jnp.float32) * scale
    return masked_softmax(logits, valid[:, None, :])


def attend_one(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
    """One query per row against a decode cache: keys/values stored [B, H, S, K].

    Why heads before positions: both products are then batched matrix-vector dots with
    the batch axes leading, which XLA:CPU runs over the cache in place. Stored [B, S, H,
    K], the cache had to be transposed (XLA:CPU copied the cross-attention cache every
    step) or reduced with multiply-and-sum fusions, which a profile of the decode loop
    (`jax.profiler`) showed far slower than these dots for a 3x3 grid.

    Args:
      q: [B, H, K] the query.
      k, v: [B, H, S, K].
      valid: [B or 1, S] bool, True where attending is allowed.

    Returns:
      [B, H, K] in q's dtype.
    """
    weights = attend_one_weights(q, k, valid).astype(v.dtype)
    return jnp.einsum("bhs,bhsk->bhk", weights, v, preferred_element_type=jnp.float32).astype(q.dtype)


def attend_cache(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, position: jax.Array) -> jax.Array:
    """One decode step of causal self-attention over a cache that already holds the token.

    Args:
      q: [B, H, K] query of the token at `position`.
      k_cache, v_cache: [B, H, S, K]; entries at <= position are valid (the current
        token's key/value included), later ones are ignored.
      position: scalar int, index of the current token.

    Returns:
      [B, H, K] in q's dtype.
    """
    valid = jnp.arange(k_cache.shape[2]) <= position
    return attend_one(q, k_cache, v_cache, valid[None])


def causal_mask(length: int) -> jax.Array:
    """[1, 1, length, length] lower-triangular mask (True = may attend)."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def padding_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T] (1 = real token) -> [B, 1, 1, T]: only keys are masked, as released."""
    return attention_mask.astype(bool)[:, None, None, :]
