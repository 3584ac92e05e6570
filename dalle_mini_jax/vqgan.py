"""The taming-transformers VQGAN in Flax NNX: encoder, vector quantizer, decoder.

The module tree is named exactly like the released `dalle-mini/vqgan_imagenet_f16_16384`
checkpoint (the vqgan-jax layout), so the converter between our nnx state and the
released flat tree is the identity on names (`released_name`):

    encoder/conv_in                  encoder/down_{i}/block_{j}, attn_{j}, downsample/conv
    encoder/mid/{block_1,attn_1,block_2}   encoder/norm_out   encoder/conv_out
    quant_conv   quantize/embedding/embedding   post_quant_conv
    decoder/conv_in   decoder/mid/...   decoder/up_{i}/block_{j}, attn_{j}, upsample/conv
    decoder/norm_out   decoder/conv_out

Everything is NHWC; conv kernels are HWIO `(kh, kw, in, out)` like flax `nn.Conv`.

Pixel space. The dalle-mini pipeline feeds the encoder images in **[0, 1]** (its encode
notebook passes webdataset `decode("rgb")` floats straight in) and clips the decoder
output to [0, 1] (inference notebook: `clip(0, 1) * 255`), and min-dalle clips the same
way. Taming trained in [-1, 1], but the released dalle-mini codes were made from [0, 1]
inputs, so to reproduce the released images we do exactly what that pipeline does: no
`x * 2 - 1` on the way in, `clip(0, 1)` on the way out. A VQGAN trained with this code
learns the same [0, 1] convention.

Attention placement follows taming (and min-dalle): `attn_j` runs right after
`block_j`. Old vqgan-jax versions ran every `attn_*` after every block; that was fixed
upstream (patil-suraj/vqgan-jax#10) and the released weights were trained with the
taming order.

Token-local codes (`VQGANConfig.local`, ours, off for every released checkpoint). With
GroupNorm statistics over the whole image and attention in the mid block, every code
depends on everything drawn anywhere. On the shapes set that made the codes a hash of
the whole image: in the second bundled model's VQGAN, the 105k all-black 8x8 patches of
2,000 images took 782 different codes, the commonest only 0.4 % of them, so the
transformer had to learn a code in which "a red circle in the top left" and "... in the
bottom right" share nothing, patch by patch. In a local VQGAN the encoder's norms keep
only their per-channel affine map (no statistics), and the encoder is 1x1 below full
resolution with no mid attention: a code sees its own f x f patch, 3 pixels before it
and 10 after (f8; the stride-2 convolutions overlap), so equal neighbourhoods give equal
codes. The decoder is the usual one, GroupNorm statistics, 3x3 convolutions and mid
attention included: a code's meaning may use context, but it cannot carry it.

Patch codes (`VQGANConfig.patch_codes`, ours): a local encoder still reaches past its
patch, by 2(f - 1) + 3 pixels to the right and below (the taming stride-2 convolutions
overlap): at f32 that is a whole neighbouring patch, so the code of one shapes cell would
also hash the next cell's object. With patch codes every encoder convolution is 1x1 and
the downsampling convolutions are 2x2 with stride 2, so a code is a function of its own
patch alone. The cell VQGAN (training/configs/vqgan_shapes.py:cells) uses it with 96x96
images and f32: one code per cell of the shapes grid.

Dropout is not implemented: the released config has dropout 0 and our config has no
dropout field.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_mini_jax.checkpoint import (
    CONFIG_NAME,
    MSGPACK_NAME,
    check_tree,
    model_dir,
    read_msgpack,
    write_msgpack,
)
from dalle_mini_jax.config import VQGANConfig
from dalle_mini_jax.float_bits import bits as _bits
from dalle_mini_jax.float_bits import unbits as _unbits
from dalle_mini_jax.sharding import constrain, param

DEFAULT_BETA = 0.25  # taming's commitment cost


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


class Conv(nnx.Module):
    """2-D convolution, NHWC input, HWIO kernel, with bias (flax `nn.Conv` params).

    Args:
      in_channels, out_channels: channel widths.
      kernel_size: square kernel side (1 or 3; 2 for a patch-code downsampling).
      stride: 1, or 2 for the encoder's downsampling conv.
      padding: ((top, bottom), (left, right)); None = "same" for stride 1.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: tuple[tuple[int, int], tuple[int, int]] | None = None,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ):
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        # LeCun normal (fan_in = kh*kw*in), flax's default for Conv: keeps the activation
        # scale through the ~40 convs of the f16 decoder.
        kernel = nnx.initializers.lecun_normal()(rngs.params(), shape, param_dtype)
        self.kernel = param(kernel, (None, None, "conv_in", "conv_out"))
        self.bias = param(jnp.zeros((out_channels,), param_dtype), ("conv_out",))
        self.stride = stride
        half = kernel_size // 2
        self.padding = ((half, half), (half, half)) if padding is None else padding
        self.dtype = dtype

    def __call__(self, x: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]] | None = None
                 ) -> jax.Array:
        """x: [B, H, W, in] -> [B, H', W', out] in the compute dtype.

        `padding` overrides the layer's own (`conv_rows` pads a strip's columns only).
        """
        x = x.astype(self.dtype)
        kernel = self.kernel[...]
        if kernel.dtype.itemsize == 2:
            kernel = _after(kernel, x)
        kernel = kernel.astype(self.dtype)
        if kernel.shape[:2] == (1, 1) and self.stride == 1:
            # A 1x1 conv is a matmul over channels; XLA:CPU runs a dot faster than a conv.
            y = jnp.einsum("bhwi,io->bhwo", x, kernel[0, 0])
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(self.stride, self.stride),
                padding=self.padding if padding is None else padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
        return y + self.bias[...].astype(self.dtype)


def _after(w: jax.Array, x: jax.Array) -> jax.Array:
    """`w` unchanged, but computed from `x`, so XLA cannot widen it before `x` exists.

    Why: XLA:CPU runs a 16-bit convolution in float32, and schedules the widening of
    every weight at the start of the program, where all the float32 copies are alive at
    once: the f16 VQGAN decoder in bfloat16 had 170 MiB of temporaries against 96 MiB in
    float32, the peak of generating (`benchmarks/load_memory.py DIR --dtype bfloat16
    --compiled`; `jax.lax.optimization_barrier` is removed before scheduling, so it does
    not help). A select on `x`'s first element (true unless it is NaN, when the output is
    NaN anyway) ties each weight's widening to its layer: 96 MiB in bfloat16 too.
    """
    x0 = x[(0,) * x.ndim]
    return jnp.where(x0 == x0, w, jnp.zeros_like(w))


class GroupNorm(nnx.Module):
    """GroupNorm over (H, W, C/G) per group, with `scale` and `bias` per channel.

    Statistics are computed in float32 whatever the compute dtype: bf16 means and
    variances over 65k positions lose too many bits.

    `statistics=False` (`VQGANConfig.local`) keeps only the per-channel affine map: image
    statistics would let what is drawn elsewhere shift every position, and per-position
    statistics (a channels-last LayerNorm) blow up on the shapes set, where the features
    of black pixels start as exact zeros (variance 0: the gradient is eps^-1/2 per layer,
    and the first short run's gradient norm was inf from its first steps).
    """

    def __init__(
        self,
        channels: int,
        *,
        groups: int,
        eps: float,
        statistics: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ):
        self.scale = param(jnp.ones((channels,), param_dtype), ("norm",))
        self.bias = param(jnp.zeros((channels,), param_dtype), ("norm",))
        self.groups = groups
        self.statistics = statistics
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array, rows: int | None = None) -> jax.Array:
        """x: [B, H, W, C] -> [B, H, W, C] in the compute dtype (`rows`: see
        `statistics_of`)."""
        return self.apply(x, self.statistics_of(x, rows))

    def statistics_of(self, x: jax.Array, rows: int | None = None
                      ) -> tuple[jax.Array, jax.Array] | None:
        """(mean, 1/std) of each image's groups, float32 [B, 1, 1, G, 1]; None without statistics.

        `rows` (where it splits H in two or more): the mean and the squared deviations
        are summed `rows` rows at a time, on maps that are not computed by strips
        (`by_rows`) too.
        Why: XLA:CPU does not fuse an elementwise producer into a reduction, so the
        whole-map form holds (x - mean)^2 as one more full map (`conv_rows`), and for a
        16-bit map its float32 widening as well. DALL-E Mini's VQGAN in bf16 by strips
        with `xla_cpu.compiler_options()`: 48.2 MiB of temporaries, 52.2 with the
        statistics of the maps not cut in strips taken whole (`benchmarks/vqgan_decode.py
        DIR --dtype bfloat16`, both versions); a whole-map mean of a striped bf16 map
        widens it whole (`test_bfloat16_decoder_by_rows_holds_its_maps_in_bfloat16`).
        """
        if not self.statistics:
            return None
        b, h, w, c = x.shape
        grouped = lambda t: t.astype(jnp.float32).reshape(b, -1, w, self.groups, c // self.groups)
        count = h * w * (c // self.groups)

        def mean_of(f):
            """The mean over each group of f(x's rows, float32 [B, rows, W, G, C/G])."""
            if rows is None or h % rows or h < 2 * rows:
                return f(grouped(x)).sum(axis=(1, 2, 4), keepdims=True) / count

            def add_rows(i, total):
                part = grouped(slice_rows(x, i * rows, rows))
                return total + f(part).sum(axis=(1, 2, 4), keepdims=True)

            zeros = jnp.zeros((b, 1, 1, self.groups, 1), jnp.float32)
            return jax.lax.fori_loop(0, h // rows, add_rows, zeros) / count

        mean = mean_of(lambda t: t)
        # Two-pass variance (like torch), not E[x^2] - E[x]^2, which cancels badly.
        var = mean_of(lambda t: jnp.square(t - mean))
        return mean, jax.lax.rsqrt(var + self.eps)

    def apply(self, x: jax.Array, stats: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        """Normalize x: [B, H', W, C] with `stats` (`statistics_of` the whole map, of
        which x may be some rows), then the affine map; in the compute dtype."""
        y = x.astype(jnp.float32)
        if stats is not None:
            mean, rstd = stats
            b, h, w, c = y.shape
            y = ((y.reshape(b, h, w, self.groups, c // self.groups) - mean) * rstd).reshape(b, h, w, c)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def make_norm(channels: int, config: VQGANConfig, *, statistics: bool = True,
              dtype=jnp.float32, param_dtype=jnp.float32) -> GroupNorm:
    """The model's norm layer: GroupNorm, or only its affine map (a local encoder's)."""
    return GroupNorm(channels, groups=config.norm_groups, eps=config.norm_eps,
                     statistics=statistics, dtype=dtype, param_dtype=param_dtype)


def _rows_of_bits(bits: jax.Array, start: jax.Array | int, count: int, dtype) -> jax.Array:
    """bits[:, start:start + count] (`_bits` of a map) as `dtype`."""
    return _unbits(jax.lax.dynamic_slice_in_dim(bits, start, count, axis=1), dtype)


def slice_rows(x: jax.Array, start: jax.Array | int, count: int) -> jax.Array:
    """x[:, start:start + count] (a dynamic slice of rows) in x's dtype.

    Why through the bits: XLA:CPU has no 16-bit dynamic slice, and its float
    normalization widens the operand instead: the whole bf16 map becomes a float32
    copy, hoisted out of the strip loops, and an updated one was copied whole at every
    strip. A slice of the uint16 bits is a plain copy of the strip: DALL-E Mini's VQGAN
    in bf16 by strips, 79.7 -> 51.7 MiB of temporaries with XLA's defaults
    (`benchmarks/vqgan_decode.py DIR --dtype bfloat16`, before and after).
    """
    return _rows_of_bits(_bits(x), start, count, x.dtype)


def by_rows(height: int, rows: int | None) -> bool:
    """Whether a map `height` rows tall is computed by strips of `rows` (`conv_rows`):
    when it makes 8 strips or more and `rows` divides it.

    Why only the tallest maps: they are the peak of memory (the next level down holds a
    quarter of it), and each strip costs a copy of its output into the map: with strips
    of 32 rows on the 256-row maps only, DALL-E Mini's VQGAN decode is ~6 % slower than
    whole maps (`benchmarks/vqgan_decode.py DIR`); striping the 128- and 64-row maps as
    well was slower still, for the same temporaries (a scratch A/B, not kept).
    """
    return rows is not None and height >= 8 * rows and height % rows == 0


def conv_rows(conv: Conv, x: jax.Array, pre: Callable[[jax.Array], jax.Array], rows: int, *,
              up: int = 1, add: jax.Array | None = None,
              add_fn: Callable[[jax.Array], jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
    """`conv(pre(upsample(x)))` [+ `add_fn(add)`], computed `rows` output rows at a time.

    Args:
      conv: a stride-1 "same" convolution (3x3 in the decoder).
      x: [B, h, w, C] the input, before `pre` and the nearest x`up` upsampling.
      pre: a per-position map applied to rows of x (a GroupNorm with the whole map's
        statistics, then swish), or the identity.
      rows: output rows per strip; must divide h * up (`by_rows`).
      add: [B, h*up, w*up, out] added to the output (a ResnetBlock's residual), through
        `add_fn` (its 1x1 shortcut) if given.

    Returns (y, x): y [B, h*up, w*up, out], equal to the whole-map computation up to
    rounding, and x unchanged, passed through the loop: use it rather than the x given
    (as ResnetBlock adds into it next), so that XLA need not keep a copy.

    Why: decoding a 256x256 image is generation's peak of memory, and there the whole-map
    form holds three full-resolution maps at once (a block's input, `pre`'s output that
    feeds the convolution, and the convolution's output: 3 x 32 MiB in f16 DALL-E Mini's
    VQGAN). By strips, `pre`'s output and the upsampled input exist one strip at a time,
    and a residual is added into its own input's buffer, strip by strip (nothing later
    reads those rows of it): two full maps, not three (`benchmarks/vqgan_decode.py`).
    """
    b, h, w, c = x.shape
    H, W = h * up, w * up
    halo = conv.kernel.shape[0] // 2
    n = H // rows
    if n * rows != H or rows % up or n < 2 or rows < halo:
        raise ValueError(f"{rows} rows per strip do not split {H} rows (x{up}) in two or more strips")

    def strip(xb, first, count, pad):
        """The conv's rows from `first` (output resolution; static, or traced in the
        loop), reading `count` rows of x (as its bits `xb`) and `pad` = (top, bottom)
        rows of zero padding."""
        # Output row r reads input row r // up. `first` is 0 or -halo modulo up, so its
        # offset in its input row is static.
        offset = 0 if isinstance(first, int) and first == 0 else (-halo) % up
        lo = (first - offset) // up
        t = pre(_rows_of_bits(xb, lo, (offset + count - 1) // up + 1, x.dtype))
        if up > 1:
            n_in = t.shape[1]
            t = jnp.broadcast_to(t[:, :, None, :, None, :], (b, n_in, up, w, up, c))
            t = t.reshape(b, n_in * up, W, c)[:, offset:offset + count]
        return conv(t, padding=(pad, (halo, halo)))

    in_place = add is not None and add_fn is None and add.dtype == jnp.result_type(conv.dtype)
    # The maps are held as their bits (`slice_rows`) through the loop: a 16-bit
    # dynamic-update-slice would be widened too, and one converted back and forth
    # inside the loop is copied whole at every strip.
    xb = _bits(x)

    def put(out, i, y):
        """Write strip i (plus its residual) into `out` (bits of `dtype`)."""
        if add is not None:
            # In place, the residual rows are read from the buffer being written: those
            # rows are not overwritten yet, and reading `add` itself would make XLA copy it.
            base = (_rows_of_bits(out, i * rows, rows, dtype) if in_place
                    else slice_rows(add, i * rows, rows))
            y = (base if add_fn is None else add_fn(base)).astype(y.dtype) + y
        return jax.lax.dynamic_update_slice_in_dim(out, _bits(y.astype(dtype)), i * rows, axis=1)

    # The first and last strips (with the map's zero padding) outside the loop; the
    # output buffer starts as the first, padded, not as zeros, which XLA shares between
    # loops and copies into each.
    y0 = strip(xb, 0, rows + halo, (halo, 0))
    dtype = add.dtype if in_place else y0.dtype
    if in_place:
        out = put(_bits(add), 0, y0)
    else:
        out = put(jnp.pad(_bits(y0), ((0, 0), (0, H - rows), (0, 0), (0, 0))), 0, y0)

    def body(i, carry):
        out, xb = carry
        return put(out, i, strip(xb, i * rows - halo, rows + 2 * halo, (0, 0))), xb

    # One strip at a time (a loop, not unrolled: XLA would schedule all strips' inputs
    # first). x passes through the loop, so a caller that adds into it afterwards uses
    # the loop's output and XLA need not copy it.
    out, xb = jax.lax.fori_loop(1, n - 1, body, (out, xb))
    out = put(out, n - 1, strip(xb, H - rows - halo, rows + halo, (0, halo)))
    return _unbits(out, dtype), _unbits(xb, x.dtype)


class ResnetBlock(nnx.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> conv2, plus a (1x1) shortcut.

    `nin_shortcut` exists only when the width changes, as in the released tree. In a
    local encoder (`VQGANConfig.local`) the blocks below full resolution are 1x1
    (`kernel=1`) and every norm takes no statistics (`statistics=False`).
    """

    def __init__(self, in_channels: int, out_channels: int, config: VQGANConfig, *,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, kernel: int = 3,
                 statistics: bool = True):
        conv_kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        norm_kw = dict(statistics=statistics, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = make_norm(in_channels, config, **norm_kw)
        self.conv1 = Conv(in_channels, out_channels, kernel, **conv_kw)
        self.norm2 = make_norm(out_channels, config, **norm_kw)
        self.conv2 = Conv(out_channels, out_channels, kernel, **conv_kw)
        if in_channels != out_channels:
            self.nin_shortcut = Conv(in_channels, out_channels, 1, **conv_kw)
        else:
            self.nin_shortcut = None

    def __call__(self, x: jax.Array, rows: int | None = None) -> jax.Array:
        """x: [B, H, W, in] -> [B, H, W, out]; by strips of `rows` rows (`conv_rows`) where
        `by_rows(H, rows)`."""
        if by_rows(x.shape[1], rows) and self.conv1.kernel.shape[0] > 1:
            s1 = self.norm1.statistics_of(x, rows)
            h, x = conv_rows(self.conv1, x, lambda t: jax.nn.silu(self.norm1.apply(t, s1)), rows)
            s2 = self.norm2.statistics_of(h, rows)
            return conv_rows(self.conv2, h, lambda t: jax.nn.silu(self.norm2.apply(t, s2)), rows,
                             add=x, add_fn=self.nin_shortcut)[0]
        h = self.conv1(jax.nn.silu(self.norm1(x, rows)))
        h = self.conv2(jax.nn.silu(self.norm2(h, rows)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x.astype(h.dtype) + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over the H*W positions, scale C^-1/2, residual."""

    def __init__(self, channels: int, config: VQGANConfig, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        conv_kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = make_norm(channels, config, dtype=dtype, param_dtype=param_dtype)
        self.q = Conv(channels, channels, 1, **conv_kw)
        self.k = Conv(channels, channels, 1, **conv_kw)
        self.v = Conv(channels, channels, 1, **conv_kw)
        self.proj_out = Conv(channels, channels, 1, **conv_kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        b, hgt, wid, c = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, hgt * wid, c)
        k = self.k(h).reshape(b, hgt * wid, c)
        v = self.v(h).reshape(b, hgt * wid, c)
        # Logits and softmax in float32 so bf16 compute does not saturate the softmax.
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (c ** -0.5), axis=-1).astype(v.dtype)
        h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, hgt, wid, c)
        return x.astype(h.dtype) + self.proj_out(h)


class Downsample(nnx.Module):
    """3x3 conv with stride 2 on the input padded by one row/column at the bottom/right.

    Taming pads (0, 1, 0, 1) instead of symmetrically; the asymmetric padding is folded
    into the conv's padding argument. With `patch=True` (`VQGANConfig.patch_codes`) it is
    a 2x2 conv with stride 2 and no padding: each output sees its own 2x2 inputs only.
    """

    def __init__(self, channels: int, *, patch: bool = False, **kw):
        if patch:
            self.conv = Conv(channels, channels, 2, stride=2, padding=((0, 0), (0, 0)), **kw)
        else:
            self.conv = Conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H/2, W/2, C]."""
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv.

    With `patch=True` (`VQGANConfig.patch_codes`): a 1x1 conv to 4C channels, then each
    position's 4 groups of C become its 2x2 children (depth to space). Nearest upsampling
    gives the four children the same features, and only the 3x3 conv's view of the
    neighbours tells them apart; here each child has its own linear map, so from an f32
    code the decoder need not place a 32x32 cell's pixels through its neighbours. Measured,
    it did not learn faster early on (cell VQGAN runs, in-run judge on jittered images:
    7.8 % at step 2,000 with nearest, 7.4 % at 1,500 with this; what fixed those runs was
    centred training images, training/configs/vqgan_shapes.py:cells); kept for that reason
    of principle, untested against nearest at full length.
    """

    def __init__(self, channels: int, *, patch: bool = False, **kw):
        self.patch = patch
        self.conv = Conv(channels, 4 * channels if patch else channels, 1 if patch else 3, **kw)

    def __call__(self, x: jax.Array, rows: int | None = None) -> jax.Array:
        """x: [B, H, W, C] -> [B, 2H, 2W, C]; the conv by strips of `rows` rows
        (`conv_rows`) where `by_rows(2H, rows)`."""
        b, h, w, c = x.shape
        if by_rows(2 * h, rows) and not self.patch:
            return conv_rows(self.conv, x, lambda t: t, rows, up=2)[0]
        if self.patch:
            y = self.conv(x).reshape(b, h, w, 2, 2, c)  # [.., dy, dx, C]
            return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c)
        # Broadcast + reshape is the exact nearest x2 (out[i] = in[i // 2]), one copy.
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return self.conv(x.reshape(b, 2 * h, 2 * w, c))


class _Level(nnx.Module):
    """One resolution level: `block_j` ResnetBlocks, each followed by `attn_j` if any.

    Children are attributes named `block_0`, `attn_0`, ... so that the state paths are
    the released names.
    """

    def _build_blocks(self, in_ch, out_ch, count, with_attn, config, kw, kernel=3,
                      statistics=True):
        self.num_blocks = count
        self.has_attn = with_attn
        for j in range(count):
            setattr(self, f"block_{j}", ResnetBlock(in_ch if j == 0 else out_ch, out_ch,
                                                    config, kernel=kernel,
                                                    statistics=statistics, **kw))
            if with_attn:
                setattr(self, f"attn_{j}", AttnBlock(out_ch, config, **kw))

    def _run_blocks(self, x: jax.Array, rows: int | None = None) -> jax.Array:
        for j in range(self.num_blocks):
            x = getattr(self, f"block_{j}")(x, rows)
            if self.has_attn:
                x = getattr(self, f"attn_{j}")(x)
        return x


class DownBlock(_Level):
    """Encoder level i: num_res_blocks blocks (+attn), then a stride-2 conv unless last."""

    def __init__(self, config: VQGANConfig, level: int, **kw):
        in_ch = config.channels * ((1,) + config.channel_mult)[level]
        out_ch = config.channels * config.channel_mult[level]
        res = config.resolution // 2**level
        last = level == len(config.channel_mult) - 1
        self._build_blocks(in_ch, out_ch, config.num_res_blocks,
                           res in config.attn_resolutions, config, kw,
                           kernel=1 if config.patch_codes or (config.local and level > 0) else 3,
                           statistics=not config.local)
        self.downsample = None if last else Downsample(out_ch, patch=config.patch_codes, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, in] -> [B, H/2, W/2, out] (H, W kept at the last level)."""
        x = self._run_blocks(x)
        return x if self.downsample is None else self.downsample(x)


class UpBlock(_Level):
    """Decoder level i: num_res_blocks + 1 blocks (+attn), then upsample unless level 0."""

    def __init__(self, config: VQGANConfig, level: int, **kw):
        mult = config.channel_mult
        in_ch = config.channels * (mult[level + 1] if level + 1 < len(mult) else mult[-1])
        out_ch = config.channels * mult[level]
        res = config.resolution // 2**level
        self._build_blocks(in_ch, out_ch, config.num_res_blocks + 1,
                           res in config.attn_resolutions, config, kw)
        self.upsample = Upsample(out_ch, patch=config.patch_codes, **kw) if level != 0 else None

    def __call__(self, x: jax.Array, rows: int | None = None) -> jax.Array:
        """x: [B, H, W, in] -> [B, 2H, 2W, out] (H, W kept at level 0); `rows`: see Decoder."""
        x = self._run_blocks(x, rows)
        return x if self.upsample is None else self.upsample(x, rows)


class MidBlock(nnx.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution.

    `local=True` (a local encoder's): 1x1 blocks, norms without statistics and no
    attention, so nothing mixes positions.
    """

    def __init__(self, channels: int, config: VQGANConfig, *, local: bool = False, **kw):
        block_kw = dict(kernel=1 if local else 3, statistics=not local, **kw)
        self.block_1 = ResnetBlock(channels, channels, config, **block_kw)
        self.attn_1 = None if local else AttnBlock(channels, config, **kw)
        self.block_2 = ResnetBlock(channels, channels, config, **block_kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.block_1(x)
        return self.block_2(x if self.attn_1 is None else self.attn_1(x))


# --------------------------------------------------------------------------------------
# Encoder, quantizer, decoder
# --------------------------------------------------------------------------------------


class Encoder(nnx.Module):
    """Images -> latents: [B, H, W, in_channels] -> [B, H/f, W/f, z_channels].

    Args:
      config: the VQGAN shape.
      rngs: parameter initialisation.
      dtype: compute dtype; param_dtype: storage dtype of the weights.
    """

    def __init__(self, config: VQGANConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_levels = len(config.channel_mult)
        self.conv_in = Conv(config.in_channels, config.channels,
                            1 if config.patch_codes else 3, **kw)
        for i in range(self.num_levels):
            setattr(self, f"down_{i}", DownBlock(config, i, **kw))
        top = config.channels * config.channel_mult[-1]
        self.mid = MidBlock(top, config, local=config.local, **kw)
        self.norm_out = make_norm(top, config, statistics=not config.local, dtype=dtype,
                                  param_dtype=param_dtype)
        self.conv_out = Conv(top, config.z_channels, 1 if config.local else 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for i in range(self.num_levels):
            h = getattr(self, f"down_{i}")(h)
        h = self.mid(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    """Latents -> images: [B, h, w, z_channels] -> [B, h*f, w*f, out_channels].

    The levels run from `up_{n-1}` (lowest resolution) down to `up_0`. The output is the
    raw last conv, neither clipped nor rescaled.
    """

    def __init__(self, config: VQGANConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_levels = len(config.channel_mult)
        top = config.channels * config.channel_mult[-1]
        bottom = config.channels * config.channel_mult[0]
        self.conv_in = Conv(config.z_channels, top, 3, **kw)
        self.mid = MidBlock(top, config, **kw)
        for i in range(self.num_levels):
            setattr(self, f"up_{i}", UpBlock(config, i, **kw))
        self.norm_out = make_norm(bottom, config, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = Conv(bottom, config.out_channels, 3, **kw)

    def __call__(self, z: jax.Array, rows: int | None = None) -> jax.Array:
        """z: [B, h, w, z_channels] -> [B, H, W, out_channels].

        `rows` (inference): the 3x3 convolutions of maps taller than that (and a
        multiple of it, `by_rows`) run `rows` output rows at a time (`conv_rows`), so
        each holds two full maps rather than three; the same numbers up to rounding.
        None: whole maps (training).
        """
        h = self.mid(self.conv_in(z))
        for i in reversed(range(self.num_levels)):
            h = getattr(self, f"up_{i}")(h, rows)
        if by_rows(h.shape[1], rows):
            stats = self.norm_out.statistics_of(h, rows)
            return conv_rows(self.conv_out, h, lambda t: jax.nn.silu(self.norm_out.apply(t, stats)), rows)[0]
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Embedding(nnx.Module):
    """The codebook table, [codebook_size, embed_dim], at `quantize/embedding/embedding`."""

    def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        # Taming's init: uniform(-1/K, 1/K).
        table = jax.random.uniform(rngs.params(), (num, dim), param_dtype, -1.0 / num, 1.0 / num)
        self.embedding = param(table, ("codebook", None))


class VectorQuantizer(nnx.Module):
    """Nearest-code quantization with a straight-through gradient.

    Args:
      codebook_size: K codes.
      embed_dim: D, the code width.
    """

    def __init__(self, codebook_size: int, embed_dim: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.embedding = Embedding(codebook_size, embed_dim, rngs=rngs, param_dtype=param_dtype)
        self.dtype = dtype

    @property
    def codebook(self) -> jax.Array:
        """[K, D] code vectors."""
        return self.embedding.embedding[...]

    def nearest(self, z: jax.Array) -> jax.Array:
        """Index of the nearest code to each vector: [..., D] -> [...] int32.

        argmin_k ||z||^2 + ||e_k||^2 - 2 z.e_k, in float32 whatever the compute dtype,
        so a bf16 model picks the same codes as an fp32 one wherever they are not ties.
        """
        e = self.codebook.astype(jnp.float32)
        zf = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
        dist = (
            jnp.sum(zf**2, axis=1, keepdims=True)
            + jnp.sum(e**2, axis=1)[None, :]
            - 2.0 * zf @ e.T
        )
        return jnp.argmin(dist, axis=1).astype(jnp.int32).reshape(z.shape[:-1])

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Code vectors of `indices`: [...] int -> [..., D] in the compute dtype."""
        return jnp.take(self.codebook, indices, axis=0).astype(self.dtype)

    def __call__(
        self, z: jax.Array, *, beta: float = DEFAULT_BETA
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Quantize z: [B, h, w, D].

        Returns:
          z_q: [B, h, w, D] the nearest codes, with the straight-through gradient
            (d z_q / d z = identity).
          indices: [B, h, w] int32.
          aux: float32 scalars `codebook_loss` = mean((sg(z) - e)^2) (moves the codes),
            `commitment_loss` = beta * mean((z - sg(e))^2) (moves the encoder),
            `quant_loss` = their sum, and `perplexity` = exp(entropy of code usage).
        """
        indices = self.nearest(z)
        e = self.lookup(indices).astype(jnp.float32)
        zf = z.astype(jnp.float32)
        codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(zf) - e))
        commitment_loss = beta * jnp.mean(jnp.square(zf - jax.lax.stop_gradient(e)))
        z_q = zf + jax.lax.stop_gradient(e - zf)
        counts = jnp.bincount(indices.reshape(-1), length=self.codebook.shape[0])
        probs = counts / indices.size
        perplexity = jnp.exp(-jnp.sum(probs * jnp.log(jnp.where(probs > 0, probs, 1.0))))
        aux = {
            "codebook_loss": codebook_loss,
            "commitment_loss": commitment_loss,
            "quant_loss": codebook_loss + commitment_loss,
            "perplexity": perplexity,
        }
        return z_q.astype(self.dtype), indices, aux


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class VQModel(nnx.Module):
    """VQGAN: encoder -> quant_conv -> quantize -> post_quant_conv -> decoder.

    Pixels are in [0, 1] on both sides (see the module docstring). Codes are
    [B, S] int32 in row-major order over the h x w token grid (S = h * w).

    Args:
      config: the VQGAN shape (`VQGAN_PRESETS`).
      rngs: parameter initialisation.
      dtype: compute dtype (activations); GroupNorm statistics, attention softmax,
        code search and losses stay float32.
      param_dtype: storage dtype of the weights.

    Methods are traceable; jit them from outside, e.g.
    `nnx.jit(lambda m, c: m.decode_code(c))(model, codes)`.
    """

    def __init__(self, config: VQGANConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.config = config
        self.dtype = dtype
        self.encoder = Encoder(config, **kw)
        self.quant_conv = Conv(config.z_channels, config.embed_dim, 1, **kw)
        self.quantize = VectorQuantizer(config.codebook_size, config.embed_dim, **kw)
        self.post_quant_conv = Conv(config.embed_dim, config.z_channels, 1, **kw)
        self.decoder = Decoder(config, **kw)

    # ---- encode ---------------------------------------------------------------------
    def encode_latents(self, images: jax.Array) -> jax.Array:
        """Pre-quantization latents: [B, H, W, 3] in [0, 1] -> [B, H/f, W/f, embed_dim]."""
        images = constrain(images, ("act_batch", None, None, None))
        return self.quant_conv(self.encoder(images))

    def encode(self, images: jax.Array) -> jax.Array:
        """Images to codes: [B, H, W, 3] float in [0, 1] -> [B, S] int32, row-major."""
        indices = self.quantize.nearest(self.encode_latents(images))
        return indices.reshape(indices.shape[0], -1)

    # ---- decode ---------------------------------------------------------------------
    def decode(self, z_q: jax.Array) -> jax.Array:
        """Quantized latents to raw pixels: [B, h, w, embed_dim] -> [B, H, W, 3] float32.

        The output is not clipped (training needs its gradient everywhere).
        """
        z_q = constrain(z_q, ("act_batch", None, None, None))
        return self.decoder(self.post_quant_conv(z_q)).astype(jnp.float32)

    def decode_code(self, codes: jax.Array, grid: tuple[int, int] | None = None) -> jax.Array:
        """Codes to images: [B, S] int -> [B, h*f, w*f, 3] float32 clipped to [0, 1].

        Args:
          codes: [B, S] code ids in [0, codebook_size), row-major over the token grid.
            An id out of range gives NaN pixels (jnp.take's fill mode) rather than a
            silently clamped code.
          grid: (h, w) of the token grid; default square, h = w = sqrt(S).
        """
        b, s = codes.shape
        if grid is None:
            side = math.isqrt(s)
            if side * side != s:
                raise ValueError(f"{s} codes per image do not form a square grid; pass grid=(h, w)")
            grid = (side, side)
        if grid[0] * grid[1] != s:
            raise ValueError(f"grid {grid} does not hold {s} codes")
        z_q = self.quantize.lookup(codes.reshape(b, *grid))
        return jnp.clip(self.decode(z_q), 0.0, 1.0)

    # ---- training -------------------------------------------------------------------
    def __call__(
        self, images: jax.Array, *, beta: float = DEFAULT_BETA
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Encode, quantize (straight-through) and decode, for training.

        Args:
          images: [B, H, W, 3] float in [0, 1].
          beta: commitment cost.

        Returns:
          recon: [B, H, W, 3] float32, raw decoder output (not clipped, so the loss
            has a gradient outside [0, 1]).
          aux: `codebook_loss`, `commitment_loss`, `quant_loss`, `perplexity` (float32
            scalars, see `VectorQuantizer`) and `indices` [B, S] int32.
        """
        z_q, indices, aux = self.quantize(self.encode_latents(images), beta=beta)
        aux = dict(aux, indices=indices.reshape(indices.shape[0], -1))
        return self.decode(z_q), aux

    reconstruct = __call__

    # ---- model directory ------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype=jnp.float32,
                        param_dtype=None) -> "VQModel":
        """Load a released-format directory (`config.json` + `flax_model.msgpack`).

        Args:
          path: the model directory.
          dtype: compute dtype.
          param_dtype: dtype the weights are loaded in (each tensor is cast as it is
            read, so bf16 loading never holds an fp32 copy); default `dtype`.

        Raises:
          CheckpointError: a tensor is missing, unexpected or misshapen (each named with
            its path and shapes), or the file is damaged.
        """
        path = model_dir(path, "VQGAN")
        config = VQGANConfig.load(path / CONFIG_NAME)
        param_dtype = dtype if param_dtype is None else param_dtype
        flat = read_msgpack(path / MSGPACK_NAME, dtype=np.dtype(param_dtype))
        return cls.from_released_params(config, flat, source=str(path / MSGPACK_NAME),
                                        dtype=dtype, param_dtype=param_dtype)

    @classmethod
    def from_released_params(cls, config: VQGANConfig, flat: Mapping[str, Any], *,
                             source: str = "VQGAN params", dtype=jnp.float32,
                             param_dtype=jnp.float32) -> "VQModel":
        """Build a model from a flat released tree `{"encoder/conv_in/kernel": array}`.

        The model is built abstractly (no initialisation runs), checked against `flat`
        with `check_tree`, then filled with the given arrays cast to `param_dtype`.
        """
        abstract = nnx.eval_shape(
            lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
        graphdef, state = nnx.split(abstract)
        flat_state = nnx.to_flat_state(state)
        check_tree(flat, {released_name(p): v.shape for p, v in flat_state}, source)
        filled = [
            (p, v.replace(jnp.asarray(flat[released_name(p)], dtype=param_dtype)))
            for p, v in flat_state
        ]
        return nnx.merge(graphdef, nnx.from_flat_state(filled))

    def released_params(self) -> dict[str, np.ndarray]:
        """The flat released tree of this model's weights, as host numpy arrays."""
        return {
            released_name(p): np.asarray(jax.device_get(v[...]))
            for p, v in nnx.to_flat_state(nnx.state(self, nnx.Param))
        }

    def save_pretrained(self, path: str | Path) -> None:
        """Write `config.json` + `flax_model.msgpack` in the released format.

        Weights are written in their storage dtype, so save -> load is bit-exact.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_msgpack(path / MSGPACK_NAME, self.released_params())
        self.config.save(path / CONFIG_NAME)


def released_name(path: tuple[Any, ...]) -> str:
    """Our nnx state path -> the released flat key.

    Our attribute names are the released names (`down_0/block_1/norm1/scale`,
    `quantize/embedding/embedding`, ...), so the mapping is the join. It is the one place
    to change if a module is ever renamed.
    """
    return "/".join(str(k) for k in path)


def released_param_shapes(config: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Flat released tree of shapes for `config`, without allocating any weights."""
    abstract = nnx.eval_shape(lambda: VQModel(config, rngs=nnx.Rngs(0)))
    return {
        released_name(p): tuple(v.shape)
        for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    }


__all__ = [
    "DEFAULT_BETA", "Conv", "GroupNorm", "ResnetBlock", "AttnBlock", "Downsample", "Upsample",
    "DownBlock", "UpBlock", "MidBlock", "by_rows", "conv_rows", "Encoder", "Decoder", "Embedding", "VectorQuantizer",
    "VQModel", "released_name", "released_param_shapes",
]
