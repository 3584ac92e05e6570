"""DalleBart: the released parameter tree, cached vs full decoding, masks, sharding, jit.

Model maths against an independent implementation lives in
test_transformer_min_dalle.py; file I/O in test_checkpoint.py.

Everything that runs the model goes through `nnx.jit` with one compile per test:
op-by-op dispatch of even the tiny preset costs seconds on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dalle_mini_jax import checkpoint as ckpt
from dalle_mini_jax.config import ConfigError, DalleBartConfig, transformer_preset
from dalle_mini_jax.sampling import split_decoder_layers
from dalle_mini_jax.sharding import activate, make_mesh
from dalle_mini_jax.transformer import DalleBart, OutMajor, count_params, released_names

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def randomize(model: DalleBart, seed: int) -> DalleBart:
    """Move every norm away from its 1/0 init, so a norm wired to the wrong place shows.

    Kernels and embeddings keep their normal(init_std) init.
    """
    state = nnx.state(model, nnx.Param)
    flat = ckpt.flatten(nnx.to_pure_dict(state))
    rng = np.random.default_rng(seed)
    for k, v in flat.items():
        if k.endswith("scale"):
            flat[k] = jnp.asarray(1 + 0.3 * rng.standard_normal(v.shape), v.dtype)
        elif k.endswith("bias"):
            flat[k] = jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype)
    nnx.replace_by_pure_dict(state, ckpt.unflatten(flat))
    nnx.update(model, state)
    return model


def text_batch(cfg: DalleBartConfig, lengths: list[int], seed: int = 0):
    """[B, T] ids with real tokens in 3..V-1 then padding id 1, and the matching mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.text_vocab_size, (len(lengths), cfg.text_len))
    mask = np.arange(cfg.text_len)[None] < np.asarray(lengths)[:, None]
    ids = np.where(mask, ids, cfg.text_pad_token_id)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)


def image_batch(cfg: DalleBartConfig, batch: int, seed: int = 1):
    """[B, S] decoder inputs: BOS then random image codes."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, cfg.num_image_codes, (batch, cfg.image_len - 1))
    bos = np.full((batch, 1), cfg.bos_token_id)
    return jnp.asarray(np.concatenate([bos, codes], 1), jnp.int32)


@functools.partial(nnx.jit, static_argnames="per_layer")
def full_and_cached(model: DalleBart, ids, mask, dec_ids, per_layer: bool = False):
    """Teacher-forced logits [B, S, V], and the same from S cached decode steps.

    The cached run uses the stacked [L, ...] cache of `init_cache`; with `per_layer` it
    also runs a list of L cache buffers with L separate layer weight trees
    (`decode_step(..., layers=...)`), and those of the sampler: every dense kernel and
    lm_head an `OutMajor`, here cut in 3 uneven parts.
    """
    enc = model.encode(ids, mask)
    full = model.decode(dec_ids, enc, mask)
    stacked = model.init_cache(enc, mask)

    def run(cache, layers, head=None):
        def step(cache, pos):
            logits, cache = model.decode_step(dec_ids[:, pos], pos, cache, layers, head)
            return cache, logits

        _, steps = jax.lax.scan(step, cache, jnp.arange(dec_ids.shape[1], dtype=jnp.int32))
        return jnp.swapaxes(steps, 0, 1)

    runs = [run(stacked, None)]
    if per_layer:
        L = model.config.num_decoder_layers
        split = dataclasses.replace(
            stacked, self_k=[stacked.self_k[l] for l in range(L)], self_v=[stacked.self_v[l] for l in range(L)]
        )
        weights = nnx.to_pure_dict(nnx.state(model.dec_layers, nnx.Param))
        runs.append(run(split, [jax.tree.map(lambda x, l=l: x[l], weights) for l in range(L)]))
        head = OutMajor(tuple(jnp.split(model.lm_head[...].T, [5, 11])))  # [out_i, in], uneven
        runs.append(run(split, split_decoder_layers(model, parts=3), head))
    return full, runs


TRACES = {"forward": 0}


@nnx.jit
def forward(model: DalleBart, ids, mask, dec_ids):
    """(logits [B, S, V], encoder output [B, T, D]); counts its traces in TRACES."""
    TRACES["forward"] += 1
    return model(ids, mask, dec_ids), model.encode(ids, mask)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# --------------------------------------------------------------------------------------
# The released parameter tree (reference §2.2)
# --------------------------------------------------------------------------------------


def expected_released_tree(D, F, L, Vt, Vi, T=64, S=256) -> dict[str, tuple[int, ...]]:
    """The released (scanned, normformer, GLU) tree, written out from the §2.2 table."""
    tree = {"lm_head/kernel": (D, Vi)}
    for stack, V, N in (("encoder", Vt, T), ("decoder", Vi, S)):
        root = f"model/{stack}"
        tree[f"{root}/embed_tokens/embedding"] = (V, D)
        tree[f"{root}/embed_positions/embedding"] = (N, D)
        tree[f"{root}/layernorm_embedding/scale"] = (D,)
        tree[f"{root}/layernorm_embedding/bias"] = (D,)
        tree[f"{root}/final_ln/bias"] = (D,)  # bias-only: no scale
        lay = f"{root}/layers/FlaxBart{stack.capitalize()}Layers"
        attentions = [0] if stack == "encoder" else [0, 1]
        for a in attentions:
            pre, post = 2 * a, 2 * a + 1  # LayerNorm_0/1 around self-, _2/_3 around cross-attention
            tree[f"{lay}/LayerNorm_{pre}/bias"] = (L, D)
            tree[f"{lay}/LayerNorm_{post}/scale"] = (L, D)
            tree[f"{lay}/LayerNorm_{post}/bias"] = (L, D)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                tree[f"{lay}/FlaxBartAttention_{a}/{proj}/kernel"] = (L, D, D)
        tree[f"{lay}/GLU_0/LayerNorm_0/bias"] = (L, D)
        tree[f"{lay}/GLU_0/Dense_0/kernel"] = (L, D, F)
        tree[f"{lay}/GLU_0/Dense_1/kernel"] = (L, D, F)
        tree[f"{lay}/GLU_0/LayerNorm_1/bias"] = (L, F)
        tree[f"{lay}/GLU_0/Dense_2/kernel"] = (L, F, D)
    return tree


def released_shapes(cfg: DalleBartConfig) -> dict[str, tuple[int, ...]]:
    """Our model's released tree for `cfg`, from shapes only (no memory)."""
    model = nnx.eval_shape(lambda: DalleBart(cfg, rngs=nnx.Rngs(0)))
    ours = ckpt.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    names = released_names(cfg)
    assert sorted(names) == sorted(ours), "released_names must cover exactly our params"
    assert len(set(names.values())) == len(names), "two params map to one released name"
    return {names[k]: tuple(v.shape) for k, v in ours.items()}, count_params(model)


@pytest.mark.parametrize(
    "preset, dims, total",
    [
        ("mini", dict(D=1024, F=2730, L=12, Vt=50264, Vi=16385), 437_833_712),
        ("mega", dict(D=2048, F=4096, L=24, Vt=50272, Vi=16416), 2_587_521_024),
    ],
)
def test_param_tree_is_the_released_tree(preset, dims, total):
    tree, n = released_shapes(transformer_preset(preset))
    assert tree == expected_released_tree(**dims)
    assert n == total == sum(int(np.prod(s)) for s in tree.values())


# Rows straight from the reference §2.2 table (… = model/{stack}/layers/FlaxBart{Stack}Layers).
_ENC = "model/encoder/layers/FlaxBartEncoderLayers"
_DEC = "model/decoder/layers/FlaxBartDecoderLayers"
SPOT_CHECKS = [
    ("lm_head/kernel", (1024, 16385), (2048, 16416)),
    ("model/encoder/embed_tokens/embedding", (50264, 1024), (50272, 2048)),
    ("model/encoder/embed_positions/embedding", (64, 1024), (64, 2048)),
    ("model/encoder/layernorm_embedding/scale", (1024,), (2048,)),
    ("model/encoder/final_ln/bias", (1024,), (2048,)),
    (f"{_ENC}/LayerNorm_0/bias", (12, 1024), (24, 2048)),
    (f"{_ENC}/FlaxBartAttention_0/q_proj/kernel", (12, 1024, 1024), (24, 2048, 2048)),
    (f"{_ENC}/FlaxBartAttention_0/out_proj/kernel", (12, 1024, 1024), (24, 2048, 2048)),
    (f"{_ENC}/LayerNorm_1/scale", (12, 1024), (24, 2048)),
    (f"{_ENC}/GLU_0/LayerNorm_0/bias", (12, 1024), (24, 2048)),
    (f"{_ENC}/GLU_0/Dense_0/kernel", (12, 1024, 2730), (24, 2048, 4096)),
    (f"{_ENC}/GLU_0/Dense_1/kernel", (12, 1024, 2730), (24, 2048, 4096)),
    (f"{_ENC}/GLU_0/LayerNorm_1/bias", (12, 2730), (24, 4096)),
    (f"{_ENC}/GLU_0/Dense_2/kernel", (12, 2730, 1024), (24, 4096, 2048)),
    ("model/decoder/embed_tokens/embedding", (16385, 1024), (16416, 2048)),
    ("model/decoder/embed_positions/embedding", (256, 1024), (256, 2048)),
    ("model/decoder/final_ln/bias", (1024,), (2048,)),
    (f"{_DEC}/LayerNorm_2/bias", (12, 1024), (24, 2048)),
    (f"{_DEC}/LayerNorm_3/scale", (12, 1024), (24, 2048)),
    (f"{_DEC}/FlaxBartAttention_1/k_proj/kernel", (12, 1024, 1024), (24, 2048, 2048)),
    (f"{_DEC}/GLU_0/Dense_2/kernel", (12, 2730, 1024), (24, 4096, 2048)),
]
ABSENT = [
    "model/encoder/final_ln/scale",
    "model/decoder/final_ln/scale",
    f"{_ENC}/LayerNorm_0/scale",
    f"{_DEC}/LayerNorm_2/scale",
    f"{_ENC}/GLU_0/LayerNorm_1/scale",
    "lm_head/bias",
    f"{_ENC}/FlaxBartAttention_0/q_proj/bias",
]


def test_param_tree_spot_checks():
    mini, _ = released_shapes(transformer_preset("mini"))
    mega, _ = released_shapes(transformer_preset("mega"))
    for path, mini_shape, mega_shape in SPOT_CHECKS:
        assert mini[path] == mini_shape, path
        assert mega[path] == mega_shape, path
    for path in ABSENT:
        assert path not in mini and path not in mega, path


def test_variant_trees():
    """preln has only the pre-norms (autonames shift down); the FFN variant is FFN_0."""
    cfg = transformer_preset("tiny").replace(ln_positions="preln", use_glu=False)
    tree, _ = released_shapes(cfg)
    D, F, L = cfg.embed_dim, cfg.mlp_dim, cfg.num_decoder_layers
    dec = "model/decoder/layers/FlaxBartDecoderLayers"
    assert tree[f"{dec}/LayerNorm_0/bias"] == (L, D)  # pre-self-attention
    assert tree[f"{dec}/LayerNorm_1/bias"] == (L, D)  # pre-cross-attention
    assert f"{dec}/LayerNorm_1/scale" not in tree and f"{dec}/LayerNorm_2/bias" not in tree
    assert tree[f"{dec}/FFN_0/Dense_0/kernel"] == (L, D, F)
    assert tree[f"{dec}/FFN_0/Dense_1/kernel"] == (L, F, D)
    assert tree[f"{dec}/FFN_0/LayerNorm_0/bias"] == (L, D)
    assert not any("GLU_0" in k or "FFN_0/LayerNorm_1" in k for k in tree)
    no_final, _ = released_shapes(cfg.replace(use_final_ln=False))
    assert not any("final_ln" in k for k in no_final)


def test_init_follows_the_released_initialiser():
    cfg = transformer_preset("tiny").replace(init_std=0.05)
    params = DalleBart(cfg, rngs=nnx.Rngs(0)).released_params()
    k = params[f"{_DEC}/GLU_0/Dense_0/kernel"]  # 2 * 64 * 96 samples
    assert abs(k.mean()) < 0.002 and abs(k.std() - 0.05) < 0.002
    assert np.all(params["model/decoder/layernorm_embedding/scale"] == 1)
    assert np.all(params[f"{_DEC}/LayerNorm_1/bias"] == 0)
    # Different seeds give different weights; the same seed the same.
    again = DalleBart(cfg, rngs=nnx.Rngs(0)).released_params()
    other = DalleBart(cfg, rngs=nnx.Rngs(1)).released_params()
    assert np.array_equal(k, again[f"{_DEC}/GLU_0/Dense_0/kernel"])
    assert not np.array_equal(k, other[f"{_DEC}/GLU_0/Dense_0/kernel"])


# --------------------------------------------------------------------------------------
# Cached decoding == full-sequence decoding
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ln_positions, use_glu",
    [("normformer", True), ("normformer", False), ("preln", True), ("preln", False)],
)
def test_decode_step_matches_full_sequence(ln_positions, use_glu):
    cfg = transformer_preset("tiny").replace(ln_positions=ln_positions, use_glu=use_glu, init_std=0.1)
    model = randomize(DalleBart(cfg, rngs=nnx.Rngs(3)), seed=3)
    # Three rows with different padding: full, 7 tokens, and 2 (like the "" prompt).
    ids, mask = text_batch(cfg, [cfg.text_len, 7, 2])
    dec = image_batch(cfg, 3)
    # The sampler's per-layer layout once, for the released variant: the variants differ
    # only inside the layer maths, which both cache layouts share.
    per_layer = (ln_positions, use_glu) == ("normformer", True)
    full, runs = full_and_cached(model, ids, mask, dec, per_layer=per_layer)
    assert full.shape == (3, cfg.image_len, cfg.decoder_vocab_size) and full.dtype == jnp.float32
    assert np.isfinite(np.asarray(full)).all()
    assert len(runs) == 1 + 2 * per_layer
    for layout, steps in zip(["stacked cache", "per-layer cache and weights", "OutMajor kernels"], runs):
        err = rel_err(steps, full)
        assert err < 1e-5, f"cached ({layout}) vs full: relative error {err:.2e}"
    # The rows really differ (the padding is not masking everything into the same output).
    assert rel_err(full[1], full[2]) > 1e-2


def test_image_pos_2d(tmp_path):
    """Row and column tables: cached == full decoding, a saved model reloads them by name,
    the config key round-trips, and the row/column really enter the embedding."""
    cfg = transformer_preset("tiny").replace(image_pos_2d=True, init_std=0.1)
    model = randomize(DalleBart(cfg, rngs=nnx.Rngs(5)), seed=5)
    g = cfg.image_grid
    assert g * g == cfg.image_len and model.dec_embed.rows.shape == (g, cfg.embed_dim)
    ids, mask = text_batch(cfg, [cfg.text_len, 4])
    dec = image_batch(cfg, 2)
    full, runs = full_and_cached(model, ids, mask, dec, per_layer=True)
    for steps in runs:
        assert rel_err(steps, full) < 1e-5
    # The tables matter: zeroing the column table changes every position's logits.
    params = model.released_params()
    assert params["model/decoder/embed_rows/embedding"].shape == (g, cfg.embed_dim)
    model.save_pretrained(tmp_path)
    assert DalleBartConfig.load(tmp_path / "config.json") == cfg
    again = DalleBart.from_pretrained(tmp_path)
    np.testing.assert_array_equal(np.asarray(again.dec_embed.cols[...]), np.asarray(model.dec_embed.cols[...]))
    again.dec_embed.cols[...] = jnp.zeros_like(again.dec_embed.cols[...])
    changed = nnx.jit(lambda m: m(ids, mask, dec))(again)
    assert rel_err(changed, full) > 1e-2
    # A released-format config without the key is a model without the tables.
    assert "image_position_2d" not in transformer_preset("tiny").to_released_dict()
    with pytest.raises(ConfigError, match="square"):
        cfg.replace(image_len=15)


@pytest.fixture(scope="module")
def tiny_model():
    cfg = transformer_preset("tiny").replace(init_std=0.1)
    return randomize(DalleBart(cfg, rngs=nnx.Rngs(0)), seed=0)


def test_padding_and_causality(tiny_model):
    """Padded text positions and later image tokens must not change any logit."""
    cfg = tiny_model.config
    ids, mask = text_batch(cfg, [5, 9])
    dec = image_batch(cfg, 2)
    # Different ids under the padding, and different image tokens from position 10 on.
    ids2 = jnp.where(mask.astype(bool), ids, 7)
    dec2 = dec.at[:, 10:].set((dec[:, 10:] + 1) % cfg.num_image_codes)
    both_ids = jnp.concatenate([ids, ids2])
    both_mask = jnp.concatenate([mask, mask])
    both_dec = jnp.concatenate([dec, dec2])
    logits, enc = map(np.asarray, forward(tiny_model, both_ids, both_mask, both_dec))
    real = np.asarray(mask, bool)
    assert np.allclose(enc[:2][real], enc[2:][real], atol=1e-6)
    assert np.allclose(logits[:2, :10], logits[2:, :10], atol=1e-5)
    assert not np.allclose(logits[:2, 10:], logits[2:, 10:], atol=1e-3)


def test_bad_input_shapes_are_refused(tiny_model):
    cfg = tiny_model.config
    ids, mask = text_batch(cfg, [3])
    too_long = jnp.ones((1, cfg.text_len + 1), jnp.int32)
    with pytest.raises(ValueError, match="text_len"):
        tiny_model.encode(too_long, too_long)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        tiny_model.encode(ids, mask[:, :-1])
    with pytest.raises(ValueError, match="image_len"):
        tiny_model.decode(jnp.zeros((1, cfg.image_len + 1), jnp.int32), jnp.zeros((1, cfg.text_len, cfg.embed_dim)), mask)


# --------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------


def test_sharded_load_matches_unsharded(tiny_model, tmp_path):
    """Load on a (data 2, fsdp 2, tensor 2) mesh of 8 fake CPU devices."""
    assert jax.device_count() == 8, "tests/conftest.py fakes 8 CPU devices"
    cfg = tiny_model.config
    tiny_model.save_pretrained(tmp_path)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = DalleBart.from_pretrained(tmp_path, mesh=mesh)

    # The rule table: embed -> fsdp, heads/mlp/vocab -> tensor, layers/norms replicated,
    # and a dimension that does not divide (65 decoder-vocab rows) stays replicated.
    def spec(v):
        return v[...].sharding.spec

    assert cfg.decoder_vocab_size % 2 == 1
    expected = {
        "dec q kernel [L, D, H*K]": (spec(sharded.dec_layers.self_attn.q), P(None, "fsdp", "tensor")),
        "enc out kernel [L, H*K, D]": (spec(sharded.enc_layers.self_attn.o), P(None, "tensor", "fsdp")),
        "GLU gate [L, D, F]": (spec(sharded.dec_layers.mlp.wi_gate), P(None, "fsdp", "tensor")),
        "GLU out [L, F, D]": (spec(sharded.dec_layers.mlp.wo), P(None, "tensor", "fsdp")),
        "text table [Vt, D]": (spec(sharded.enc_embed.tokens), P("tensor", "fsdp")),
        "image table [65, D]": (spec(sharded.dec_embed.tokens), P(None, "fsdp")),
        "lm_head [D, 65]": (spec(sharded.lm_head), P("fsdp")),
        "positions [S, D]": (spec(sharded.dec_embed.positions), P(None, "fsdp")),
        "norm [L, D]": (spec(sharded.dec_layers.self_post.scale), P()),
    }
    for what, (got, want) in expected.items():
        assert got == want, f"{what}: {got} != {want}"
    q = sharded.dec_layers.self_attn.q[...]
    assert q.sharding.mesh.shape == mesh.shape
    assert q.addressable_shards[0].data.shape == (cfg.num_decoder_layers, cfg.embed_dim // 2, cfg.embed_dim // 2)

    ids, mask = text_batch(cfg, [16, 5, 9, 2], seed=4)
    dec = image_batch(cfg, 4, seed=5)
    want, want_enc = forward(tiny_model, ids, mask, dec)
    with activate(mesh):  # activation constraints on, batch split over data x fsdp
        got, got_enc = forward(sharded, ids, mask, dec)
    assert got.sharding.spec == got_enc.sharding.spec == P(("data", "fsdp"))
    assert rel_err(got, want) < 1e-5 and rel_err(got_enc, want_enc) < 1e-5
    for (_, a), (_, b) in zip(
        ckpt.flatten(nnx.to_pure_dict(nnx.state(sharded, nnx.Param))).items(),
        ckpt.flatten(nnx.to_pure_dict(nnx.state(tiny_model, nnx.Param))).items(),
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_model_runs_close_to_float32(tiny_model, tmp_path):
    cfg = tiny_model.config
    tiny_model.save_pretrained(tmp_path)
    bf = DalleBart.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    ids, mask = text_batch(cfg, [16, 5, 9, 2], seed=4)
    dec = image_batch(cfg, 4, seed=5)
    want, want_enc = forward(tiny_model, ids, mask, dec)
    got, got_enc = forward(bf, ids, mask, dec)
    assert got.dtype == jnp.float32 and got_enc.dtype == jnp.bfloat16  # logits always fp32
    # bf16 has an 8-bit mantissa: a few percent after four layers and a LayerNorm.
    err = rel_err(got, want)
    assert err < 5e-2, f"bf16 vs fp32 logits relative error {err:.3f}"


def test_bfloat16_cache_holds_bits_and_is_written_in_place(tiny_model, tmp_path):
    """A 16-bit decode cache holds its keys/values as uint16 bits: XLA:CPU widened a bf16
    cache to float32 to write one position into it (a copy of each layer's cache every
    step). Cached decoding still matches the full sequence, in every cache layout."""
    cfg = tiny_model.config
    tiny_model.save_pretrained(tmp_path)
    bf = DalleBart.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    ids, mask = text_batch(cfg, [16, 5], seed=4)
    dec = image_batch(cfg, 2, seed=5)
    full, runs = full_and_cached(bf, ids, mask, dec, per_layer=True)
    for steps in runs:
        assert rel_err(steps, full) < 2e-2  # both in bf16, summed in other orders

    cache = bf.init_cache(bf.encode(ids, mask), mask)
    assert cache.self_k.dtype == cache.self_v.dtype == jnp.uint16
    step = nnx.jit(lambda m, c: m.decode_step(dec[:, 3], jnp.int32(3), c))
    hlo = step.lower(bf, cache).compile().as_text()
    L, (B, H, S, K) = cfg.num_decoder_layers, cache.self_k.shape[1:]
    widened = [line for line in hlo.splitlines() if "dynamic-update-slice(" in line
               and (f"f32[{L},{B},{H},{S},{K}]" in line or f"f32[{B},{H},{S},{K}]" in line)]
    assert not widened, widened[:2]
    logits, after = step(bf, cache)
    assert after.self_k.dtype == jnp.uint16 and np.isfinite(np.asarray(logits)).all()


def test_bfloat16_parameters_train_through_every_table(tiny_model):
    """bf16 embedding rows are gathered as 16-bit integers (transformer._rows, for
    memory); a bitcast has no derivative, so the gather's own must reach every table."""
    bf = nnx.clone(tiny_model)
    for _, var in nnx.iter_graph(bf):
        if isinstance(var, nnx.Param):
            var.set_value(var[...].astype(jnp.bfloat16))
    cfg = bf.config
    ids, mask = text_batch(cfg, [16, 5], seed=1)
    dec = image_batch(cfg, 2, seed=2)
    graphdef, params = nnx.split(bf)

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params)(ids, mask, dec).astype(jnp.float32) ** 2)

    grads = nnx.state(jax.grad(loss)(params))
    for name in ("enc_embed", "dec_embed"):
        tables = jax.tree.leaves(grads[name])
        assert tables and all(g.dtype == jnp.bfloat16 for g in tables)
        assert all(float(jnp.abs(g.astype(jnp.float32)).sum()) > 0 for g in tables), name


def test_nnx_jit_traces_once_per_shape(tiny_model):
    """Repeated nnx.jit calls, and a second model of the same config, reuse one trace."""
    cfg = tiny_model.config
    ids, mask = text_batch(cfg, [4, 16, 1, 8], seed=8)
    dec = image_batch(cfg, 4, seed=9)
    before = TRACES["forward"]
    a, _ = forward(tiny_model, ids, mask, dec)
    twin = randomize(DalleBart(cfg, rngs=nnx.Rngs(1)), seed=1)
    b, _ = forward(twin, ids, mask, dec)
    assert TRACES["forward"] - before <= 1  # at most this test's first call traces
    assert a.shape == b.shape == (4, cfg.image_len, cfg.decoder_vocab_size)
    assert not np.allclose(a, b)  # the weights are arguments, not baked-in constants
