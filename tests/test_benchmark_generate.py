"""benchmarks/generate.py's own arithmetic: the bandwidth it measures and the floor it derives."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import generate  # noqa: E402  (benchmarks/generate.py)


def test_memory_bandwidth_takes_the_fastest_read_kernel():
    bw = generate.memory_bandwidth(gib=1 / 256, repeats=2, threads=2)
    kernels = {k: v for k, v in bw.items() if k not in ("best", "threads")}
    assert set(kernels) == {"numpy_sum", "numpy_max", "xla_sum"}
    assert all(v > 0 for v in kernels.values())
    assert bw["best"] == max(kernels.values())
    assert bw["threads"] == 2


def test_floor_is_step_bytes_over_the_best_bandwidth():
    from dalle_mini_jax.config import TRANSFORMER_PRESETS

    cfg = TRANSFORMER_PRESETS["mini"]
    step_bytes = generate.decoder_step_bytes(cfg, 4)
    bw = {"numpy_sum": 10e9, "numpy_max": 20e9, "xla_sum": 25e9, "best": 25e9, "threads": 2}
    args = argparse.Namespace(preset="mini", dtype="float32", runs=3)
    r = {"ours1": {"step_ms": 62.0, "total_s": 20.0, "vqgan_s_per_image": 1.0, "first_call_s": 30.0,
                   "weights_mb": 1.0, "peak_rss_mb": 2000.0, "weights_dtype": "float32"},
         "md1": {"total_s": 30.0, "peak_rss_mb": 3000.0, "weights_dtype": "float32"}}
    s = generate.summarize(args, r, bw, step_bytes, md_runs=3)
    assert s["floor_step_ms"] == pytest.approx(step_bytes / 25e9 * 1e3)
    assert s["step_over_floor"] == pytest.approx(62.0 / s["floor_step_ms"])
    assert s["bandwidth_gb_s"] == pytest.approx(25.0)
    assert s["bandwidth_kernels_gb_s"] == pytest.approx({"numpy_sum": 10.0, "numpy_max": 20.0, "xla_sum": 25.0})
    assert s["speedup_1"] == pytest.approx(1.5) and s["speedup_grid"] is None
    # peak_rss_mb is MiB; the same peak in decimal GB and in GiB, null where not run.
    assert s["peak_rss_gb"]["ours1"] == pytest.approx(2000 * 2**20 / 1e9) and s["peak_rss_gb"]["mdgrid"] is None
    assert s["peak_rss_gib"]["md1"] == pytest.approx(3000 / 1024)
    # DALL-E Mini fp32: 12 layers of 6 D^2 + 3 D F (+ norms) and lm_head, 772 MB a step.
    assert step_bytes / 1e6 == pytest.approx(772, abs=1)
    assert generate.step_bytes(cfg, "float32") == step_bytes == 2 * generate.step_bytes(cfg, "bfloat16")
    assert s["step_over_floor_paired"] is None  # no paired loops given


def test_paired_steps_take_each_loop_against_the_faster_read_around_it(monkeypatch):
    reads = iter([20e9, 25e9, 10e9, 30e9])  # before loop 1, after 1 / before 2, after 2 / before 3, after 3
    monkeypatch.setattr(generate, "memory_bandwidth", lambda: {"best": next(reads)})
    loops = iter([0.5, 0.6, 0.7])
    times, floors = generate.paired_steps(lambda: next(loops), 10**9, runs=3)
    assert times == [0.5, 0.6, 0.7]
    assert floors == pytest.approx([1e9 / 25e9 * 1e3, 1e9 / 25e9 * 1e3, 1e9 / 30e9 * 1e3])
    args = argparse.Namespace(preset="mini", dtype="float32", runs=3)
    r = {"ours1": {"step_ms": 40.0, "total_s": 20.0, "vqgan_s_per_image": 1.0, "first_call_s": 30.0,
                   "weights_mb": 1.0, "peak_rss_mb": 2000.0, "weights_dtype": "float32",
                   "paired_step_ms": [40.0, 44.0, 36.0], "paired_floor_ms": floors}}
    s = generate.summarize(args, r, {"best": 25e9, "threads": 2}, 10**9, md_runs=3)
    # ratios 1.0, 1.1, 1.08: the median
    assert s["step_over_floor_paired"] == pytest.approx(36.0 / floors[2])
    assert s["paired_floor_ms"] == floors
    assert s["step_over_read_floor_paired"] is None and s["folded_positions"] is None
    # A folded step reads 0.8 of the bytes: each loop's ratio against its own floor is 1 / 0.8 that.
    r["ours1"].update(read_bytes=8 * 10**8, folded_positions=16)
    s = generate.summarize(args, r, {"best": 25e9, "threads": 2}, 10**9, md_runs=3)
    assert s["step_over_read_floor_paired"] == pytest.approx(36.0 / floors[2] / 0.8)
    assert s["step_read_mb"] == pytest.approx(800) and s["folded_positions"] == 16


def test_read_step_bytes_counts_the_folded_cross_attention():
    """DALL-E Mini fp32, one guided 9-token prompt (16 positions): each layer reads two
    1 MiB folded matrices instead of its two 4 MiB q and o kernels."""
    from dalle_mini_jax.config import TRANSFORMER_PRESETS

    cfg = TRANSFORMER_PRESETS["mini"]
    full = generate.step_bytes(cfg, "float32")
    assert generate.read_step_bytes(cfg, "float32", None) == full
    assert full - generate.read_step_bytes(cfg, "float32", 16) == 12 * 2 * (4 * 2**20 - 2**20)
    assert generate.read_step_bytes(cfg, "float32", 16) / 1e6 == pytest.approx(697, abs=1)
    # bf16 kernels (2 bytes a weight) against float32 folded matrices
    assert generate.step_bytes(cfg, "bfloat16") - generate.read_step_bytes(cfg, "bfloat16", 16) == 12 * 2 * 2**20
