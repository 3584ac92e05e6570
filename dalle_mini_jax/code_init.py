"""Start a DalleBart's image-token rows from what each VQGAN code draws.

A fresh model's decoder token table and LM head give every image code an unrelated random
row, so the model has to find out from scratch that, say, the 8 codes that draw a single
red object (4 shapes x 2 sizes) have something in common. Started instead from the codes'
drawings, codes that draw alike start alike, and "red" is one direction in the model's
space from step 0.

Measured on the bundled model's recipe (BUNDLED.md; training/configs/bundled_shapes.py,
its `init` step), over the cell VQGAN's 9 codes an image with the sixth model's captions
(`multi_position`): validation loss 0.62 after 1,000 steps of 64 against 1.09 from the
usual random rows, which sat on a plateau near 1.1-1.2 for 1,000 to more than 6,000
steps depending on batch size and learning rate, and reached 0.62 only at step 3,000.
On the 64 codes of single centred objects, the rows' cosine is 0.36 within a colour
against -0.06 across colours (from the VQGAN's codebook vectors themselves: 0.12 vs
-0.02; they mostly separate sizes): `python benchmarks/code_rows.py --vqgan
runs/vqgan_cells/model`.

The rows: each code k decoded alone on a g x g grid of k (g = min(3, the token grid), so a
code drawn among copies of itself, as decoders with 3x3 convolutions or attention expect),
the centre patch taken, reduced to 8 x 8 x 3 (mean over blocks when the patch side is a
multiple of 8, else resized), centred over the codes, mapped to the model width by a fixed
random Gaussian matrix and scaled to `init_std` per entry, the scale of the random init
they replace. The decoder token table gets rows [0, K) and the LM head columns [0, K);
BOS and everything else keep their random init.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

POOLED = 8  # a code's drawing is reduced to POOLED x POOLED x 3 numbers


def code_drawings(vqgan, batch: int = 256) -> np.ndarray:
    """What each code draws: float32 [K, p, p, 3] in [0, 1], p the VQGAN's patch side.

    Code k is decoded on a g x g grid filled with k (g = min(3, the token grid's side)) and
    the centre patch kept; `batch` codes are decoded at a time (the released VQGAN has
    16,384).
    """
    cfg = vqgan.config
    side = math.isqrt(cfg.num_tokens)
    g = min(3, side)
    out = []
    for start in range(0, cfg.codebook_size, batch):
        ids = jnp.arange(start, min(cfg.codebook_size, start + batch))
        images = np.asarray(vqgan.decode_code(jnp.repeat(ids[:, None], g * g, 1), grid=(g, g)), np.float32)
        p = images.shape[1] // g
        c = g // 2
        out.append(images[:, c * p:(c + 1) * p, c * p:(c + 1) * p])
    return np.concatenate(out)


def image_rows(vqgan, dim: int, std: float, seed: int = 0) -> np.ndarray:
    """The rows for codes 0..K-1: float [K, dim] with entries of standard deviation `std`."""
    drawings = code_drawings(vqgan)
    k, p = drawings.shape[:2]
    if p % POOLED == 0:
        b = p // POOLED
        feats = drawings.reshape(k, POOLED, b, POOLED, b, 3).mean((2, 4))
    else:  # a tiny VQGAN's few-pixel patch
        feats = np.asarray(jax.image.resize(drawings, (k, POOLED, POOLED, 3), "linear"))
    feats = feats.reshape(k, -1)
    feats = feats - feats.mean(0)
    rows = feats @ np.random.default_rng(seed).normal(size=(feats.shape[1], dim))
    scale = rows.std()
    if not scale > 0:
        raise ValueError("every code draws the same image: no rows to start from")
    return rows * (std / scale)


def init_from_vqgan(model, vqgan, seed: int = 0) -> np.ndarray:
    """Set `model`'s (a DalleBart) image-token rows from `vqgan`'s drawings, in place.

    Returns:
      the rows set, [K, embed_dim].

    Raises:
      ValueError: when the model's image vocabulary is not the VQGAN's codebook.
    """
    cfg = model.config
    k = vqgan.config.codebook_size
    if cfg.num_image_codes != k:  # a table padded past the codes (Mega's) is fine
        raise ValueError(f"the model has {cfg.num_image_codes} image codes, the VQGAN {k}: "
                         "set model.image_vocab_size to the VQGAN's codebook_size")
    rows = image_rows(vqgan, cfg.embed_dim, cfg.init_std, seed)
    model.dec_embed.tokens[...] = model.dec_embed.tokens[...].at[:k].set(rows)
    model.lm_head[...] = model.lm_head[...].at[:, :k].set(rows.T)
    return rows
