"""code_init: a DalleBart's image-token rows started from what each VQGAN code draws."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from dalle_mini_jax import code_init
from dalle_mini_jax.config import VQGAN_PRESETS, VQGANConfig, transformer_preset
from dalle_mini_jax.transformer import DalleBart
from dalle_mini_jax.vqgan import VQModel

TINY_VQ = VQGAN_PRESETS["tiny"]  # 16 px, a 4 x 4 grid of 4 px patches, 32 codes
# 32 px, a 4 x 4 grid of 8 px patches: the block-mean path of `image_rows`
PATCH8_VQ = VQGANConfig(channels=8, channel_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(),
                        z_channels=8, embed_dim=8, codebook_size=16, resolution=32, norm_groups=4)


def _pair(vq: VQGANConfig):
    model = DalleBart(transformer_preset("tiny").replace(image_vocab_size=vq.codebook_size,
                                                         image_len=vq.num_tokens), rngs=nnx.Rngs(0))
    return model, VQModel(vq, rngs=nnx.Rngs(1))


def _params(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_rows_replace_the_image_rows_and_nothing_else():
    model, vqgan = _pair(TINY_VQ)
    before = _params(model)
    rows = code_init.init_from_vqgan(model, vqgan, seed=3)
    after = _params(model)
    k, d = TINY_VQ.codebook_size, model.config.embed_dim
    assert rows.shape == (k, d)
    assert np.isclose(rows.std(), model.config.init_std)
    np.testing.assert_allclose(after["dec_embed"]["tokens"][:k], rows, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(after["lm_head"][:, :k], rows.T, rtol=1e-6, atol=1e-7)
    # BOS (row/column K) and every other weight keep their random init.
    np.testing.assert_array_equal(after["dec_embed"]["tokens"][k:], before["dec_embed"]["tokens"][k:])
    np.testing.assert_array_equal(after["lm_head"][:, k:], before["lm_head"][:, k:])
    flat_b, flat_a = nnx.traversals.flatten_mapping(before), nnx.traversals.flatten_mapping(after)
    changed = [key for key in flat_b if not np.array_equal(flat_b[key], flat_a[key])]
    assert sorted(changed) == [("dec_embed", "tokens"), ("lm_head",)]
    # Deterministic in the seed, and the seed matters (the projection).
    again = code_init.image_rows(vqgan, d, model.config.init_std, seed=3)
    np.testing.assert_allclose(again, rows, rtol=1e-6, atol=1e-7)
    assert not np.allclose(code_init.image_rows(vqgan, d, model.config.init_std, seed=4), rows)


def test_codes_that_draw_alike_start_alike():
    """Rows follow the drawings: two codes with one codebook vector get one row, a code
    nudged from another starts closer to it than to the rest (block-mean path, 8 px)."""
    model, vqgan = _pair(PATCH8_VQ)
    table = np.array(vqgan.quantize.embedding.embedding[...])
    table[1] = table[0]
    table[2] = table[0] + 0.001 * np.random.default_rng(0).normal(size=table.shape[1])
    vqgan.quantize.embedding.embedding[...] = table
    drawings = code_init.code_drawings(vqgan, batch=5)  # batches that do not divide K
    assert drawings.shape == (PATCH8_VQ.codebook_size, 8, 8, 3)
    np.testing.assert_allclose(drawings[1], drawings[0], atol=1e-6)
    rows = code_init.init_from_vqgan(model, vqgan)
    np.testing.assert_allclose(rows[1], rows[0], rtol=1e-5, atol=1e-8)
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    cos = unit @ unit[0]
    assert cos[2] > 0.9 and cos[2] > cos[3:].max()


def test_a_vocabulary_that_is_not_the_codebook_is_refused():
    model, _ = _pair(TINY_VQ)
    other = VQModel(TINY_VQ.replace(codebook_size=64), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="32 image codes, the VQGAN 64"):
        code_init.init_from_vqgan(model, other)
