"""16-bit floats held as their uint16 bits, where XLA:CPU would widen them.

XLA:CPU has no 16-bit dynamic slice or dynamic update slice: its float-normalization
pass rewrites one on a bf16/f16 array as a float32 copy of the whole array, sliced or
updated, then converted back (found with `--xla_dump_hlo_pass_re`). Converting to the
bits and back around the op does not help: XLA then copies the array at every
iteration of the loop that updates it. The same ops on uint16 bits are plain copies
of the slice, in place. So arrays that loops slice or update piece by piece are
*held* as their bits, and read as floats where they are used: the VQGAN decoder's
maps in its strips (`vqgan.conv_rows`) and the decode loop's self-attention cache
(`transformer.DecodeCache`). Float32 arrays pass through unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bits(x: jax.Array) -> jax.Array:
    """A 16-bit float array as its uint16 bits (other dtypes unchanged)."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def unbits(b: jax.Array, dtype) -> jax.Array:
    """`bits(x)` back as x (`dtype` is x's dtype)."""
    return jax.lax.bitcast_convert_type(b, dtype) if b.dtype != dtype else b
