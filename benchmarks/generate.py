"""Generation speed and memory: ours vs min-dalle on the same random weights, vs the bandwidth floor.

    python benchmarks/generate.py --preset tiny            # minutes; for development
    python benchmarks/generate.py --preset mini --json     # DALL·E Mini shape: heavy (~30 min on 2 cores)

What it does, in one run:
  1. writes a random model directory of the preset's shape (released format: transformer
     + tokenizer trained on a few captions + VQGAN) into a temp dir (`--workdir` to keep it);
  2. measures the machine's memory read bandwidth (numpy sum over a 1 GiB array, median);
  3. runs each configuration in its own subprocess, so each peak RSS is its own
     (`ru_maxrss` of that process, loading included):
       ours 1 image, ours 3x3 grid (one batch of 9), min-dalle 1 image, min-dalle 3x3 grid;
     each one warm-up then `--runs` timed runs (median reported). min-dalle runs its own
     `MinDalle.generate_images` code path with its own torch modules; the instance is
     built with `object.__new__` and our weights mapped in (reference §2.3), no download;
  4. prints a table; with --json the last line is one JSON object.

The floor of a decode step is (bytes of decoder weights a step must read: every decoder
layer except the cross-attention k/v kernels, plus lm_head) / bandwidth.

Presets: `mini` / `mega` are the released shapes with the f16/16384 VQGAN. `tiny` is the
tiny transformer widened to min-dalle's hard-coded lengths (64 text, 256 image tokens,
16384 codes) with the same f16/16384 VQGAN, because min-dalle cannot run other shapes.
"""

from __future__ import annotations

import argparse
import json
import os
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


def memory_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes/s of a numpy sum over a `gib` GiB float32 array (median of `repeats`)."""
    import numpy as np

    a = np.ones(int(gib * 2**30) // 4, np.float32)
    a.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t)
    return a.nbytes / statistics.median(times)


def decoder_step_bytes(cfg, itemsize: int) -> int:
    """Bytes of weights one decode step must read (per-step decoder weights + lm_head)."""
    D, F, L = cfg.embed_dim, cfg.mlp_dim, cfg.num_decoder_layers
    per_layer = 6 * D * D + (3 if cfg.use_glu else 2) * D * F + 8 * D + F
    return (L * per_layer + D * cfg.decoder_vocab_size + 4 * D) * itemsize


def _peak_rss_mb() -> float:
    """Peak RSS of this process. VmHWM, not ru_maxrss: Linux carries ru_maxrss over an
    exec, so a child would report its (large) parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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
    import numpy as np

    from dalle_mini_jax.pipeline import DalleMini
    from dalle_mini_jax.sampling import SamplingSettings

    t = time.perf_counter()
    pipe = DalleMini.from_pretrained(args.model_dir, dtype=args.dtype)
    load_s = time.perf_counter() - t
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

    step_s = statistics.median([loop() for _ in range(args.runs)]) / S
    codes = pipe.generate_codes(prompts, **kw)[:1]
    vq_s, _ = _median_runs(lambda: pipe.decode_codes(codes), args.runs)
    return dict(total_s=total, times=times, first_call_s=first_s, load_s=load_s, step_ms=step_s * 1e3,
                vqgan_s_per_image=vq_s, peak_rss_mb=_peak_rss_mb(), n=n)


def _md_state_dicts(flat: dict, cfg) -> tuple[dict, dict]:
    """Released flat DalleBart tree -> min-dalle encoder / decoder state dicts (§2.3)."""
    import numpy as np
    import torch

    def t(x, transpose=False):
        x = np.asarray(x, np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.T if transpose else x))

    out = {}
    for stack, kind in (("encoder", "Encoder"), ("decoder", "Decoder")):
        root = f"model/{stack}"
        sd = {
            "embed_tokens.weight": t(flat.pop(f"{root}/embed_tokens/embedding")),
            "embed_positions.weight": t(flat.pop(f"{root}/embed_positions/embedding")),
            "layernorm_embedding.weight": t(flat.pop(f"{root}/layernorm_embedding/scale")),
            "layernorm_embedding.bias": t(flat.pop(f"{root}/layernorm_embedding/bias")),
            "final_ln.bias": t(flat.pop(f"{root}/final_ln/bias")),
        }
        lay = f"{root}/layers/FlaxBart{kind}Layers"
        names = [("LayerNorm_0/bias", "pre_self_attn_layer_norm.bias", False),
                 ("LayerNorm_1/scale", "self_attn_layer_norm.weight", False),
                 ("LayerNorm_1/bias", "self_attn_layer_norm.bias", False),
                 ("GLU_0/LayerNorm_0/bias", "glu.ln0.bias", False),
                 ("GLU_0/LayerNorm_1/bias", "glu.ln1.bias", False)]
        names += [(f"FlaxBartAttention_0/{p}/kernel", f"self_attn.{p}.weight", True)
                  for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        names += [(f"GLU_0/Dense_{i}/kernel", f"glu.fc{i}.weight", True) for i in range(3)]
        if stack == "decoder":
            names += [("LayerNorm_2/bias", "pre_encoder_attn_layer_norm.bias", False),
                      ("LayerNorm_3/scale", "encoder_attn_layer_norm.weight", False),
                      ("LayerNorm_3/bias", "encoder_attn_layer_norm.bias", False)]
            names += [(f"FlaxBartAttention_1/{p}/kernel", f"encoder_attn.{p}.weight", True)
                      for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        for ours, theirs, tr in names:
            stacked = flat.pop(f"{lay}/{ours}")
            for l in range(stacked.shape[0]):
                sd[f"layers.{l}.{theirs}"] = t(stacked[l], tr)
            del stacked
        if stack == "decoder":
            sd["lm_head.weight"] = t(flat.pop("lm_head/kernel"), True)
        out[stack] = sd
    return out["encoder"], out["decoder"]


def _md_vqgan_state_dict(flat: dict) -> dict:
    """Released flat VQGAN tree -> min-dalle VQGanDetokenizer state dict (decoder half)."""
    import re

    import numpy as np
    import torch

    sd = {}
    for key, x in flat.items():
        if key.startswith(("encoder/", "quant_conv/")):
            continue
        x = np.asarray(x, np.float32)
        if key == "quantize/embedding/embedding":
            sd["embedding.weight"] = torch.from_numpy(x)
            continue
        name = key.replace("/", ".")
        name = re.sub(r"up_(\d+)\.(block|attn)_(\d+)", r"up.\1.\2.\3", name)
        name = re.sub(r"up_(\d+)\.", r"up.\1.", name)
        if name.endswith(".kernel"):
            name = name[: -len("kernel")] + "weight"
            x = x.transpose(3, 2, 0, 1)
        elif name.endswith(".scale"):
            name = name[: -len("scale")] + "weight"
        sd[name] = torch.from_numpy(np.ascontiguousarray(x))
    return sd


def build_min_dalle(model_dir: Path, cfg):
    """A MinDalle instance on our weights, without its downloads (fp32, CPU)."""
    import torch
    from min_dalle import MinDalle
    from min_dalle.models import DalleBartDecoder, DalleBartEncoder, VQGanDetokenizer
    from min_dalle.text_tokenizer import TextTokenizer as MDTokenizer

    from dalle_mini_jax.checkpoint import read_msgpack

    md = object.__new__(MinDalle)
    md.device, md.is_mega, md.is_reusable, md.dtype, md.is_verbose = "cpu", False, True, torch.float32, False
    md.text_token_count = cfg.text_len
    md.layer_count = cfg.num_decoder_layers
    md.attention_head_count = cfg.num_heads
    md.embed_count = cfg.embed_dim
    md.glu_embed_count = cfg.mlp_dim
    md.text_vocab_count = cfg.text_vocab_size
    md.image_vocab_count = cfg.image_vocab_size
    vocab = json.loads((model_dir / "vocab.json").read_text())
    merges = (model_dir / "merges.txt").read_text().split("\n")[1:-1]
    md.tokenizer = MDTokenizer(vocab, merges)
    flat = read_msgpack(model_dir / "flax_model.msgpack", dtype="float32")
    enc_sd, dec_sd = _md_state_dicts(flat, cfg)
    del flat
    md.encoder = DalleBartEncoder(
        attention_head_count=cfg.num_heads, embed_count=cfg.embed_dim, glu_embed_count=cfg.mlp_dim,
        text_token_count=cfg.text_len, text_vocab_count=cfg.text_vocab_size,
        layer_count=cfg.num_encoder_layers, device="cpu").eval()
    _load(md.encoder, enc_sd)
    del enc_sd
    md.decoder = DalleBartDecoder(
        image_vocab_count=cfg.image_vocab_size, attention_head_count=cfg.num_heads,
        embed_count=cfg.embed_dim, glu_embed_count=cfg.mlp_dim, layer_count=cfg.num_decoder_layers,
        device="cpu").eval()
    _load(md.decoder, dec_sd)
    del dec_sd
    md.detokenizer = VQGanDetokenizer().eval()
    _load(md.detokenizer, _md_vqgan_state_dict(read_msgpack(model_dir / "vqgan" / "flax_model.msgpack")),
          strict=True)
    return md


def _load(module, sd, strict=False):
    missing, unexpected = module.load_state_dict(sd, strict=False)
    # Bias-only norms have no weight in the checkpoint (min-dalle loads with strict=False
    # for that reason); anything else missing or unexpected means a wrong mapping.
    bad = [k for k in missing if not k.endswith("norm.weight") and not k.endswith(".ln0.weight")
           and not k.endswith(".ln1.weight") and not k.endswith("final_ln.weight")]
    if unexpected or bad or (strict and missing):
        raise RuntimeError(f"min-dalle mapping: missing {bad or missing}, unexpected {unexpected}")


def child_min_dalle(args) -> dict:
    import torch

    cfg, _ = _configs(args.preset)
    t = time.perf_counter()
    md = build_min_dalle(Path(args.model_dir), cfg)
    load_s = time.perf_counter() - t
    grid = 1 if args.n == 1 else GRID

    def run(g=grid):
        return md.generate_images(text=PROMPT, seed=1, grid_size=g, top_k=TOP_K,
                                  supercondition_factor=GUIDANCE, temperature=1)

    # Warm-up with one image (its grid run costs minutes on CPU and needs no compile).
    with torch.inference_mode():
        run(1)
        total, times = _median_runs(run, args.runs, warmup=0)
    return dict(total_s=total, times=times, load_s=load_s,
                peak_rss_mb=_peak_rss_mb(), threads=torch.get_num_threads(), n=grid * grid)


# --------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------


def _spawn(kind: str, args, n: int, runs: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--preset", args.preset,
           "--model-dir", str(args.model_dir), "--n", str(n), "--runs", str(runs), "--dtype", args.dtype]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} n={n} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "mini", "mega"], default="tiny")
    p.add_argument("--runs", type=int, default=3, help="timed runs per configuration (median)")
    p.add_argument("--md-runs", type=int, default=None, help="timed runs for min-dalle (default --runs)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="our weights' dtype (min-dalle always runs fp32)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the random model here (reused)")
    p.add_argument("--skip-min-dalle", action="store_true")
    p.add_argument("--only", choices=["ours1", "oursgrid", "md1", "mdgrid"], action="append",
                   help="run only these configurations")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    # internal
    p.add_argument("--child", choices=["ours", "min_dalle"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        out = child_ours(args) if args.child == "ours" else child_min_dalle(args)
        print(json.dumps(out))
        return 0

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
    import numpy as np

    itemsize = np.dtype({"float32": "float32", "bfloat16": "float16", "float16": "float16"}[args.dtype]).itemsize
    step_bytes = decoder_step_bytes(cfg, itemsize)
    floor_ms = step_bytes / bw * 1e3
    only = set(args.only or ["ours1", "oursgrid", "md1", "mdgrid"])
    if args.skip_min_dalle:
        only -= {"md1", "mdgrid"}
    md_runs = args.md_runs or args.runs
    r = {}
    for key, kind, n, runs in (("ours1", "ours", 1, args.runs), ("oursgrid", "ours", GRID * GRID, args.runs),
                               ("md1", "min_dalle", 1, md_runs), ("mdgrid", "min_dalle", GRID * GRID, md_runs)):
        if key in only:
            print(f"running {key} ...", file=sys.stderr, flush=True)
            r[key] = _spawn(kind, args, n, runs)
            print(f"  {key}: {json.dumps(r[key])}", file=sys.stderr, flush=True)

    def g(k, f):
        return r[k][f] if k in r else None

    summary = dict(
        preset=args.preset, dtype=args.dtype, runs=args.runs, md_runs=md_runs,
        bandwidth_gb_s=bw / 1e9, step_bytes_mb=step_bytes / 1e6, floor_step_ms=floor_ms,
        step_ms=g("ours1", "step_ms"), grid_step_ms=g("oursgrid", "step_ms"),
        ours_1_s=g("ours1", "total_s"), ours_grid_s=g("oursgrid", "total_s"),
        min_dalle_1_s=g("md1", "total_s"), min_dalle_grid_s=g("mdgrid", "total_s"),
        vqgan_s_per_image=g("ours1", "vqgan_s_per_image"),
        peak_rss_mb=g("ours1", "peak_rss_mb"), grid_peak_rss_mb=g("oursgrid", "peak_rss_mb"),
        min_dalle_peak_rss_mb=g("md1", "peak_rss_mb"), min_dalle_grid_peak_rss_mb=g("mdgrid", "peak_rss_mb"),
        first_call_s=g("ours1", "first_call_s"),
    )
    summary["step_over_floor"] = summary["step_ms"] / floor_ms if summary["step_ms"] else None
    if summary["ours_1_s"] and summary["min_dalle_1_s"]:
        summary["speedup_1"] = summary["min_dalle_1_s"] / summary["ours_1_s"]
    if summary["ours_grid_s"] and summary["min_dalle_grid_s"]:
        summary["speedup_grid"] = summary["min_dalle_grid_s"] / summary["ours_grid_s"]

    rows = [(k, v) for k, v in summary.items()]
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
