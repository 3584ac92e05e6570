"""Sampler maths on known logits, and the decode loop's compile and sharding behaviour."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_mini_jax import sampling
from dalle_mini_jax.config import TRANSFORMER_PRESETS
from dalle_mini_jax.sampling import (SamplingSettings, apply_guidance, image_keys, sample_codes,
                                     top_k_mask, top_p_mask, warp_logits)
from dalle_mini_jax.sharding import make_mesh, shard_model
from dalle_mini_jax.transformer import DalleBart, TableBits

NEG = -jnp.inf


def _draw_counts(logits, n=4000, num_codes=None, temperature=1.0, top_k=None, top_p=None):
    """Empirical counts of `n` draws from one row of logits (one key per draw)."""
    logits = jnp.asarray(logits, jnp.float32)
    V = logits.shape[-1]
    keys = jax.random.split(jax.random.key(0), n)
    rows = jnp.broadcast_to(logits, (n, V))
    codes = sample_codes(keys, rows, jnp.int32(3), num_codes or V, jnp.float32(temperature), top_k,
                         None if top_p is None else jnp.float32(top_p))
    return np.bincount(np.asarray(codes), minlength=V)


def test_top_k_keeps_exactly_k_and_breaks_ties_to_lower_ids():
    logits = jnp.array([[1.0, 5.0, 3.0, 3.0, 3.0, -2.0]])
    out = np.asarray(top_k_mask(logits, 3))
    kept = np.isfinite(out[0])
    assert kept.sum() == 3
    np.testing.assert_array_equal(kept, [False, True, True, True, False, False])
    np.testing.assert_array_equal(out[0, kept], [5.0, 3.0, 3.0])  # values unchanged
    assert np.isfinite(np.asarray(top_k_mask(logits, 100))).all()  # k >= V: no filter


def test_top_p_keeps_smallest_nucleus():
    probs = np.array([0.5, 0.25, 0.15, 0.1])
    logits = jnp.log(jnp.asarray(probs))[None]
    kept = lambda p: np.isfinite(np.asarray(top_p_mask(logits, jnp.float32(p))))[0]  # noqa: E731
    np.testing.assert_array_equal(kept(0.5), [True, False, False, False])  # 0.5 reached by the top one
    np.testing.assert_array_equal(kept(0.6), [True, True, False, False])
    np.testing.assert_array_equal(kept(0.8), [True, True, True, False])
    np.testing.assert_array_equal(kept(1.0), [True, True, True, True])
    np.testing.assert_array_equal(kept(0.01), [True, False, False, False])  # top one always kept
    # Order-independent: shuffled columns give the same kept set.
    perm = np.array([2, 0, 3, 1])
    out = np.isfinite(np.asarray(top_p_mask(logits[:, perm], jnp.float32(0.8))))[0]
    np.testing.assert_array_equal(out, kept(0.8)[perm])


def test_temperature_then_top_k_then_top_p_order():
    logits = jnp.array([[4.0, 3.0, 2.0, 1.0, 0.0]])
    # Temperature first: dividing by 2 flattens the distribution, so top-p 0.9 needs more codes
    # than it would on the raw logits.
    raw = np.isfinite(np.asarray(warp_logits(logits, jnp.float32(1.0), None, jnp.float32(0.9))))[0]
    hot = np.isfinite(np.asarray(warp_logits(logits, jnp.float32(2.0), None, jnp.float32(0.9))))[0]
    assert raw.sum() < hot.sum()
    # top-k before top-p: the nucleus is taken over the renormalised top-k.
    both = np.asarray(warp_logits(logits, jnp.float32(1.0), 2, jnp.float32(0.99)))[0]
    np.testing.assert_array_equal(np.isfinite(both), [True, True, False, False, False])
    np.testing.assert_allclose(np.asarray(warp_logits(logits, jnp.float32(2.0), None, None)), logits / 2)


def test_temperature_changes_the_distribution_as_expected():
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    n = 6000
    for t in (0.5, 1.0, 2.0):
        counts = _draw_counts(logits, n=n, temperature=t)
        p = np.exp(logits / t) / np.exp(logits / t).sum()
        np.testing.assert_allclose(counts / n, p, atol=0.03)


def test_sampling_respects_top_k_and_top_p():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    assert _draw_counts(logits, top_k=2)[2:].sum() == 0
    assert _draw_counts(logits, top_p=0.65)[2:].sum() == 0
    assert _draw_counts(logits, top_p=0.65)[1] > 0


def _full_draw(keys, logits, position, num_codes, temperature, top_k):
    """`sample_codes`' codes as the plain full-vocabulary categorical draw gives them."""
    step = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, position)
    return jax.vmap(jax.random.categorical)(step, warp_logits(logits[:, :num_codes], temperature, top_k, None))


def _threefry_shapes(fn, *args):
    """The output shapes of the threefry calls `fn` makes (its random bits)."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [e.outvars[0].aval.shape for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "threefry2x32"]


def _eqns(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (jit, vmap'd calls) included."""
    for e in jaxpr.eqns:
        yield e
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            yield from _eqns(sub)


@pytest.mark.parametrize("top_k", [1, 50, 1021])
def test_top_k_draw_is_the_full_categorical_draw(top_k):
    """With top-k (and no top-p) only the k kept codes get Gumbel noise; the codes are
    exactly those of `jax.random.categorical` over the masked row: every key, position,
    temperature, tied logits (all-equal rows, ties at the k-th value)."""
    V, num_codes, B = 1030, 1022, 6
    keys = jax.random.split(jax.random.key(11), B)

    @jax.jit
    def both(logits, position, temperature):
        args = (keys, logits, position, num_codes, temperature, top_k)
        return sample_codes(*args, None), _full_draw(*args)

    for i in range(40):
        logits = jax.random.normal(jax.random.key(i), (B, V)) * (1 + i % 4)
        logits = logits.at[0].set(0.0).at[1, :20].set(3.0)  # a row all tied; 20 tied at the top
        fast, full = both(logits, jnp.int32(i), jnp.float32(0.5 + i / 20))
        np.testing.assert_array_equal(np.asarray(fast), np.asarray(full))
    # Only k random numbers a row are made, not V.
    shapes = _threefry_shapes(lambda lg: sample_codes(keys, lg, jnp.int32(0), num_codes, 1.0, top_k, None), logits)
    assert shapes == [(B, top_k)], shapes


def test_kept_noise_is_jax_random_gumbel_at_those_ids():
    """The noise `_draw_top_k` makes for a few ids is `jax.random.gumbel`'s at those
    ids, bit for bit, past 2**16 ids too (the counter's high bits)."""
    keys = jax.random.split(jax.random.key(20261203), 4)
    V = 70_000
    full = jax.jit(jax.vmap(lambda key: jax.random.gumbel(key, (V,), jnp.float32)))(keys)
    ids = np.random.default_rng(0).integers(0, V, (4, 257)).astype(np.int32)
    kept = jax.jit(sampling._gumbel_at)(keys, jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(kept), np.take_along_axis(np.asarray(full), ids, 1))


def test_top_k_draw_falls_back_where_jax_makes_bits_otherwise():
    """Without partitionable threefry the bits of element i are not threefry(key, i): the
    full draw is used, and the codes are still `jax.random.categorical`'s."""
    keys = jax.random.split(jax.random.key(3), 4)
    logits = jax.random.normal(jax.random.key(4), (4, 300))
    with jax.threefry_partitionable(False):
        args = (keys, logits, jnp.int32(5), 290, jnp.float32(1.0), 20)
        np.testing.assert_array_equal(np.asarray(sample_codes(*args, None)), np.asarray(_full_draw(*args)))
        shapes = _threefry_shapes(lambda lg: sample_codes(keys, lg, jnp.int32(5), 290, 1.0, 20, None), logits)
        assert (4, 20) not in shapes


def test_masked_ids_never_sampled_even_with_huge_logits():
    logits = np.zeros(10, np.float32)
    logits[8:] = 1e9  # "BOS" and a padding id
    counts = _draw_counts(logits, num_codes=8)
    assert counts[8:].sum() == 0
    assert (counts[:8] > 0).all()  # uniform over the real codes


def test_guidance_formula():
    cond = jnp.array([[1.0, 2.0, 3.0]])
    uncond = jnp.array([[0.5, 0.0, 4.0]])
    out = apply_guidance(jnp.concatenate([cond, uncond]), jnp.float32(10.0))
    np.testing.assert_allclose(np.asarray(out), np.asarray(uncond + 10.0 * (cond - uncond)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(apply_guidance(jnp.concatenate([cond, uncond]), 1.0)), cond)


def test_settings_validation():
    for bad in (dict(temperature=0), dict(temperature=-1), dict(top_k=0), dict(top_k=2.5),
                dict(top_p=0), dict(top_p=1.5), dict(guidance=float("nan"))):
        with pytest.raises(ValueError):
            SamplingSettings(**bad)
    assert not SamplingSettings(guidance=1.0).guided and not SamplingSettings(guidance=None).guided
    assert not SamplingSettings(top_p=1.0).uses_top_p


def test_override_keeps_model_default_and_treats_none_as_off():
    import copy
    import pickle

    base = SamplingSettings(temperature=0.8, top_k=16, top_p=0.9, guidance=3.0)
    assert base.override() == base
    assert base.override(temperature=sampling.MODEL_DEFAULT, top_k=sampling.MODEL_DEFAULT) == base
    off = base.override(top_k=None, top_p=None, guidance=None)
    assert (off.top_k, off.top_p, off.guidance, off.temperature) == (None, None, None, 0.8)
    assert base.override(guidance=7.0) == SamplingSettings(0.8, 16, 0.9, 7.0)
    with pytest.raises(ValueError, match="top_k"):
        base.override(top_k=0)  # validated again
    with pytest.raises(TypeError, match="unknown sampling setting"):
        base.override(topk=5)
    # The sentinel survives copying (identity checks stay true).
    assert copy.deepcopy(sampling.MODEL_DEFAULT) is sampling.MODEL_DEFAULT
    assert pickle.loads(pickle.dumps(sampling.MODEL_DEFAULT)) is sampling.MODEL_DEFAULT
    # The field defaults are the released DALL·E Mini's.
    assert SamplingSettings() == SamplingSettings(1.0, sampling.DEFAULT_TOP_K, None,
                                                  sampling.DEFAULT_GUIDANCE)


def test_image_keys_depend_only_on_seed_prompt_and_index():
    a = image_keys(3, ["cat", "dog", "cat"], [0, 0, 1])
    b = image_keys(3, ["dog", "cat"], [0, 1])
    data = lambda k: np.asarray(jax.random.key_data(k))  # noqa: E731
    np.testing.assert_array_equal(data(a[1]), data(b[0]))
    np.testing.assert_array_equal(data(a[2]), data(b[1]))
    assert not np.array_equal(data(a[0]), data(a[1]))  # prompts do not share noise
    assert not np.array_equal(data(a[0]), data(image_keys(4, ["cat"], [0])[0]))


# --------------------------------------------------------------------------------------
# The loop on a tiny model
# --------------------------------------------------------------------------------------


def _init(cfg, mesh=None):
    model = nnx.jit(lambda: DalleBart(cfg, rngs=nnx.Rngs(0)))()  # one compile, not one per shape
    return model if mesh is None else shard_model(model, mesh)


@pytest.fixture(scope="module")
def tiny():
    cfg = TRANSFORMER_PRESETS["tiny"]
    model = _init(cfg)
    rng = np.random.RandomState(0)
    ids = rng.randint(3, cfg.text_vocab_size, (3, cfg.text_len)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0  # the "unconditional" row
    return cfg, model, ids, mask


def _sample(sampler, ids, mask, rows, keys, settings, chunk=None):
    S = sampler.config.image_len
    state = sampler.start(ids, mask, rows, 2 if settings.guided else None)
    chunk = chunk or S
    for begin in range(0, S, chunk):
        state = sampler.run(state, keys, begin, min(S, begin + chunk), settings)
    return np.asarray(state.tokens)


def test_loop_matches_step_by_step_reference(tiny):
    """The jitted loop = decode_step + guidance + sampling written out by hand."""
    cfg, model, ids, mask = tiny
    settings = SamplingSettings(temperature=0.9, top_k=20, guidance=3.0)
    sampler = sampling.TokenSampler(model)
    rows = np.array([0, 1])
    keys = image_keys(0, ["a", "b"], [0, 0])
    got = _sample(sampler, ids, mask, rows, keys, settings)

    sel = np.array([0, 1, 2, 2])
    enc = model.encode(jnp.asarray(ids[sel]), jnp.asarray(mask[sel]))
    cache = model.init_cache(enc, jnp.asarray(mask[sel]))  # the stacked-cache path

    @nnx.jit
    def step(model, last, i, cache):
        logits, cache = model.decode_step(jnp.concatenate([last, last]), i, cache)
        logits = apply_guidance(logits, 3.0)
        return sample_codes(keys, logits, i, cfg.num_image_codes, 0.9, 20, None), cache

    last = jnp.full((2,), cfg.bos_token_id)
    want = []
    for i in range(cfg.image_len):
        last, cache = step(model, last, jnp.int32(i), cache)
        want.append(np.asarray(last))
    np.testing.assert_array_equal(got, np.stack(want, 1))
    assert got.max() < cfg.num_image_codes


def test_chunks_equal_one_loop_and_no_recompile(tiny):
    cfg, model, ids, mask = tiny
    sampler = sampling.TokenSampler(model)
    settings = SamplingSettings(top_k=10, guidance=5.0)
    rows = np.array([0, 1, 0])
    keys = image_keys(1, ["a", "b", "a"], [0, 0, 1])
    before = collections.Counter(sampling.TRACE_COUNTS)
    whole = _sample(sampler, ids, mask, rows, keys, settings)
    traced = sampling.TRACE_COUNTS - before
    assert traced == {"start": 1, "run": 1}
    chunked = _sample(sampler, ids, mask, rows, keys, settings, chunk=5)
    # Other guidance / temperature / top-p values and chunk sizes: same compiled code.
    _sample(sampler, ids, mask, rows, keys, SamplingSettings(top_k=10, guidance=2.0, temperature=0.5))
    assert sampling.TRACE_COUNTS - before == {"start": 1, "run": 1}
    np.testing.assert_array_equal(whole, chunked)


def test_batch_composition_does_not_change_an_image(tiny):
    cfg, model, ids, mask = tiny
    sampler = sampling.TokenSampler(model)
    settings = SamplingSettings(top_k=16, guidance=3.0)  # as the sharded test: shared compile
    rows = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    big = _sample(sampler, ids, mask, rows, image_keys(2, ["a", "b"] * 4, [0, 0, 1, 1, 2, 2, 3, 3]), settings)
    small = _sample(sampler, ids, mask, np.array([0, 1, 0]), image_keys(2, ["a", "b", "a"], [0, 1, 3]),
                    settings)
    np.testing.assert_array_equal(big[[0, 3, 6]], small)


@pytest.mark.parametrize("mesh_shape", [dict(tensor=8, data=1)])  # 2x4: test_pipeline
def test_sharded_equals_single_device(tiny, mesh_shape):
    cfg, model, ids, mask = tiny
    settings = SamplingSettings(top_k=16, guidance=3.0)
    rows = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    keys = image_keys(2, ["a", "b"] * 4, [0, 0, 1, 1, 2, 2, 3, 3])
    want = _sample(sampling.TokenSampler(model), ids, mask, rows, keys, settings)
    mesh = make_mesh(**mesh_shape)
    sharded = _init(cfg, mesh)
    got = _sample(sampling.TokenSampler(sharded, mesh=mesh), ids, mask, rows, keys, settings)
    np.testing.assert_array_equal(got, want)


def test_bfloat16_token_bits_sharded_equal_single_device(tiny):
    """The decoder's bf16 token table taken over as bits (`TableBits`) keeps its sharding
    on a mesh and gives the same tokens as the model's own table on that mesh (bf16 on a
    mesh need not equal one device: sums are split differently, and bf16 rounds)."""
    cfg, _, ids, mask = tiny
    settings = SamplingSettings(top_k=16, guidance=3.0)
    rows, keys = np.array([0, 1, 0, 1]), image_keys(2, ["a", "b"] * 2, [0, 0, 1, 1])
    make = nnx.jit(lambda: DalleBart(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    mesh = make_mesh(tensor=4, data=2)
    want = _sample(sampling.TokenSampler(shard_model(make(), mesh), mesh=mesh), ids, mask, rows, keys, settings)
    model = shard_model(make(), mesh)
    table_sharding = model.dec_embed.tokens[...].sharding
    sampler = sampling.TokenSampler(model, mesh=mesh, release_stacked=True)
    assert isinstance(sampler._tokens, TableBits) and sampler._tokens.bits.sharding == table_sharding
    np.testing.assert_array_equal(_sample(sampler, ids, mask, rows, keys, settings), want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_release_stacked_frees_the_stacked_decoder(tiny, dtype):
    """Same tokens once the sampler has taken the weights over; in bfloat16 that includes
    the decoder's token table, then read as its bits (`TableBits`)."""
    cfg, _, ids, mask = tiny
    model = _init(cfg) if dtype == jnp.float32 else nnx.jit(
        lambda: DalleBart(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))()
    settings = SamplingSettings(top_k=10, guidance=5.0)  # as test_chunks: shared compile
    rows, keys = np.array([0, 1, 0]), image_keys(1, ["a", "b", "a"], [0, 0, 1])
    ref = _sample(sampling.TokenSampler(model), ids, mask, rows, keys, settings)
    sampler = sampling.TokenSampler(model, release_stacked=True)
    assert model.dec_layers.mlp.wi_gate[...].size == 0
    assert model.enc_layers.mlp.wi_gate[...].size == 0  # the encoder runs from its split too
    assert model.dec_layers.cross_attn.k[...].size > 0  # still needed by init_cache
    assert (sampler._tokens is None) == (dtype == jnp.float32)  # f32 rows are gathered in place
    np.testing.assert_array_equal(_sample(sampler, ids, mask, rows, keys, settings), ref)


def test_bfloat16_sampling_holds_no_float32_copy_of_a_weight(tiny):
    """XLA:CPU widens bf16 gathers, dynamic-slices and bf16-output dots to float32, and
    hoists the widened weights out of loops (the decode loop, the encoder's scan), which
    held a float32 copy of DALL-E Mini's weights through every bf16 generation. Neither
    compiled function may hold a float32 array shaped like a weight, nor a uint16 one
    (the bits of the decoder's token table, bitcast inside the loop, were a hoisted
    copy too: `TableBits`)."""
    _, _, ids, mask = tiny
    # Sizes no activation has, so a float32 array of a weight's shape is a weight copy.
    cfg = TRANSFORMER_PRESETS["tiny"].replace(embed_dim=40, num_heads=4, mlp_dim=72)
    model = nnx.jit(lambda: DalleBart(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                      param_dtype=jnp.bfloat16))()
    shapes = {x.shape for x in jax.tree.leaves(nnx.state(model, nnx.Param)) if x.ndim >= 2}
    shapes |= {s[1:] for s in shapes if len(s) == 3}  # per-layer slices of the stacks
    shapes |= {s[:0:-1] for s in shapes if len(s) == 3}  # and those held [out, in] (OutMajor)
    # The encoder reads every row of its position table: those rows, widened, are an
    # activation [T, D], not a copy.
    shapes -= {(cfg.text_len, cfg.embed_dim)}
    sampler = sampling.TokenSampler(model, release_stacked=True)
    settings = SamplingSettings(top_k=10, guidance=5.0)
    rows, uncond = np.array([0, 1]), 2
    state = sampler.start(ids, mask, rows, uncond)
    keys = image_keys(1, ["a", "b"], [0, 0])
    for name, lowered in (("start", sampler.lower_start(ids, mask, rows, uncond)),
                          ("run", sampler.lower_run(state, keys, 0, 4, settings))):
        hlo = lowered.compile().as_text()
        # The start bitcasts the encoder's table once (a transient, not a loop's hoisted
        # copy; a pipeline keeps that table on the host and passes rows instead).
        f32 = {tuple(int(d) for d in m.split(",")) for m in re.findall(r"f32\[(\d+(?:,\d+)+)\]", hlo)}
        assert not f32 & shapes, f"{name} holds float32 weight copies: {sorted(f32 & shapes)}"
        if name == "run":  # uint16 arrays made by an op (the table's bits come in as a parameter)
            made = re.findall(r"= u16\[(\d+(?:,\d+)+)\]\S* (?!parameter|get-tuple-element|bitcast\()", hlo)
            u16 = {tuple(int(d) for d in m.split(",")) for m in made}
            assert not u16 & shapes, f"run holds uint16 weight copies: {sorted(u16 & shapes)}"
    assert isinstance(sampler._tokens, TableBits) and model.dec_embed.tokens[...].size == 0
