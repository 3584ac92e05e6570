"""cpu_dots: the decode step's threaded dots and cache attention (a C++ kernel built on
first use), against XLA's own products, and the sampler's use of them."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_mini_jax import cpu_dots
from dalle_mini_jax.attention import attend_one
from dalle_mini_jax.config import transformer_preset
from dalle_mini_jax.float_bits import bits
from dalle_mini_jax.sampling import (HostTable, SamplingSettings, TokenSampler, dot_layout, image_keys,
                                     split_decoder_layers)
from dalle_mini_jax.transformer import DalleBart, OutMajor, host_rows

from test_transformer import image_batch, randomize, rel_err, text_batch

pytestmark = pytest.mark.skipif(not cpu_dots.available(), reason=f"cpu_dots unavailable: {cpu_dots.reason()}")


def _reference(x, w):
    return np.asarray(x, np.float64) @ np.asarray(jnp.asarray(w, jnp.float32), np.float64).T


@pytest.mark.parametrize("rows", [1, 2, 5, 18])
def test_rows_dot_matches_the_product(rows):
    """Several weights in one call, float32 and bfloat16, row counts that are not
    multiples of the kernel's blocks (4 rows, 32-row chunks) and K not a multiple of 16."""
    rng = np.random.default_rng(rows)
    for k in (64, 83):
        x = rng.standard_normal((rows, k), dtype=np.float32)
        ws = [rng.standard_normal((n, k), dtype=np.float32) for n in (3, 64, 101)]
        ws.append(jnp.asarray(rng.standard_normal((37, k), dtype=np.float32), jnp.bfloat16))
        ys = jax.jit(cpu_dots.rows_dot)(x, ws)
        for w, y in zip(ws, ys):
            assert y.shape == (rows, w.shape[0]) and y.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(y), _reference(x, w), rtol=1e-5, atol=1e-4)


def test_rows_dot_is_the_same_on_any_thread_count_and_from_many_threads():
    """Each output is summed by one thread in a fixed order: the bits do not depend on
    how the rows were shared out, and concurrent calls (XLA may issue independent dots
    at once) take turns on the pool without mixing their results."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 256), dtype=np.float32)
    w = rng.standard_normal((1000, 256), dtype=np.float32)
    one = np.asarray(cpu_dots.rows_dot(x, [w], num_threads=1)[0])
    for t in (2, 3):
        np.testing.assert_array_equal(np.asarray(cpu_dots.rows_dot(x, [w], num_threads=t)[0]), one)
    xs = [rng.standard_normal((2, 256), dtype=np.float32) for _ in range(6)]
    want = [np.asarray(cpu_dots.rows_dot(xi, [w], num_threads=1)[0]) for xi in xs]
    got = [None] * len(xs)
    f = jax.jit(lambda xi: cpu_dots.rows_dot(xi, [w])[0])

    def call(i):
        for _ in range(20):
            got[i] = np.asarray(f(xs[i]))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w_ in zip(got, want):
        np.testing.assert_array_equal(g, w_)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attend_matches_attend_one_and_reads_no_further_than_length(dtype):
    rng = np.random.default_rng(1)
    B, H, S, D = 3, 4, 40, 32
    q = jnp.asarray(2 * rng.standard_normal((B, H, D), dtype=np.float32), dtype)
    k = jnp.asarray(rng.standard_normal((B, H, S, D), dtype=np.float32), dtype)
    v = jnp.asarray(rng.standard_normal((B, H, S, D), dtype=np.float32), dtype)
    valid = jnp.asarray(rng.random((B, S)) > 0.3).at[:, 0].set(True)
    held = (bits(k), bits(v)) if dtype == jnp.bfloat16 else (k, v)  # as DecodeCache holds them
    for n in (1, 17, S):
        ref = attend_one(q, k, v, valid & (jnp.arange(S) < n)[None])
        # Positions >= n hold NaN: reading any of them would show.
        poison = (jnp.arange(S) >= n)[None, None, :, None]
        kk, vv = (jnp.where(poison, bits(jnp.full_like(k, jnp.nan)), h) for h in held) if dtype == jnp.bfloat16 \
            else (jnp.where(poison, jnp.nan, h) for h in held)
        got = jax.jit(cpu_dots.attend)(q, kk, vv, valid, n)
        assert got.shape == (B, H, D) and got.dtype == jnp.float32
        tol = 1e-5 if dtype == jnp.float32 else 1e-2  # the reference is rounded to bfloat16
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref, np.float32), rtol=tol, atol=tol)
    # One mask row for every batch row (the self-attention case).
    ref = attend_one(q, k, v, jnp.ones((1, S), bool))
    got = cpu_dots.attend(q, *held, jnp.ones((1, S), bool), S)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref, np.float32), rtol=tol, atol=tol)


def test_bad_operands_are_refused_with_a_message():
    x = jnp.ones((2, 16))
    with pytest.raises(ValueError, match=r"float32/bfloat16 \[N, 16\]"):
        cpu_dots.rows_dot(x, [jnp.ones((4, 8))])
    with pytest.raises(ValueError, match=r"float32/bfloat16"):
        cpu_dots.rows_dot(x, [jnp.ones((4, 16), jnp.float16)])
    with pytest.raises(ValueError, match="no weights"):
        cpu_dots.rows_dot(x, [])


def test_no_compiler_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DALLE_MINI_JAX_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        cpu_dots.build(["/nonexistent/c++"])
    with pytest.raises(RuntimeError, match="failed"):
        cpu_dots.build(["c++", "-DDMJ_BROKEN=1", "-include", "/nonexistent.h"])
    assert not list(tmp_path.glob("*.so"))  # nothing half-written left in the cache


def test_decode_step_with_cpu_dots_matches_full_sequence():
    """The sampler's threaded layout (dots and attention in cpu_dots): cached decoding
    == teacher-forced decoding, as for the other layouts (test_transformer)."""
    cfg = transformer_preset("tiny").replace(init_std=0.1)
    model = randomize(DalleBart(cfg, rngs=nnx.Rngs(3)), seed=3)
    ids, mask = text_batch(cfg, [cfg.text_len, 7, 2])
    dec = image_batch(cfg, 3)
    enc = model.encode(ids, mask)
    full = model.decode(dec, enc, mask)
    layers = split_decoder_layers(model, parts=1, threaded=True)
    head = OutMajor((model.lm_head[...].T,), threaded=True)
    cache = model.init_cache(enc, mask)
    L = cfg.num_decoder_layers
    cache = dataclasses.replace(cache, self_k=[cache.self_k[l] for l in range(L)],
                                self_v=[cache.self_v[l] for l in range(L)])

    @jax.jit
    def run(cache):
        def step(cache, pos):
            logits, cache = model.decode_step(dec[:, pos], pos, cache, layers, head)
            return cache, logits

        _, steps = jax.lax.scan(step, cache, jnp.arange(cfg.image_len, dtype=jnp.int32))
        return jnp.swapaxes(steps, 0, 1)

    hlo = run.lower(cache).as_text()
    assert cpu_dots.TARGET in hlo and cpu_dots.ATTEND_TARGET in hlo and cpu_dots.GLU_TARGET in hlo
    err = rel_err(run(cache), full)
    assert err < 1e-5, f"cached (cpu_dots) vs full: relative error {err:.2e}"


def test_sampler_picks_cpu_dots_by_size_and_gives_the_same_images():
    cfg = transformer_preset("tiny")
    assert dot_layout(None, jnp.float32, step_bytes=10**9) == (1, True)
    assert dot_layout(None, jnp.float32, step_bytes=10**6)[1] is False  # small: XLA's dots
    assert dot_layout(None, jnp.float16, step_bytes=10**9)[1] is False  # no f16 kernel
    model = DalleBart(cfg, rngs=nnx.Rngs(0))
    ids, mask = (np.asarray(a) for a in text_batch(cfg, [9, 2]))
    keys = image_keys(0, ["p", "p"], [0, 1])
    settings = SamplingSettings(top_k=8, guidance=3.0)
    tokens = []
    for kernels in (False, True):
        sampler = TokenSampler(model, cpu_kernels=kernels)
        assert all(w.threaded == kernels for w in jax.tree.leaves(
            sampler._layers, is_leaf=lambda x: isinstance(x, OutMajor)) if isinstance(w, OutMajor))
        state = sampler.start(ids, mask, np.zeros(2, np.int32), 1)
        tokens.append(np.asarray(sampler.run(state, keys, 0, cfg.image_len, settings).tokens))
    np.testing.assert_array_equal(tokens[0], tokens[1])


def test_fold_cross_attention_is_the_attention_it_folds():
    """The folded products give the attention's logits and its output through the o
    kernel, per head, for keys/values of any U positions."""
    from dalle_mini_jax.attention import attention_weights
    from dalle_mini_jax.transformer import fold_cross_attention

    rng = np.random.default_rng(5)
    H, K, D, U, B = 4, 16, 64, 7, 3
    q, o = (rng.standard_normal(s, dtype=np.float32) for s in ((H * K, D), (D, H * K)))  # out-major
    k, v = (rng.standard_normal((U, H, K), dtype=np.float32) for _ in range(2))
    x = rng.standard_normal((B, D), dtype=np.float32)
    qk, vo = fold_cross_attention(jnp.asarray(q), jnp.asarray(o), jnp.asarray(k), jnp.asarray(v))
    assert qk.shape == (H * U, D) and vo.shape == (D, H * U)
    heads = (x @ q.T).reshape(B, 1, H, K)
    want = np.asarray(attention_weights(heads, np.broadcast_to(k, (B, U, H, K)), None))[:, :, 0]  # [B, H, U]
    logits = np.asarray(jnp.asarray(x) @ qk.T).reshape(B, H, U)
    got = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(got / got.sum(-1, keepdims=True), want, rtol=1e-4, atol=1e-6)
    out = np.einsum("bhu,uhk->bhk", want, v).reshape(B, H * K) @ o.T
    np.testing.assert_allclose(np.asarray(jnp.asarray(want.reshape(B, H * U)) @ vo.T), out, rtol=1e-4, atol=1e-4)


def test_sampler_folds_the_cross_attention_with_the_same_images():
    """Folded (`fold_cross=True`: the tiny model's head size is too small to gain, so it
    is forced) against the plain cross-attention: two prompts of different lengths and
    the unconditional one, four images; same step logits, same tokens, and each row
    attends only to its own prompt's real tokens. (Four images: jit's cache is shared by
    samplers of one architecture, and test_sampling counts the traces of three.)"""
    cfg = transformer_preset("tiny")
    model = DalleBart(cfg, rngs=nnx.Rngs(0))
    randomize(model, 3)
    ids, mask = (np.asarray(a) for a in text_batch(cfg, [9, 4, 2]))
    rows, keys = np.asarray([0, 1, 1, 0], np.int32), image_keys(0, ["a", "b", "b", "a"], [0, 0, 1, 1])
    settings = SamplingSettings(top_k=8, guidance=3.0)
    logits, tokens = {}, {}
    for fold in (False, True):
        sampler = TokenSampler(model, cpu_kernels=True, fold_cross=fold)
        state = sampler.start(ids, mask, rows, 2)
        assert (state.cache.cross_qk is not None) == fold and (state.cache.cross_k is None) == fold
        valid = np.asarray(state.cache.cross_valid) if fold else None  # `run` consumes the state
        fed = jnp.concatenate([state.last, state.last])
        logits[fold] = np.asarray(sampler.decode_step(model, fed, jnp.int32(0), state.cache)[0])
        tokens[fold] = np.asarray(sampler.run(state, keys, 0, cfg.image_len, settings).tokens)
    assert rel_err(logits[True], logits[False]) < 1e-5
    np.testing.assert_array_equal(tokens[True], tokens[False])
    cols, col_valid = sampler.fold_plan(mask)
    assert cols.shape == (16, 2) and col_valid.sum() == 15  # 9 + 4 + 2 real tokens
    assert valid.shape == (8, 16)  # rows: images 0-3, then their unconditional rows
    for r, text_row in enumerate([0, 1, 1, 0, 2, 2, 2, 2]):
        np.testing.assert_array_equal(np.flatnonzero(valid[r]), np.flatnonzero(col_valid & (cols[:, 0] == text_row)))


def test_folded_image_does_not_depend_on_the_other_prompts():
    """Folded, a prompt's columns sit at other offsets among more positions when other
    prompts share the call (U 16 alone, 32 with two more): its image stays the same."""
    cfg = transformer_preset("tiny")
    model = DalleBart(cfg, rngs=nnx.Rngs(0))
    randomize(model, 4)
    sampler = TokenSampler(model, cpu_kernels=True, fold_cross=True)
    ids, mask = (np.asarray(a) for a in text_batch(cfg, [5, 9, 7, 2], seed=3))  # B, A, C, unconditional
    settings = SamplingSettings(top_k=8, guidance=3.0)

    def image_of_a(text_rows):
        sub = [*text_rows, 3]
        state = sampler.start(ids[sub], mask[sub], np.asarray([text_rows.index(1)], np.int32), len(text_rows))
        assert state.cache.cross_valid.shape[1] == (16 if len(text_rows) == 1 else 32)
        return np.asarray(sampler.run(state, image_keys(0, ["A"], [0]), 0, cfg.image_len, settings).tokens)[0]

    np.testing.assert_array_equal(image_of_a([0, 1, 2]), image_of_a([1]))


def test_folded_programs_compile_once_per_step_of_positions():
    """The prompts' token counts are a shape of a folded program only in steps of 16:
    compiled ahead for 9 real tokens (+2 unconditional), a start and run with 12 trace
    nothing; two prompts (9 + 9 + 2 = 20 positions) are the next program."""
    from dalle_mini_jax import sampling

    cfg = transformer_preset("tiny")
    model = DalleBart(cfg, rngs=nnx.Rngs(0))
    sampler = TokenSampler(model, cpu_kernels=True, fold_cross=True)
    settings = SamplingSettings(top_k=5, guidance=2.0)
    rows, keys = np.zeros(1, np.int32), image_keys(0, ["a"], [0])

    def inputs(*lengths):
        ids, mask = text_batch(cfg, list(lengths) + [2])
        return np.asarray(ids), np.asarray(mask)

    sampler.compile_ahead(*inputs(9), rows, 1, keys, settings)
    before = dict(sampling.TRACE_COUNTS)
    state = sampler.start(*inputs(12), rows, 1)
    assert state.cache.cross_valid.shape == (2, 16)
    sampler.run(state, keys, 0, 4, settings)
    assert dict(sampling.TRACE_COUNTS) == before
    state = sampler.start(*inputs(9, 9), rows, 2)
    assert state.cache.cross_valid.shape == (2, 32)
    sampler.run(state, keys, 0, 4, settings)
    assert sampling.TRACE_COUNTS["start"] == before["start"] + 1 and sampling.TRACE_COUNTS["run"] == before["run"] + 1


def test_fold_plan_folds_when_it_reads_at_most_half():
    """By default a sampler folds when the prompts' real tokens, in steps of 16, are at
    most half a head's size (DALL-E Mini's 64: up to 32 tokens, the unconditional
    prompt's included), only for threaded float32 kernels; `fold_cross=False` never."""
    cfg = transformer_preset("shapes")  # head size 64, as DALL-E Mini
    model = DalleBart(cfg, rngs=nnx.Rngs(0))

    def mask(*lengths):
        return np.asarray(text_batch(cfg, list(lengths))[1])

    sampler = TokenSampler(model, cpu_kernels=True)
    assert sampler.fold_plan(mask(9, 2))[0].shape == (16, 2)
    assert sampler.fold_plan(mask(14, 2))[0].shape == (16, 2)
    assert sampler.fold_plan(mask(15, 2))[0].shape == (32, 2)
    assert sampler.fold_plan(mask(20, 10, 2))[0].shape == (32, 2)
    assert sampler.fold_plan(mask(31, 2)) is None
    assert TokenSampler(model, cpu_kernels=True, fold_cross=False).fold_plan(mask(9, 2)) is None
    assert TokenSampler(model, cpu_kernels=False).fold_plan(mask(9, 2)) is None  # XLA's dots: not folded
    bf16 = DalleBart(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert TokenSampler(bf16, cpu_kernels=True).fold_plan(mask(9, 2)) is None


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(cpu_dots, "_state", {})
    monkeypatch.setenv("DALLE_MINI_JAX_CPU_DOTS", "0")
    assert not cpu_dots.available() and "DALLE_MINI_JAX_CPU_DOTS=0" in cpu_dots.reason()
    assert dot_layout(None, jnp.float32, step_bytes=10**9)[1] is False
    with pytest.raises(RuntimeError, match="not available"):
        cpu_dots.rows_dot(jnp.ones((2, 16)), [jnp.ones((4, 16))])


@pytest.mark.parametrize("wdtype", [jnp.float32, jnp.bfloat16])
def test_gelu_glu_matches_gelu_times_value(wdtype):
    """One call for a GLU's gate and value products and gelu(gate) * value; row counts
    and sizes that leave a partial vector at the end (M * N not a multiple of 16)."""
    rng = np.random.default_rng(7)
    for m in (1, 2, 5):
        x = rng.standard_normal((m, 83), dtype=np.float32)
        gate, value = (jnp.asarray(rng.standard_normal((37, 83), dtype=np.float32), wdtype) for _ in range(2))
        y = jax.jit(cpu_dots.gelu_glu)(x, gate, value)
        g, v = _reference(x, gate), _reference(x, value)
        want = 0.5 * g * np.vectorize(math.erfc)(-g / math.sqrt(2)) * v
        assert y.shape == (m, 37) and y.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=2e-5 * np.abs(v).max())
    with pytest.raises(ValueError, match="alike"):
        cpu_dots.gelu_glu(x, gate, value[:5])


def test_erf_of_the_glu_is_accurate():
    """gelu(g) * 1 over a range of g, against math.erfc in float64: within 1.2e-6."""
    g = np.linspace(-9, 9, 4001, dtype=np.float32)
    x = np.eye(1, dtype=np.float32)
    y = np.asarray(cpu_dots.gelu_glu(x, jnp.asarray(g[:, None]), jnp.ones((g.size, 1))))[0]
    want = 0.5 * g.astype(np.float64) * np.vectorize(math.erfc)(-g.astype(np.float64) / math.sqrt(2))
    assert np.abs(y - want).max() < 1.2e-6


@pytest.mark.parametrize("src", [np.float32, jnp.bfloat16, np.float16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_host_table_rows_read_natively_as_host_rows(src, dtype):
    """`HostTable(native)` reads rows in compiled code, rounded to the model's dtype
    exactly as the Python callback (`host_rows`) does; a bad id or a dropped table fails
    with a message naming it."""
    class Owner:
        pass

    rng = np.random.default_rng(3)
    table = (rng.standard_normal((50, 32)) * 3).astype(src)
    owner = Owner()
    host = HostTable.register(owner, table, dtype, native=True)
    assert host.native
    ids = jnp.asarray([0, 49, 7, 7], jnp.int32)
    got = np.asarray(jax.jit(lambda t, i: t.rows(i))(host, ids))
    np.testing.assert_array_equal(got, host_rows(table, np.asarray(ids), dtype))
    with pytest.raises(Exception, match="token id 50 outside the table's 50 rows"):
        np.asarray(jax.jit(lambda t, i: t.rows(i))(host, jnp.asarray([50], jnp.int32)))
    del owner  # the finalizer forgets the table: compiled code must not read it any more
    import gc

    gc.collect()
    with pytest.raises(Exception, match="no host table registered"):
        np.asarray(jax.jit(lambda t, i: t.rows(i))(host, ids))


@pytest.mark.parametrize("with_scale", [True, False])
def test_products_of_a_layer_norm_of_x(with_scale):
    """`norm=`: x is LayerNormed (with or without a scale) before the products, as
    `transformer.layer_norm` does, in rows_dot and gelu_glu alike."""
    from dalle_mini_jax.transformer import layer_norm

    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 83), dtype=np.float32) * 4 + 1
    norm = {"bias": jnp.asarray(rng.standard_normal(83, dtype=np.float32))}
    if with_scale:
        norm["scale"] = jnp.asarray(rng.standard_normal(83, dtype=np.float32))
    weights = (norm["bias"], norm.get("scale"))
    xn = np.asarray(layer_norm(jnp.asarray(x), norm, 1e-5))
    ws = [rng.standard_normal((n, 83), dtype=np.float32) for n in (5, 40)]
    for w, y in zip(ws, cpu_dots.rows_dot(x, ws, norm=weights, eps=1e-5)):
        np.testing.assert_allclose(np.asarray(y), _reference(xn, w), rtol=1e-5, atol=1e-4)
    g, v = ws[1], rng.standard_normal((40, 83), dtype=np.float32)
    y = cpu_dots.gelu_glu(x, jnp.asarray(g), jnp.asarray(v), norm=weights, eps=1e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(cpu_dots.gelu_glu(xn, jnp.asarray(g), jnp.asarray(v))),
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"norm's bias must be float32 \[83\]"):
        cpu_dots.rows_dot(x, ws, norm=(jnp.zeros(82), None))
    # `post=` and `residual=`: a residual branch's residual + post_norm(norm(x) @ W^T).
    post = {"bias": jnp.asarray(rng.standard_normal(40, dtype=np.float32))}
    if with_scale:
        post["scale"] = jnp.asarray(rng.standard_normal(40, dtype=np.float32))
    h = rng.standard_normal((3, 40), dtype=np.float32)
    want = h + np.asarray(layer_norm(jnp.asarray(_reference(xn, ws[1]), jnp.float32), post, 1e-5))
    for pre, xi in ((weights, x), (None, xn)):
        y = cpu_dots.rows_dot(xi, ws[1:], norm=pre, eps=1e-5, post=(post["bias"], post.get("scale")), residual=h)[0]
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)
    y = cpu_dots.rows_dot(x, ws[1:], norm=weights, eps=1e-5, residual=h)[0]  # the add alone
    np.testing.assert_allclose(np.asarray(y), h + _reference(xn, ws[1]), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"post-norm's bias must be float32 \[40\]"):
        cpu_dots.rows_dot(x, ws[1:], post=(jnp.zeros(83), None))
    with pytest.raises(ValueError, match="take one weight"):
        cpu_dots.rows_dot(x, ws, residual=jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"residual must be float32 \[3, 40\]"):
        cpu_dots.rows_dot(x, ws[1:], residual=jnp.zeros((3, 5)))


def _narrower_builds() -> list[tuple[str, int]]:
    """(compiler flag, vector bytes) for each width narrower than this machine's kernel
    that an x86 compiler can build here (a later -mno-* overrides -march=native)."""
    if platform.machine() not in ("x86_64", "AMD64") or not cpu_dots.available():
        return []
    return [(flag, width) for flag, width in (("-mno-avx512f", 32), ("-mno-avx", 16))
            if width < cpu_dots.vector_bytes()]


@pytest.mark.parametrize("flag,width", _narrower_builds())
def test_narrower_vectors_compute_the_same(flag, width, tmp_path):
    """The kernel's vectors are as wide as the machine's registers, so CI runs only its
    own width: here the kernel is built with narrower ones (16 bytes: SSE, the width of
    NEON on ARM laptops; 32: AVX2 on an AVX-512 machine) and the product, attention,
    GLU and norm tests run against it in a fresh process."""
    env = dict(os.environ, CXX=f"{os.environ.get('CXX', 'c++')} {flag}", DALLE_MINI_JAX_CACHE=str(tmp_path))
    tests = "rows_dot_matches or attend_matches or gelu_glu_matches or erf_of or layer_norm_of_x"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
    (lib,) = tmp_path.glob("cpu_dots-*.so")
    assert ctypes.CDLL(str(lib)).DmjVectorBytes() == width


def test_rate_benchmark_reports_the_products_read_rate(capsys):
    """benchmarks/cpu_dots_rate.py on small weights: its JSON line, every rate positive,
    the time consistent with the rate and the bytes it read."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cpu_dots_rate

    assert cpu_dots_rate.main(["--rows", "2", "5", "--weights", "3", "--shape", "40", "24", "--runs", "2",
                               "--gib", "0.004", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["vector_bytes"] == cpu_dots.vector_bytes() and out["weights"] == 3
    assert set(out["rows"]) == {"2", "5"}
    for r in out["rows"].values():
        assert r["ms"] > 0 and r["gb_s"] > 0 and r["plain_gb_s"] > 0
        assert r["gb_s"] == pytest.approx(3 * 40 * 24 * 4 / (r["ms"] / 1e3) / 1e9)
        assert r["plain_over_kernel"] == pytest.approx(r["plain_gb_s"] / r["gb_s"])


def test_ab_benchmark_times_versions_in_one_process(tmp_path, capsys):
    """benchmarks/cpu_dots_ab.py on small weights: two copies of this kernel (f32 weights;
    bf16 ones on both kinds of pages) give the same products and a JSON line with every
    version on every set of weights; a version whose products differ is refused, naming it."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cpu_dots_ab

    source = cpu_dots.SOURCE.read_text()
    wrong = tmp_path / "wrong.cc"
    line = "      y[(m0 + c) * N + n + i] = s;"
    assert line in source
    wrong.write_text(source.replace(line, "      y[(m0 + c) * N + n + i] = s + 1.f;"))
    small = ["--weights", "3", "--shape", "40", "24", "--rounds", "2", "--json"]
    both = ["a 4k", "a huge", "b 4k", "b huge"]
    for dtype, pages, names, threads in (("float32", "4k", ["a", "b"], cpu_dots.cpu_cores()),
                                         ("bfloat16", "both", both, 1)):
        assert cpu_dots_ab.main([f"a={cpu_dots.SOURCE}", f"b={cpu_dots.SOURCE}", "--dtype", dtype, "--pages", pages,
                                 *small, *(["--threads", "1"] if threads == 1 else [])]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert list(out["versions"]) == names and out["dtype"] == dtype and out["threads"] == threads
        assert list(out["plain_gb_s"]) == pages.replace("both", "4k huge").split()
        assert min(out["plain_gb_s"].values()) > 0 and out["versions"][names[0]]["time_over_first"] == 1.0
        for r in out["versions"].values():
            assert r["gb_s"] > 0 and r["plain_over_kernel"] > 0
    assert cpu_dots_ab.main([str(cpu_dots.SOURCE), f"wrong={wrong}", *small]) == 1
    assert "MISMATCH wrong" in capsys.readouterr().err
