"""VQGAN: part shapes, quantizer maths, released-format I/O, the f16 tree, a few train steps.

Model calls are wrapped in `nnx.jit`: eager op-by-op calls compile every op separately
and are slower than one compile on these small presets.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

from dalle_mini_jax.checkpoint import MSGPACK_NAME, CheckpointError, read_msgpack, write_msgpack
from dalle_mini_jax.config import VQGAN_PRESETS, VQGANConfig
from dalle_mini_jax.vqgan import (
    Decoder,
    Downsample,
    Encoder,
    VectorQuantizer,
    VQModel,
    released_param_shapes,
)

TINY = VQGAN_PRESETS["tiny"]


def _images(config: VQGANConfig, batch: int, seed: int = 0) -> jax.Array:
    """Blocky random images in [0, 1]: [B, R, R, 3] (4x4 random colours, upsampled).

    Made in numpy: random ops run eagerly in JAX compile once per shape.
    """
    r = config.resolution
    low = np.random.default_rng(seed).uniform(size=(batch, 4, 4, 3)).astype(np.float32)
    return jnp.asarray(low.repeat(r // 4, axis=1).repeat(r // 4, axis=2))


@pytest.fixture(scope="module")
def tiny_model() -> VQModel:
    return VQModel(TINY, rngs=nnx.Rngs(0))


@nnx.jit
def _encode_decode(model: VQModel, images):
    codes = model.encode(images)
    return model.encode_latents(images), codes, model.decode_code(codes)


@nnx.jit
def _decode_code(model: VQModel, codes):
    return model.decode_code(codes)


@pytest.mark.parametrize("preset", ["tiny", "shapes"])
def test_part_shapes(preset):
    """Every part alone and the whole model, by eval_shape (no compile)."""
    cfg = VQGAN_PRESETS[preset]
    b, g, r = 2, cfg.grid_size, cfg.resolution
    images = jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32)

    def parts(images):
        enc = Encoder(cfg, rngs=nnx.Rngs(0))
        dec = Decoder(cfg, rngs=nnx.Rngs(0))
        vq = VectorQuantizer(cfg.codebook_size, cfg.embed_dim, rngs=nnx.Rngs(0))
        h = enc(images)
        z_q, indices, aux = vq(h[..., : cfg.embed_dim])
        model = VQModel(cfg, rngs=nnx.Rngs(0))
        recon, model_aux = model(images)
        codes = model.encode(images)
        return h, z_q, indices, aux, dec(h), recon, model_aux, codes, model.decode_code(codes)

    h, z_q, indices, aux, dec_out, recon, model_aux, codes, decoded = jax.eval_shape(parts, images)
    assert h.shape == (b, g, g, cfg.z_channels)
    assert z_q.shape == (b, g, g, cfg.embed_dim)
    assert indices.shape == (b, g, g) and indices.dtype == jnp.int32
    assert dec_out.shape == (b, r, r, cfg.out_channels)
    assert recon.shape == (b, r, r, 3) and recon.dtype == jnp.float32
    for a in (aux, model_aux):
        for k in ("codebook_loss", "commitment_loss", "quant_loss", "perplexity"):
            assert a[k].shape == () and a[k].dtype == jnp.float32
    assert model_aux["indices"].shape == (b, cfg.num_tokens)
    assert codes.shape == (b, cfg.num_tokens) and codes.dtype == jnp.int32
    assert decoded.shape == (b, r, r, 3) and decoded.dtype == jnp.float32


def test_encode_decode_values(tiny_model):
    b = 2
    images = _images(TINY, b)
    z, codes, decoded = _encode_decode(tiny_model, images)
    assert codes.shape == (b, TINY.num_tokens) and codes.dtype == jnp.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < TINY.codebook_size
    # codes are the nearest codes of the latents, row-major over the token grid
    e = np.asarray(tiny_model.quantize.codebook)
    dist = ((np.asarray(z)[..., None, :] - e) ** 2).sum(-1)  # [B, h, w, K]
    np.testing.assert_array_equal(codes, dist.argmin(-1).reshape(b, -1))
    assert decoded.shape == (b, TINY.resolution, TINY.resolution, 3)
    assert float(decoded.min()) >= 0.0 and float(decoded.max()) <= 1.0
    assert float(decoded.std()) > 0.0


def test_downsample_pads_bottom_right_then_strides_2():
    """Taming's Downsample: pad (0, 1) on H and W, 3x3 VALID conv with stride 2."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 6, 6, 3)).astype(np.float32)
    k = rng.standard_normal((3, 3, 3, 3)).astype(np.float32)
    # Built abstractly and filled from numpy: no init op to compile for this shape.
    down = nnx.eval_shape(lambda: Downsample(3, rngs=nnx.Rngs(0)))
    down.conv.kernel.set_value(jnp.asarray(k))
    down.conv.bias.set_value(jnp.arange(3.0))
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    expected = np.zeros((1, 3, 3, 3), np.float32)
    for i in range(3):
        for j in range(3):
            window = padded[0, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :]  # [3, 3, in]
            expected[0, i, j] = np.einsum("hwi,hwio->o", window, k) + np.arange(3.0)
    np.testing.assert_allclose(down(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_decode_code_rejects_non_square_without_grid(tiny_model):
    with pytest.raises(ValueError, match="square"):
        tiny_model.decode_code(jnp.zeros((1, 12), jnp.int32))
    with pytest.raises(ValueError, match="grid"):
        tiny_model.decode_code(jnp.zeros((1, 12), jnp.int32), grid=(3, 3))


def test_quantizer_nearest_losses_and_straight_through():
    rng = np.random.default_rng(0)
    vq = nnx.eval_shape(lambda: VectorQuantizer(16, 4, rngs=nnx.Rngs(0)))
    # A codebook on the scale of z, so every code is a plausible neighbour.
    vq.embedding.embedding.set_value(jnp.asarray(rng.standard_normal((16, 4)), jnp.float32))
    z = jnp.asarray(rng.standard_normal((2, 3, 3, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal(z.shape), jnp.float32)
    beta = 0.3

    @nnx.jit
    def run(vq, z):
        def grads(fn):  # d fn / d z and d fn / d codebook
            gz = jax.grad(lambda z: fn(vq, z))(z)
            ge = nnx.grad(lambda vq: fn(vq, z))(vq)["embedding"]["embedding"][...]
            return gz, ge

        return vq(z, beta=beta), {
            "st": grads(lambda vq, z: jnp.sum(vq(z)[0] * w)),
            "codebook": grads(lambda vq, z: vq(z)[2]["codebook_loss"]),
            "commitment": grads(lambda vq, z: vq(z, beta=beta)[2]["commitment_loss"]),
        }

    (z_q, indices, aux), g = run(vq, z)
    e = np.asarray(vq.codebook)
    zn = np.asarray(z)
    dist = ((zn[..., None, :] - e) ** 2).sum(-1)  # brute force [2, 3, 3, 16]
    np.testing.assert_array_equal(indices, dist.argmin(-1))
    np.testing.assert_allclose(z_q, e[indices], rtol=1e-6, atol=1e-6)
    mse = float(((zn - e[indices]) ** 2).mean())
    np.testing.assert_allclose(aux["codebook_loss"], mse, rtol=1e-5)
    np.testing.assert_allclose(aux["commitment_loss"], beta * mse, rtol=1e-5)
    np.testing.assert_allclose(aux["quant_loss"], (1 + beta) * mse, rtol=1e-5)
    used = np.bincount(np.asarray(indices).ravel(), minlength=16) / indices.size
    entropy = -sum(p * np.log(p) for p in used if p > 0)
    np.testing.assert_allclose(aux["perplexity"], np.exp(entropy), rtol=1e-5)

    # straight-through: d(sum(z_q * w)) / dz = w, and no gradient reaches the codebook
    gz, ge = g["st"]
    np.testing.assert_allclose(gz, w, rtol=1e-6)
    assert float(np.abs(ge).max()) == 0.0
    # the codebook loss moves only the codes, towards the encoder outputs
    gz, ge = g["codebook"]
    assert float(np.abs(gz).max()) == 0.0
    expected = np.zeros_like(e)
    np.add.at(expected, np.asarray(indices).ravel(), 2 * (e[indices] - zn).reshape(-1, 4) / z.size)
    np.testing.assert_allclose(ge, expected, rtol=1e-5, atol=1e-7)
    # the commitment loss moves only the encoder output, towards its code
    gz, ge = g["commitment"]
    assert float(np.abs(ge).max()) == 0.0
    np.testing.assert_allclose(gz, 2 * beta * (zn - e[indices]) / z.size, rtol=1e-5, atol=1e-7)


def test_save_load_round_trip_is_bit_exact(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "vq")
    assert (tmp_path / "vq" / "config.json").is_file()
    loaded = VQModel.from_pretrained(tmp_path / "vq")
    assert loaded.config == TINY
    before, after = tiny_model.released_params(), loaded.released_params()
    assert before.keys() == after.keys()
    for k in before:
        assert after[k].dtype == before[k].dtype
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    # the file is the plain released tree
    on_disk = read_msgpack(tmp_path / "vq" / MSGPACK_NAME)
    assert on_disk.keys() == before.keys()


@pytest.mark.parametrize("stored", [ml_dtypes.bfloat16, np.float16])
def test_half_precision_stored_weights_load(tiny_model, tmp_path, stored):
    half = {k: v.astype(stored) for k, v in tiny_model.released_params().items()}
    tiny_model.save_pretrained(tmp_path / "vq")  # config.json
    write_msgpack(tmp_path / "vq" / MSGPACK_NAME, half)

    as_f32 = VQModel.from_pretrained(tmp_path / "vq").released_params()
    as_bf16 = VQModel.from_pretrained(tmp_path / "vq", dtype=jnp.bfloat16)
    for k, v in half.items():
        assert as_f32[k].dtype == np.float32
        np.testing.assert_array_equal(as_f32[k], v.astype(np.float32), err_msg=k)
    for k, v in as_bf16.released_params().items():
        assert v.dtype == ml_dtypes.bfloat16
    if stored is ml_dtypes.bfloat16:  # one compile is enough: a bf16 model makes images
        codes = jnp.arange(TINY.num_tokens, dtype=jnp.int32)[None] % TINY.codebook_size
        img = _decode_code(as_bf16, codes)
        assert img.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(img)))


def test_bad_tree_errors_name_each_path(tiny_model, tmp_path):
    flat = tiny_model.released_params()
    del flat["decoder/up_0/block_0/nin_shortcut/kernel"]
    flat["encoder/conv_in/kernel"] = np.zeros((3, 3, 3, 7), np.float32)
    flat["quantize/embedding/extra"] = np.zeros((2,), np.float32)
    tiny_model.save_pretrained(tmp_path / "vq")
    write_msgpack(tmp_path / "vq" / MSGPACK_NAME, flat)
    with pytest.raises(CheckpointError) as err:
        VQModel.from_pretrained(tmp_path / "vq")
    msg = str(err.value)
    assert ("missing tensor decoder/up_0/block_0/nin_shortcut/kernel "
            "(expected shape (1, 1, 64, 32))") in msg
    assert ("misshapen tensor encoder/conv_in/kernel: "
            "expected shape (3, 3, 3, 32), found (3, 3, 3, 7)") in msg
    assert "unexpected tensor quantize/embedding/extra" in msg


def test_missing_directory_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        VQModel.from_pretrained(tmp_path / "nope")


def test_released_f16_16384_tree():
    """The full released tree, by eval_shape only (nothing is allocated)."""
    shapes = released_param_shapes(VQGAN_PRESETS["f16_16384"])
    assert sum(int(np.prod(s)) for s in shapes.values()) == 76_073_859
    assert {k.split("/")[0] for k in shapes} == {
        "encoder", "decoder", "quant_conv", "post_quant_conv", "quantize"}
    expected = {
        "encoder/conv_in/kernel": (3, 3, 3, 128),
        "encoder/down_0/block_0/norm1/scale": (128,),
        "encoder/down_0/downsample/conv/kernel": (3, 3, 128, 128),
        "encoder/down_2/block_0/nin_shortcut/kernel": (1, 1, 128, 256),
        "encoder/down_4/block_0/nin_shortcut/kernel": (1, 1, 256, 512),
        "encoder/down_4/attn_1/proj_out/kernel": (1, 1, 512, 512),
        "encoder/mid/attn_1/q/bias": (512,),
        "encoder/mid/block_2/conv2/kernel": (3, 3, 512, 512),
        "encoder/norm_out/scale": (512,),
        "encoder/conv_out/kernel": (3, 3, 512, 256),
        "quant_conv/kernel": (1, 1, 256, 256),
        "quantize/embedding/embedding": (16384, 256),
        "post_quant_conv/kernel": (1, 1, 256, 256),
        "decoder/conv_in/kernel": (3, 3, 256, 512),
        "decoder/mid/block_1/norm2/bias": (512,),
        "decoder/up_4/attn_2/k/kernel": (1, 1, 512, 512),
        "decoder/up_4/upsample/conv/kernel": (3, 3, 512, 512),
        "decoder/up_3/block_0/nin_shortcut/kernel": (1, 1, 512, 256),
        "decoder/up_1/block_0/nin_shortcut/kernel": (1, 1, 256, 128),
        "decoder/up_1/block_2/conv2/kernel": (3, 3, 128, 128),
        "decoder/up_0/block_2/conv2/kernel": (3, 3, 128, 128),
        "decoder/norm_out/scale": (128,),
        "decoder/conv_out/kernel": (3, 3, 128, 3),
    }
    for k, s in expected.items():
        assert shapes.get(k) == s, k
    # level structure: downsample everywhere but the last level, upsample but level 0,
    # attention only at resolution 16, three blocks per decoder level
    assert not any(k.startswith("encoder/down_4/downsample") for k in shapes)
    assert not any(k.startswith("decoder/up_0/upsample") for k in shapes)
    attn = {"/".join(k.split("/")[:3]) for k in shapes if "/attn_" in k and "/mid/" not in k}
    assert attn == {"encoder/down_4/attn_0", "encoder/down_4/attn_1", "decoder/up_4/attn_0",
                    "decoder/up_4/attn_1", "decoder/up_4/attn_2"}
    assert not any(k.startswith("decoder/up_2/block_3") for k in shapes)
    assert any(k.startswith("decoder/up_2/block_2") for k in shapes)
    assert not any("temb" in k or "conv_shortcut" in k for k in shapes)


def test_every_weight_has_logical_axis_names():
    abstract = nnx.eval_shape(lambda: VQModel(VQGAN_PRESETS["f16_16384"], rngs=nnx.Rngs(0)))
    for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        names = v.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(v.shape), path
    flat = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    kernel = flat[("decoder", "up_0", "block_0", "conv1", "kernel")]
    assert kernel.get_metadata()["out_sharding"] == (None, None, "conv_in", "conv_out")
    table = flat[("quantize", "embedding", "embedding")]
    assert table.get_metadata()["out_sharding"] == ("codebook", None)


def test_a_few_train_steps_lower_the_reconstruction_loss():
    # The tiny preset: its init ops are already compiled by the fixture; the backward
    # pass compile dominates this test.
    model = VQModel(TINY, rngs=nnx.Rngs(3))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    images = _images(TINY, 4, seed=5)

    def loss_fn(model):
        recon, aux = model(images)
        rec = jnp.mean(jnp.square(recon - images))
        return rec + aux["quant_loss"], rec

    @nnx.jit
    def step(model, optimizer):
        (_, rec), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return rec

    losses = [float(step(model, optimizer)) for _ in range(12)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_local_encoder_codes_depend_only_on_their_neighbourhood(tmp_path):
    """`VQGANConfig.local`: a latent does not move when something is drawn 20+ pixels away
    (with the taming encoder it does: GroupNorm statistics and mid attention are global),
    the config says so in config.json, and the model round-trips by name."""
    from dalle_mini_jax import shapes

    near = shapes.render(shapes.Scene((shapes.SceneObject("red", "circle", "large", (0, 0)),)))
    both = shapes.render(shapes.Scene((shapes.SceneObject("red", "circle", "large", (0, 0)),
                                       shapes.SceneObject("blue", "cross", "large", (2, 2)))))
    images = jnp.asarray(np.stack([near, both]), jnp.float32) / 255.0
    latents = nnx.jit(lambda m, x: m.encode_latents(x))
    moved = {}
    for local in (False, True):
        model = VQModel(VQGAN_PRESETS["shapes"].replace(local=local), rngs=nnx.Rngs(0))
        z = np.asarray(latents(model, images))
        # Tokens of rows/cols 0-2 cover pixels 0-23; the cross starts at pixel 44.
        moved[local] = float(np.abs(z[0, :3, :3] - z[1, :3, :3]).max())
    assert moved[True] == 0.0
    assert moved[False] > 1e-3

    config = VQGAN_PRESETS["shapes"].replace(local=True)
    assert config.to_released_dict()["local"] is True
    assert "local" not in VQGAN_PRESETS["shapes"].to_released_dict()  # released files unchanged
    assert VQGANConfig.from_released_dict(config.to_released_dict()) == config
    model = VQModel(config, rngs=nnx.Rngs(1))
    assert not any("encoder/mid/attn_1" in name for name in model.released_params())
    model.save_pretrained(tmp_path)
    loaded = VQModel.from_pretrained(tmp_path)
    assert loaded.config.local
    np.testing.assert_array_equal(np.asarray(latents(loaded, images)),
                                  np.asarray(latents(model, images)))
    with pytest.raises(ValueError, match="attn_resolutions"):
        VQGAN_PRESETS["tiny"].replace(local=True)


def test_patch_codes_see_their_own_patch_and_nothing_else(tmp_path):
    """`VQGANConfig.patch_codes`: the input gradient of one latent is zero outside its own
    f x f patch (a local encoder's reaches into the next patch), the config round-trips
    through config.json, and it needs `local`."""
    base = VQGAN_PRESETS["shapes"].replace(resolution=96, channel_mult=(1, 2, 4, 8, 8, 8),
                                           local=True)
    reach = {}
    for patch in (False, True):
        model = VQModel(base.replace(patch_codes=patch), rngs=nnx.Rngs(0))
        grad = jax.grad(lambda x: model.encode_latents(x)[0, 1, 1].sum())(
            jnp.full((1, 96, 96, 3), 0.5, jnp.float32))
        rows, cols = np.nonzero(np.abs(np.asarray(grad[0])).sum(-1))
        reach[patch] = (rows.min(), rows.max(), cols.min(), cols.max())
    assert reach[True] == (32, 63, 32, 63)  # the latent of patch (1, 1): pixels 32..63
    assert reach[False][1] > 63 + 16  # 3x3 stride-2 convolutions overlap into patch (2, 2)

    config = base.replace(patch_codes=True)
    assert config.to_released_dict()["patch_codes"] is True
    assert "patch_codes" not in base.to_released_dict()
    assert VQGANConfig.from_released_dict(config.to_released_dict()) == config
    model = VQModel(config, rngs=nnx.Rngs(1))
    model.save_pretrained(tmp_path)
    assert VQModel.from_pretrained(tmp_path).config.patch_codes
    with pytest.raises(ValueError, match="local"):
        base.replace(local=False, patch_codes=True)


def test_bfloat16_decode_widens_each_weight_only_when_it_is_used():
    """XLA:CPU runs 16-bit convolutions in float32 and scheduled the widening of every
    weight at the start of the program, all the float32 copies alive at once (DALL-E
    Mini's VQGAN decoder in bf16: 170 MiB of temporaries against 96 MiB in float32).
    With `vqgan._after`, bf16 weights cost no more temporaries than float32 ones."""
    from dalle_mini_jax.pipeline import VQGANDecoder, vqgan_decode_fn

    # Wide enough that the weights outweigh the activations (a 16x16 image, 4x4 codes).
    cfg = VQGAN_PRESETS["tiny"].replace(channels=64, channel_mult=(1, 4, 4))
    S = cfg.num_tokens
    temps = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        graphdef, state = nnx.split(nnx.eval_shape(
            lambda: VQGANDecoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)))
        compiled = vqgan_decode_fn(dtype).lower(graphdef, state, jax.ShapeDtypeStruct((1, S), jnp.int32),
                                                jax.ShapeDtypeStruct((), jnp.int32)).compile()
        temps[dtype] = compiled.memory_analysis().temp_size_in_bytes
    weights = sum(x.size * 4 for x in jax.tree.leaves(state))
    assert temps[jnp.bfloat16] <= temps[jnp.float32] + weights // 4, (temps, weights)


@pytest.mark.parametrize("up", [1, 2])
def test_conv_rows_matches_the_whole_map(up):
    """`conv_rows` = conv(pre(upsample(x))) [+ residual], strip by strip: the first and
    last strips carry the map's zero padding, the middle ones read a halo row each side."""
    from dalle_mini_jax.vqgan import Conv, conv_rows

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 16 // up, 8, 8)), jnp.float32)
    res = jnp.asarray(rng.normal(size=(2, 16, 8 * up, 8)), jnp.float32)  # output-sized
    same = Conv(8, 8, 3, rngs=nnx.Rngs(1))
    wider = Conv(8, 12, 3, rngs=nnx.Rngs(2))
    shortcut = Conv(8, 12, 1, rngs=nnx.Rngs(3))
    pre = jax.nn.silu

    def upsampled(t):
        return jnp.repeat(jnp.repeat(t, up, axis=1), up, axis=2)

    for rows in (2, 4, 8):
        got = jax.jit(lambda x: conv_rows(same, x, pre, rows, up=up)[0])(x)
        np.testing.assert_allclose(got, same(pre(upsampled(x))), atol=1e-5)
        got, passed = jax.jit(lambda x, r: conv_rows(same, x, pre, rows, up=up, add=r))(x, res)
        np.testing.assert_allclose(got, res + same(pre(upsampled(x))), atol=1e-5)
        np.testing.assert_array_equal(passed, x)  # the input comes back unchanged
        got = jax.jit(lambda x, r: conv_rows(wider, x, pre, rows, up=up, add=r, add_fn=shortcut)[0])(x, res)
        np.testing.assert_allclose(got, shortcut(res) + wider(pre(upsampled(x))), atol=1e-5)
    with pytest.raises(ValueError, match="rows per strip"):
        conv_rows(same, x, pre, 5, up=up)


def test_decoder_by_rows_matches_whole_maps_with_fewer_temporaries():
    """The decoder's large maps by strips (`Decoder(z, rows)`, what the pipeline decodes
    with): the same pixels up to rounding, and two full-size maps alive, not three."""
    from dalle_mini_jax.vqgan import by_rows

    cfg = TINY.replace(resolution=64)  # 16x16 latents; 64x64 maps of 32 channels at the top
    decoder = Decoder(cfg, rngs=nnx.Rngs(0))
    z = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16, 16, cfg.z_channels)), jnp.float32)
    rows = 8
    assert by_rows(64, rows) and not by_rows(32, rows) and not by_rows(68, 8)
    graphdef, state = nnx.split(decoder)
    run = {r: jax.jit(lambda s, z, r=r: nnx.merge(graphdef, s)(z, r)).lower(state, z).compile()
           for r in (None, rows)}
    whole, strips = (np.asarray(run[r](state, z)) for r in (None, rows))
    assert whole.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(strips, whole, atol=2e-5 * np.abs(whole).max())
    temps = {r: c.memory_analysis().temp_size_in_bytes for r, c in run.items()}
    full_map = 64 * 64 * cfg.channels * 4
    assert temps[rows] <= temps[None] - full_map // 2, (temps, full_map)


def test_bfloat16_decoder_by_rows_holds_its_maps_in_bfloat16():
    """XLA:CPU has no 16-bit dynamic slice or update: its float normalization widened a
    bf16 map whole to float32 before the strip loops slice it (and copied the output
    map at every strip). Through the maps' bits (`vqgan.slice_rows`), a bf16 decode by
    strips holds no float32 full-size map and needs at least one float32 map's worth
    of temporaries less than the float32 decode; the pixels are the whole-map ones up
    to bf16 rounding."""
    import re

    cfg = TINY.replace(resolution=64)
    z = np.random.default_rng(0).normal(size=(1, 16, 16, cfg.z_channels))
    full_map = "[1,64,64,%d]" % cfg.channels
    temps, out = {}, {}
    weights = nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)))
    for dtype in (jnp.float32, jnp.bfloat16):
        graphdef, _ = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
        state = jax.tree.map(lambda w: w.astype(dtype), weights)  # the same weights, rounded
        for rows in (None, 8):
            compiled = jax.jit(lambda s, z, r=rows: nnx.merge(graphdef, s)(z, r)).lower(
                state, jnp.asarray(z, dtype)).compile()
            temps[dtype, rows] = compiled.memory_analysis().temp_size_in_bytes
            out[dtype, rows] = np.asarray(compiled(state, jnp.asarray(z, dtype)), np.float32)
            if dtype == jnp.bfloat16 and rows:
                hlo = compiled.as_text()
                assert "f32" + full_map not in hlo
                assert not re.search(re.escape(full_map) + r"\{[0-9,]+\} copy\(", hlo)
    assert temps[jnp.bfloat16, 8] <= temps[jnp.float32, 8] - 64 * 64 * cfg.channels * 4, temps
    scale = np.abs(out[jnp.float32, None]).max()
    np.testing.assert_allclose(out[jnp.bfloat16, 8], out[jnp.bfloat16, None], atol=0.05 * scale)
    np.testing.assert_allclose(out[jnp.bfloat16, 8], out[jnp.float32, None], atol=0.05 * scale)
