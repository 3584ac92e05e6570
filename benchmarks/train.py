"""Training throughput and model FLOP utilisation (MFU) against this machine's matmul peak.

    python benchmarks/train.py                      # tiny, shapes, bundled, d512 (the issue's table)
    python benchmarks/train.py --models d512 --batch 16 --steps 10
    python benchmarks/train.py --models bundled --steps 20 --cpu-libraries both   # xla_cpu.py's option

`--cpu-libraries both` times every model twice in the same process, with XLA's defaults
(`DALLE_MINI_JAX_CPU_LIBRARIES=0`) and with the trainer's XLA:CPU option (YNNPACK for dots
only, `dalle_mini_jax/xla_cpu.py`), one after the other, and prints the ratio of the medians.

For each model one jitted `train_step` (the trainer's own: AdamW, clipping, f32 loss)
runs on a one-device mesh with random data; the step time is the median over timed
steps after warmup. The peak is a large float32 `jnp.dot` timed in the same process,
before and after every model (median of all), so MFU compares like with like on a
machine whose speed varies with its load.

Model FLOPs per example (forward; training = 3x forward, backward = 2x; no remat):
  2 x (matmul parameters x the tokens each is applied to):
    encoder  T x Le x (4 D^2 + M D F)          q, k, v, o + the MLP (M = 3 with GLU, else 2)
    decoder  S x Ld x (6 D^2 + M D F)          self q, k, v, o; cross q, o; MLP
             T x Ld x 2 D^2                    cross k, v on the encoder output
    lm_head  S x D x V
  + attention scores and values, as computed (the causal square is computed in full):
    Le x 4 T^2 D + Ld x (4 S^2 D + 4 S T D)
Not counted: embedding gathers, norms, softmax, GELU, the optimizer (all memory-bound).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dalle_mini_jax import xla_cpu
from dalle_mini_jax.config import DalleBartConfig, transformer_preset
from dalle_mini_jax.sharding import make_mesh
from dalle_mini_jax.train_config import DataConfig, OptimizerConfig, TrainConfig
from dalle_mini_jax.train_state import build, step_rng

MODELS = {
    "tiny": transformer_preset("tiny"),
    "shapes": transformer_preset("shapes"),
    # the bundled model's shape (training/configs/bundled_shapes.py, 1.9 M parameters)
    "bundled": DalleBartConfig.load(Path(__file__).resolve().parents[1] / "dalle_mini_jax" / "bundled"
                                    / "model" / "config.json"),
    # DALL·E Mini at half width and half depth: d=512, 6+6 layers, the released vocabularies.
    "d512": DalleBartConfig(embed_dim=512, num_heads=8, mlp_dim=1536, num_encoder_layers=6,
                            num_decoder_layers=6, text_vocab_size=50264, image_vocab_size=16384,
                            text_len=64, image_len=256),
}


def model_flops_per_example(cfg: DalleBartConfig) -> float:
    """Training FLOPs for one example (see the module docstring)."""
    D, F, T, S = cfg.embed_dim, cfg.mlp_dim, cfg.text_len, cfg.image_len
    Le, Ld, V = cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.decoder_vocab_size
    M = 3 if cfg.use_glu else 2
    matmul_params_x_tokens = (T * Le * (4 * D * D + M * D * F)
                              + S * Ld * (6 * D * D + M * D * F) + T * Ld * 2 * D * D + S * D * V)
    attention = Le * 4 * T * T * D + Ld * (4 * S * S * D + 4 * S * T * D)
    return 3.0 * (2.0 * matmul_params_x_tokens + attention)


def matmul_peak(n: int = 2048, repeats: int = 7) -> float:
    """Median FLOP/s of an n x n float32 matmul (the machine's practical peak)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def time_train_step(model_cfg: DalleBartConfig, batch_size: int, steps: int, warmup: int,
                    compute_dtype: str = "float32") -> dict:
    """Median seconds per update of the trainer's jitted step, on one device."""
    cfg = TrainConfig(model=model_cfg, batch_size=batch_size, steps=1000, compute_dtype=compute_dtype,
                      optimizer=OptimizerConfig(lr=1e-4, warmup_steps=10), data=DataConfig(blank_caption_prob=0.1))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    T, S = model_cfg.text_len, model_cfg.image_len
    uncond = (np.array([0, 2] + [1] * (T - 2), np.int32), np.array([1, 1] + [0] * (T - 2), np.int32))
    t0 = time.perf_counter()
    fns, _, init = build(cfg, model_cfg, mesh, uncond)
    state = init()
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(3, model_cfg.text_vocab_size, (1, batch_size, T), dtype=np.int32),
        "attention_mask": np.ones((1, batch_size, T), np.int32),
        "labels": rng.integers(0, model_cfg.image_vocab_size, (1, batch_size, S), dtype=np.int32),
    }
    batch = jax.device_put(batch, fns.batch_sharding)
    key = step_rng(np.asarray(jax.random.key_data(jax.random.key(0))), 0)
    for _ in range(warmup):
        state, metrics = fns.train_step(state, batch, key)
    jax.block_until_ready(metrics)
    setup = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = fns.train_step(state, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    # What the step hands to kernel libraries (xla_cpu.py), from the compiled program.
    fusions = xla_cpu.library_fusions(fns.train_step.lower(state, batch, key).compile().as_text())
    return {"step_s": statistics.median(times), "min_step_s": min(times), "setup_s": setup,
            "params": n_params, "loss": float(metrics["loss"]),
            "library_fusions": sum(fusions.values()),
            "library_fusions_with_reduce": sum(n for (_, ops), n in fusions.items() if "reduce" in ops)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch per model (default: tiny 64, shapes 32, bundled 32, d512 16)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--cpu-libraries", default="on", choices=["on", "off", "both"],
                   help="the trainer's XLA:CPU option (xla_cpu.py): on (the trainer's default), "
                        "off (XLA's defaults), or both, one after the other (default on)")
    args = p.parse_args(argv)
    defaults = {"tiny": 64, "shapes": 32, "bundled": 32, "d512": 16}
    batches = args.batch or [defaults[m] for m in args.models]
    if len(batches) == 1:
        batches = batches * len(args.models)

    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cpus, dtype {args.dtype}",
          flush=True)
    peaks = [matmul_peak()]
    rows = []
    settings = {"on": ["on"], "off": ["off"], "both": ["off", "on"]}[args.cpu_libraries]
    for name, batch in zip(args.models, batches):
        cfg = MODELS[name]
        for libs in settings:
            os.environ[xla_cpu.ENV_SWITCH] = "1" if libs == "on" else "0"  # read by build()
            r = time_train_step(cfg, batch, args.steps, args.warmup, args.dtype)
            peaks.append(matmul_peak())
            flops = model_flops_per_example(cfg) * batch
            rows.append(dict(model=name, libs=libs, batch=batch, params=r["params"],
                             step_ms=1e3 * r["step_s"],
                             image_tokens_per_s=batch * cfg.image_len / r["step_s"],
                             all_tokens_per_s=batch * (cfg.image_len + cfg.text_len) / r["step_s"],
                             model_gflops_per_step=flops / 1e9, achieved_gflops=flops / r["step_s"] / 1e9,
                             setup_s=r["setup_s"], loss=r["loss"], library_fusions=r["library_fusions"],
                             library_fusions_with_reduce=r["library_fusions_with_reduce"]))
            print(f"  {name} (cpu libraries {libs}): batch {batch}, {1e3 * r['step_s']:.1f} ms/step "
                  f"(setup {r['setup_s']:.0f} s, loss {r['loss']:.6f}; kernel-library fusions "
                  f"{r['library_fusions']}, {r['library_fusions_with_reduce']} of them with a reduce), "
                  f"matmul peak now {peaks[-1] / 1e9:.1f} GFLOP/s", flush=True)
    peak = statistics.median(peaks)
    print(f"matmul peak (f32 2048^3 dot, median of {len(peaks)} measurements): {peak / 1e9:.1f} GFLOP/s "
          f"[{', '.join(f'{x / 1e9:.1f}' for x in peaks)}]")
    print(f"{'model':8} {'libs':>4} {'batch':>5} {'params':>10} {'step ms':>9} {'img tok/s':>10} {'tok/s':>10} "
          f"{'GFLOP/step':>10} {'GFLOP/s':>8} {'MFU':>6}")
    for r in rows:
        r["mfu"] = r["achieved_gflops"] * 1e9 / peak
        print(f"{r['model']:8} {r['libs']:>4} {r['batch']:5d} {r['params']:10,d} {r['step_ms']:9.1f} "
              f"{r['image_tokens_per_s']:10.0f} {r['all_tokens_per_s']:10.0f} {r['model_gflops_per_step']:10.2f} "
              f"{r['achieved_gflops']:8.1f} {100 * r['mfu']:5.1f}%")
    if args.cpu_libraries == "both":
        for off, on in zip(rows[::2], rows[1::2]):
            print(f"{on['model']}: the XLA:CPU option makes a step {off['step_ms'] / on['step_ms']:.2f}x "
                  f"as fast ({off['step_ms']:.1f} -> {on['step_ms']:.1f} ms; loss {off['loss']:.6f} vs "
                  f"{on['loss']:.6f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "peaks": peaks, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
