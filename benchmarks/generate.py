"""Generation speed and memory: ours vs min-dalle on the same random weights, vs the bandwidth floor.

    python benchmarks/generate.py --preset tiny            # minutes; for development
    python benchmarks/generate.py --preset mini --json     # DALL·E Mini shape: heavy (~30 min on 2 cores)
    python benchmarks/generate.py --preset mini --only ours --dtype bfloat16 --json  # bf16 memory

What it does, in one run:
  1. writes a random model directory of the preset's shape (released format: transformer
     + tokenizer trained on a few captions + VQGAN) into a temp dir (`--workdir` to keep it);
  2. measures the machine's memory read bandwidth: the fastest of three reads of a 1 GiB
     array with all cores (numpy's sum, numpy's max, XLA's sum; medians;
     `memory_bandwidth`, `--bandwidth-only` to run just that);
  3. runs each configuration in its own subprocess, so each peak RSS is its own
     (VmHWM of that process, loading included):
       ours1: ours 1 image, oursgrid: ours 3x3 grid (one batch of 9),
       md1: min-dalle 1 image, mdgrid: min-dalle 3x3 grid (`--only` picks some);
     each one warm-up then `--runs` timed runs (median reported). Ours loads its weights
     in `--dtype` (the child checks that every weight it holds is in it). min-dalle runs
     its own `MinDalle.generate_images` code path with its own torch modules in fp32, on
     our weights mapped in by `dalle_mini_jax.min_dalle_compat` (reference §2.3), no
     download;
  4. prints a table; with --json the last line is one JSON object, with every key present
     whichever configurations ran (null for those that did not); `peak_rss_mb` and
     `peak_rss_dtype` map each configuration to its peak and its weights' dtype.

Units: `peak_rss_mb` and `weights_mb` are MiB (2^20 bytes; /proc reports kB = KiB),
whatever the "mb" in the names required by issue 3; `peak_rss_gb` is the same peak in
decimal GB (10^9 bytes) and `peak_rss_gib` in GiB, so a target written in "GB" can be
read either way. `step_bytes_mb` and the bandwidths are decimal (10^6, 10^9 bytes).

The floor of a decode step is (bytes of decoder weights a step must read: every decoder
layer except the cross-attention k/v kernels, plus lm_head) / bandwidth. `step_over_floor`
takes the bandwidth measured at the start of the run (step 2); `step_over_floor_paired`
is the median, over ours1's timed decode loops, of each loop's step against the faster
of the bandwidth reads just before and after that loop (`paired_steps`; the machine's
read rate drifts over minutes). Those reads come after the child's peak RSS is taken.
With float32 weights on a CPU the step reads fewer bytes than its weights: the
cross-attention is folded with the prompt's keys/values (`transformer.fold_cross_attention`;
for this benchmark's 9-token prompt, 697 of the 772 MB). `step_read_mb` is what it reads
and `step_over_read_floor_paired` the paired ratio against those bytes; the floor above
stays the weights' bytes, as issue 3 defines it.

Presets: `mini` / `mega` are the released shapes with the f16/16384 VQGAN. `tiny` is the
tiny transformer widened to min-dalle's hard-coded lengths (64 text, 256 image tokens,
16384 codes) with the same f16/16384 VQGAN, because min-dalle cannot run other shapes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPT = "a red square on a white background"
CAPTIONS = [
    "a red square on a white background", "a blue circle next to a green triangle",
    "two small yellow stars above a black line", "a large purple square and a small orange circle",
] * 8
GRID = 3
TOP_K = 50
GUIDANCE = 10.0


def _configs(preset: str):
    from dalle_mini_jax.config import TRANSFORMER_PRESETS, VQGAN_PRESETS

    vq = VQGAN_PRESETS["f16_16384"]
    if preset == "tiny":
        cfg = TRANSFORMER_PRESETS["tiny"].replace(text_len=64, image_len=256, image_vocab_size=16384)
    else:
        cfg = TRANSFORMER_PRESETS[preset]
    return cfg, vq


def write_model_dir(preset: str, path: Path, seed: int = 0) -> Path:
    """A random released-format model directory of the preset's shape."""
    import jax
    from flax import nnx

    from dalle_mini_jax.text import train_bpe
    from dalle_mini_jax.transformer import DalleBart
    from dalle_mini_jax.vqgan import VQModel

    cfg, vq = _configs(preset)
    cfg = cfg.replace(normalize_text=False)
    if (path / "flax_model.msgpack").exists() and (path / "vqgan" / "flax_model.msgpack").exists():
        return path
    tok = train_bpe(CAPTIONS, vocab_size=400, text_len=cfg.text_len, min_frequency=1)
    # Jitted init: parameters are created straight in their final buffers.
    model = nnx.jit(lambda: DalleBart(cfg, rngs=nnx.Rngs(seed)))()
    model.save_pretrained(path, tokenizer=tok)
    del model
    vqgan = nnx.jit(lambda: VQModel(vq, rngs=nnx.Rngs(seed + 1)))()
    vqgan.save_pretrained(path / "vqgan")
    del vqgan
    jax.clear_caches()
    return path


def memory_bandwidth(gib: float = 1.0, repeats: int = 7, threads: int | None = None) -> dict[str, float]:
    """The machine's memory read bandwidth: bytes/s of the fastest of several reads of a
    `gib` GiB float32 array (median of `repeats` each).

    Kernels, each reading the whole array once with all cores (a decode step reads its
    weights from all of them: the sampler cuts every kernel in one part per core,
    `transformer.OutMajor`):
      numpy_sum, numpy_max: one numpy call per core on one slice each, at once (numpy
        runs each on one thread and releases the GIL);
      xla_sum: `jnp.sum` jitted, which XLA:CPU splits over its own threads.

    Why the fastest, not numpy's sum alone (this function before 2026-12-02): a read
    kernel can be bound by its arithmetic, and then it shows the core, not the memory.
    On the 2-core machine of 2026-12-02 numpy's float32 sum read 14.5-15.8 GB/s with
    both cores, numpy's max 26.3-27.1 and XLA's sum 28.1-28.7 (`python
    benchmarks/generate.py --bandwidth-only`, twice): the sum alone put the floor ~1.8x
    too high. The floor is a bound, so it takes the fastest read measured.

    Returns:
      {kernel: bytes/s} for each kernel, plus "best" (the largest) and "threads".
    """
    from concurrent.futures import ThreadPoolExecutor

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dalle_mini_jax.sampling import cpu_cores

    threads = threads or cpu_cores()
    a = np.ones(int(gib * 2**30) // 4, np.float32)
    nbytes = a.nbytes
    slices = np.array_split(a, threads)

    def rate(read) -> float:
        read()  # warm-up (and compilation)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            read()
            times.append(time.perf_counter() - t)
        return nbytes / statistics.median(times)

    out = {}
    with ThreadPoolExecutor(threads) as pool:
        for name, fn in (("numpy_sum", np.sum), ("numpy_max", np.max)):
            out[name] = rate(lambda fn=fn: list(pool.map(fn, slices)))
    x = jnp.asarray(a)
    del a, slices
    total = jax.jit(jnp.sum)
    out["xla_sum"] = rate(lambda: total(x).block_until_ready())
    x.delete()
    out["best"] = max(out.values())
    out["threads"] = threads
    return out


def step_bytes(cfg, dtype: str) -> int:
    """`decoder_step_bytes` for weights of this dtype name."""
    import numpy as np

    # numpy has no bfloat16; float16 has its itemsize.
    itemsize = np.dtype({"float32": "float32", "bfloat16": "float16", "float16": "float16"}[dtype]).itemsize
    return decoder_step_bytes(cfg, itemsize)


def decoder_step_bytes(cfg, itemsize: int) -> int:
    """Bytes of weights one decode step must read (per-step decoder weights + lm_head)."""
    D, F, L = cfg.embed_dim, cfg.mlp_dim, cfg.num_decoder_layers
    per_layer = 6 * D * D + (3 if cfg.use_glu else 2) * D * F + 8 * D + F
    return (L * per_layer + D * cfg.decoder_vocab_size + 4 * D) * itemsize


def read_step_bytes(cfg, dtype: str, folded_positions: int | None) -> int:
    """Bytes a decode step reads: `step_bytes`, but with a folded cross-attention
    (`transformer.fold_cross_attention`) each layer reads two float32 [D, H*U] matrices
    for U text positions instead of its [D, D] q and o kernels."""
    nbytes = step_bytes(cfg, dtype)
    if folded_positions is None:
        return nbytes
    D, H, L = cfg.embed_dim, cfg.num_heads, cfg.num_decoder_layers
    itemsize = nbytes // decoder_step_bytes(cfg, 1)
    return nbytes - L * 2 * D * D * itemsize + L * 2 * D * H * folded_positions * 4


def proc_memory_mb() -> dict[str, float]:
    """This process's VmRSS (now) and VmHWM (peak) in MiB, from /proc/self/status (Linux).

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over an exec, so a child would report
    its (large) parent's peak. Empty where /proc is not there.
    """
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 1024  # kB
    except OSError:
        pass
    return out


def _peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM; ru_maxrss where there is no /proc)."""
    peak = proc_memory_mb().get("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_runs(fn, runs: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


# --------------------------------------------------------------------------------------
# children: one configuration per process
# --------------------------------------------------------------------------------------


def child_ours(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dalle_mini_jax.pipeline import DalleMini
    from dalle_mini_jax.sampling import SamplingSettings

    t = time.perf_counter()
    pipe = DalleMini.from_pretrained(args.model_dir, dtype=args.dtype)
    load_s = time.perf_counter() - t
    # The peak RSS is reported under --dtype's name, so check that it is what was loaded:
    # every float weight held (transformer, the sampler's per-layer decoder buffers, VQGAN).
    held = jax.tree.leaves((nnx.state(pipe.model, nnx.Param), pipe.sampler._layers, pipe.sampler._head,
                            pipe.sampler._enc_layers,
                            nnx.state(pipe.vqgan, nnx.Param)))
    floats = [x for x in held if jnp.issubdtype(x.dtype, jnp.floating)]
    loaded = sorted({str(x.dtype) for x in floats})
    if loaded != [args.dtype]:
        raise RuntimeError(f"--dtype {args.dtype} but the pipeline holds {loaded} weights")
    weights_mb = sum(x.nbytes for x in floats) / 2**20
    n = args.n
    prompts = [PROMPT]
    kw = dict(num_images=n, seed=1, top_k=TOP_K, guidance=GUIDANCE, batch_size=n)
    t = time.perf_counter()
    pipe.generate(prompts, **kw)
    first_s = time.perf_counter() - t
    total, times = _median_runs(lambda: pipe.generate(prompts, **kw), args.runs, warmup=0)
    # The decode loop alone (encode + cache set-up excluded): ms per step.
    settings = SamplingSettings(top_k=TOP_K, guidance=GUIDANCE)
    batch = pipe._plan(prompts, n, 1, 1.0, TOP_K, None, GUIDANCE, n)[2][0]
    S = pipe.config.image_len

    def loop():
        state, keys = pipe._start(batch, settings)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state = pipe.sampler.run(state, keys, 0, S, settings)
        state.tokens.block_until_ready()
        return time.perf_counter() - t0

    # The step's bytes as read: with the cross-attention folded over U positions, fewer.
    plan = pipe.sampler.fold_plan(pipe._start_inputs(batch, settings)[1])
    folded = None if plan is None else int(plan[1].shape[0])
    codes = pipe.generate_codes(prompts, **kw)[:1]
    vq_s, _ = _median_runs(lambda: pipe.decode_codes(codes), args.runs)
    # The peak now: the bandwidth reads below hold 2 GiB of their own.
    peak = _peak_rss_mb()
    steps, floors = paired_steps(loop, step_bytes(pipe.config, args.dtype), args.runs)
    return dict(total_s=total, times=times, first_call_s=first_s, load_s=load_s,
                step_ms=statistics.median(steps) / S * 1e3, vqgan_s_per_image=vq_s, weights_dtype=args.dtype,
                weights_mb=weights_mb, peak_rss_mb=peak, n=n, folded_positions=folded,
                read_bytes=read_step_bytes(pipe.config, args.dtype, folded),
                paired_step_ms=[t / S * 1e3 for t in steps], paired_floor_ms=floors)


def paired_steps(loop, nbytes: int, runs: int) -> tuple[list[float], list[float]]:
    """`runs` timed decode loops, each with its own floor: the step's bytes over the
    faster of the bandwidth reads just before and just after it.

    Why: this machine's read rate moves by ~20 % from minute to minute (25-30 GB/s for
    the plain read of the same commit, minutes apart), and the start-of-run bandwidth
    was measured minutes before the step, so step / floor mixed two moments (the same
    code read 1.16x-1.47x that way on 2026-12-03). Each loop here (~10 s) lies between
    two reads.

    Returns:
      (loop times in s, floors in ms a step).
    """
    bws = [memory_bandwidth()["best"]]
    times, floors = [], []
    for _ in range(runs):
        times.append(loop())
        bws.append(memory_bandwidth()["best"])
        floors.append(nbytes / max(bws[-2], bws[-1]) * 1e3)
    return times, floors


def child_min_dalle(args) -> dict:
    import torch

    from dalle_mini_jax.min_dalle_compat import build_min_dalle

    t = time.perf_counter()
    md = build_min_dalle(args.model_dir)
    load_s = time.perf_counter() - t
    grid = 1 if args.n == 1 else GRID

    def run(g=grid):
        return md.generate_images(text=PROMPT, seed=1, grid_size=g, top_k=TOP_K,
                                  supercondition_factor=GUIDANCE, temperature=1)

    # Warm-up with one image (its grid run costs minutes on CPU and needs no compile).
    with torch.inference_mode():
        run(1)
        total, times = _median_runs(run, args.runs, warmup=0)
    return dict(total_s=total, times=times, load_s=load_s, weights_dtype=str(md.dtype).removeprefix("torch."),
                peak_rss_mb=_peak_rss_mb(), threads=torch.get_num_threads(), n=grid * grid)


# --------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------


# (key, child kind, images): the four configurations, in the order they run.
CONFIGS = (("ours1", "ours", 1), ("oursgrid", "ours", GRID * GRID),
           ("md1", "min_dalle", 1), ("mdgrid", "min_dalle", GRID * GRID))
ONLY_GROUPS = {"ours": {"ours1", "oursgrid"}, "md": {"md1", "mdgrid"}}


def _spawn(kind: str, args, n: int, runs: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--preset", args.preset,
           "--model-dir", str(args.model_dir), "--n", str(n), "--runs", str(runs), "--dtype", args.dtype]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} n={n} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarize(args, r: dict, bw: dict[str, float], step_bytes: int, md_runs: int) -> dict:
    """The JSON summary. Every key is present whichever configurations ran (None if not).

    `peak_rss_mb` and `peak_rss_dtype` are per configuration (ours1, oursgrid, md1,
    mdgrid): each child's own peak, labelled with the dtype of the weights it held
    (ours: --dtype, checked in the child; min-dalle: float32). `bw` is
    `memory_bandwidth`'s result; the floor uses its "best".
    """
    floor_ms = step_bytes / bw["best"] * 1e3

    def g(k, f):
        return r[k][f] if k in r else None

    nominal = {k: args.dtype if kind == "ours" else "float32" for k, kind, _ in CONFIGS}
    summary = dict(
        preset=args.preset, dtype=args.dtype, runs=args.runs, md_runs=md_runs, ran=[k for k, _, _ in CONFIGS if k in r],
        bandwidth_gb_s=bw["best"] / 1e9, bandwidth_threads=bw["threads"],
        bandwidth_kernels_gb_s={k: v / 1e9 for k, v in bw.items() if k not in ("best", "threads")},
        step_bytes_mb=step_bytes / 1e6, floor_step_ms=floor_ms,
        step_ms=g("ours1", "step_ms"), grid_step_ms=g("oursgrid", "step_ms"),
        ours_1_s=g("ours1", "total_s"), ours_grid_s=g("oursgrid", "total_s"),
        min_dalle_1_s=g("md1", "total_s"), min_dalle_grid_s=g("mdgrid", "total_s"),
        vqgan_s_per_image=g("ours1", "vqgan_s_per_image"), first_call_s=g("ours1", "first_call_s"),
        weights_mb=g("ours1", "weights_mb") or g("oursgrid", "weights_mb"),
        peak_rss_mb={k: g(k, "peak_rss_mb") for k, _, _ in CONFIGS},  # MiB
        peak_rss_gb={k: g(k, "peak_rss_mb") and g(k, "peak_rss_mb") * 2**20 / 1e9 for k, _, _ in CONFIGS},
        peak_rss_gib={k: g(k, "peak_rss_mb") and g(k, "peak_rss_mb") / 1024 for k, _, _ in CONFIGS},
        peak_rss_dtype={k: g(k, "weights_dtype") or nominal[k] for k, _, _ in CONFIGS},
    )
    summary["step_over_floor"] = summary["step_ms"] / floor_ms if summary["step_ms"] else None
    # Each loop against the bandwidth read around it (`paired_steps`): the median ratio.
    ours1 = r.get("ours1", {})
    summary["paired_step_ms"], summary["paired_floor_ms"] = ours1.get("paired_step_ms"), ours1.get("paired_floor_ms")
    pairs = list(zip(summary["paired_step_ms"] or [], summary["paired_floor_ms"] or []))
    summary["step_over_floor_paired"] = statistics.median(s / f for s, f in pairs) if pairs else None
    # The same against the bytes the step reads (fewer than the weights' with a folded
    # cross-attention): how close the step comes to reading at the machine's rate.
    read = ours1.get("read_bytes")
    summary["folded_positions"] = ours1.get("folded_positions")
    summary["step_read_mb"] = read and read / 1e6
    summary["step_over_read_floor_paired"] = (statistics.median(s / (f * read / step_bytes) for s, f in pairs)
                                              if pairs and read else None)
    both = [("1", "ours_1_s", "min_dalle_1_s"), ("grid", "ours_grid_s", "min_dalle_grid_s")]
    for name, ours, theirs in both:
        summary[f"speedup_{name}"] = (summary[theirs] / summary[ours]
                                      if summary[ours] and summary[theirs] else None)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "mini", "mega"], default="tiny")
    p.add_argument("--runs", type=int, default=3, help="timed runs per configuration (median)")
    p.add_argument("--md-runs", type=int, default=None, help="timed runs for min-dalle (default --runs)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="our weights' dtype (min-dalle always runs fp32)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the random model here (reused)")
    p.add_argument("--skip-min-dalle", action="store_true")
    p.add_argument("--only", choices=[k for k, _, _ in CONFIGS] + list(ONLY_GROUPS), action="append",
                   help="run only these configurations (repeatable; 'ours' = ours1 + oursgrid, "
                        "'md' = md1 + mdgrid), e.g. --only ours --dtype bfloat16")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--bandwidth-only", action="store_true",
                   help="only measure the memory read bandwidth (each kernel, GB/s) and exit")
    # internal
    p.add_argument("--child", choices=["ours", "min_dalle"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        out = child_ours(args) if args.child == "ours" else child_min_dalle(args)
        print(json.dumps(out))
        return 0

    if args.bandwidth_only:
        bw = memory_bandwidth()
        print(json.dumps({k: (v / 1e9 if k != "threads" else v) for k, v in bw.items()}))
        return 0
    only = set()
    for name in args.only or [k for k, _, _ in CONFIGS]:
        only |= ONLY_GROUPS.get(name, {name})
    if args.skip_min_dalle:
        only -= ONLY_GROUPS["md"]
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"dmj-bench-{args.preset}-")
        args.workdir = Path(tmp.name)
    args.model_dir = args.workdir / f"{args.preset}-model"
    t = time.perf_counter()
    write_model_dir(args.preset, args.model_dir)
    print(f"random {args.preset} model in {args.model_dir} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    cfg, _ = _configs(args.preset)
    bw = memory_bandwidth()
    nbytes = step_bytes(cfg, args.dtype)
    md_runs = args.md_runs or args.runs
    r = {}
    for key, kind, n in CONFIGS:
        if key in only:
            print(f"running {key} ...", file=sys.stderr, flush=True)
            r[key] = _spawn(kind, args, n, md_runs if kind == "min_dalle" else args.runs)
            print(f"  {key}: {json.dumps(r[key])}", file=sys.stderr, flush=True)
    summary = summarize(args, r, bw, nbytes, md_runs)

    rows = []
    for k, v in summary.items():
        if k.startswith("peak_rss_") and k != "peak_rss_dtype":
            unit = {"peak_rss_mb": "MiB", "peak_rss_gb": "GB", "peak_rss_gib": "GiB"}[k]
            rows += [(f"{k} {c} ({summary['peak_rss_dtype'][c]}, {unit})", x) for c, x in v.items()]
        elif k == "bandwidth_kernels_gb_s":
            rows += [(f"bandwidth_gb_s {c}", x) for c, x in v.items()]
        elif k != "peak_rss_dtype":
            rows.append((k, v))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        print(json.dumps(summary))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
