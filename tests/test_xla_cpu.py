"""XLA:CPU options: YNNPACK takes the dots and no reduction, on a CPU only, off on
request, and a jaxlib that does not know the option gets none (not an abort)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dalle_mini_jax import xla_cpu


def _dense_norm(x, w):
    """A dot followed by a layer norm's reductions: what a transformer layer is made of."""
    h = x @ w
    h = h - h.mean(-1, keepdims=True)
    return h / jnp.sqrt((h * h).mean(-1, keepdims=True) + 1e-5)


def test_cpu_option_gives_ynnpack_the_dots_and_no_reduction():
    opts = xla_cpu.compiler_options("cpu")
    assert opts == xla_cpu.CPU_LIBRARY_OPTIONS  # this project's jaxlib has it
    assert xla_cpu.compiler_options("gpu") == {} and xla_cpu.compiler_options("tpu") == {}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 128), np.float32)
    w = rng.standard_normal((128, 384), np.float32)
    f = jax.jit(_dense_norm, compiler_options=opts)
    fusions = xla_cpu.library_fusions(f.lower(x, w).compile().as_text())
    assert sum(n for (kind, ops), n in fusions.items() if "dot" in ops) >= 1
    assert not [ops for (kind, ops) in fusions if "reduce" in ops], fusions
    h = x.astype(np.float64) @ w
    h -= h.mean(-1, keepdims=True)
    np.testing.assert_allclose(f(x, w), h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-5),
                               rtol=1e-4, atol=1e-4)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(xla_cpu.ENV_SWITCH, "0")
    assert xla_cpu.compiler_options("cpu") == {}


def test_a_jaxlib_without_the_option_gets_none(monkeypatch):
    monkeypatch.setattr(xla_cpu, "CPU_LIBRARY_OPTIONS", {"xla_cpu_no_such_option": "1"})
    xla_cpu._supported.cache_clear()
    try:
        assert xla_cpu.compiler_options("cpu") == {}
    finally:
        xla_cpu._supported.cache_clear()
