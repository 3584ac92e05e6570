"""Benchmark of the shapes VQGAN: does the judge still accept its reconstructions?

    python benchmarks/vqgan_shapes.py --model runs/vqgan_shapes/model [--num 1000 --seed 12345]
    python benchmarks/vqgan_shapes.py --train --workdir runs/vqgan_shapes   # train (20 min) first
    python benchmarks/vqgan_shapes.py --model runs/vqgan_cells/model --layout centred   # the cell VQGAN

For N held-out shapes images (seed 12345 by default; training reads seed 0 and its eval
seed 1) it reports, as one JSON line (also written to MODEL/../benchmark.json):
  judge_accept     share of images i with judge(decode(encode(image_i)), caption_i)
  psnr             mean per-image PSNR (dB) of the uint8 reconstructions
  codebook_usage   share of the codebook used to encode the N images
  perplexity       exp(entropy) of the code histogram
  code_consistency share of the 8x8 patches whose code is the commonest code of patches
                   with the same pixels: 1.0 when a code depends only on its own patch
                   (what a transformer can learn compositionally), low when codes hash
                   the whole image
  background_codes, background_top_share   distinct codes over the all-black patches,
                   and the share of the commonest (1 code and 1.0 for local codes)
  decode_ms_per_image   median wall time of a jitted batch-of-16 decode, per image
  params, fp32_mb  size of the model
  train_seconds, train_steps, train_cpu_seconds   from the work directory's metrics,
                   when the model sits in a work directory
  failures         with --failures: the judge's rejections counted by kind of miss
                   (colour, shape, size, cell, object count) and the first ten
Target: judge_accept >= 0.99 after at most 20 minutes of training on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_mini_jax import shapes
from dalle_mini_jax.vqgan import VQModel
from dalle_mini_jax.vqgan_train import METRICS_NAME, metrics_of, reconstruct


def _decode_ms_per_image(model: VQModel, codes: np.ndarray, batch: int = 16, runs: int = 5) -> float:
    decode = nnx.jit(lambda m, c: m.decode_code(c))
    x = jnp.asarray(codes[:batch])
    jax.block_until_ready(decode(model, x))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(decode(model, x))
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times)) / batch


def _training_facts(model_dir: Path) -> dict:
    metrics = model_dir.parent / METRICS_NAME
    if not metrics.is_file():
        return {}
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    if not rows:
        return {}
    last = rows[-1]  # the final eval: its step and time include the whole run
    return {"train_steps": last["step"], "train_seconds": last["seconds"],
            "train_cpu_seconds": last.get("cpu_seconds")}


def code_locality(images: np.ndarray, codes: np.ndarray) -> dict:
    """How far a code is a function of its own patch (module docstring: code_consistency,
    background_codes, background_top_share). images uint8 [N, R, R, 3]; codes [N, g*g]."""
    n, res = images.shape[:2]
    g = int(round(codes.shape[1] ** 0.5))
    f = res // g
    patches = images.reshape(n, g, f, g, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n * g * g, -1)
    flat_codes = codes.reshape(-1)
    by_patch: dict[bytes, Counter] = {}
    for patch, code in zip(patches, flat_codes):
        by_patch.setdefault(patch.tobytes(), Counter())[int(code)] += 1
    consistent = sum(c.most_common(1)[0][1] for c in by_patch.values())
    black = Counter(flat_codes[patches.max(axis=1) == 0].tolist())
    total_black = sum(black.values())
    return {"code_consistency": round(consistent / len(flat_codes), 4),
            "background_codes": len(black),
            "background_top_share": round(black.most_common(1)[0][1] / total_black, 4)
            if total_black else None}


def failure_kinds(recon: np.ndarray, captions: list[str]) -> dict:
    """What the judge rejects in the reconstructions `recon` [N, 64, 64, 3]: counts per
    kind of miss (`evaluate.miss_kinds`: 'colour', 'shape', 'size', 'cell', 'object
    count', ...), and the first ten rejections."""
    from dalle_mini_jax import evaluate

    kinds: Counter = Counter()
    examples = []
    for image, caption in zip(recon, captions):
        ok, _, reason = evaluate.judge_detailed(image, caption)
        if ok:
            continue
        kinds.update(evaluate.miss_kinds(reason))
        if len(examples) < 10:
            examples.append(f"{caption} | {reason[:140]}")
    return {"kinds": dict(kinds.most_common()), "examples": examples}


def benchmark(model_dir: str | Path, num: int = 1000, seed: int = 12345,
              failures: bool = False, layout: str = "free") -> dict:
    """The numbers in the module docstring, for the VQGAN directory `model_dir`."""
    model_dir = Path(model_dir)
    model = VQModel.from_pretrained(model_dir)
    side = model.config.resolution
    if side < shapes.CANVAS_SIZE:
        raise ValueError(f"{model_dir} is a {side}px VQGAN; shapes are 64px (or enlarged)")
    images, captions = shapes.generate_arrays(num, seed, layout=layout)
    # A VQGAN at a larger side (the cell VQGAN: 96) reads the canvas enlarged the way
    # encode.ShapesSource enlarges it, and its reconstructions are judged shrunk back.
    images = shapes.from_canvas(images, side)  # the canvas itself at side 64
    t = time.perf_counter()
    recon, codes = reconstruct(model, images)
    out = metrics_of(images, recon, codes, model.config.codebook_size, captions)
    out.update(code_locality(images, codes))
    seconds = time.perf_counter() - t
    if failures:
        out["failures"] = failure_kinds(shapes.to_canvas(recon), captions)
    params = model.released_params()
    n = int(sum(v.size for v in params.values()))
    return {
        "model": str(model_dir), "num_images": num, "seed": seed, "layout": layout, **out,
        "decode_ms_per_image": round(_decode_ms_per_image(model, codes), 2),
        "eval_seconds": round(seconds, 1), "params": n, "fp32_mb": round(4 * n / 2**20, 2),
        "tokens": model.config.num_tokens, "codebook_size": model.config.codebook_size,
        **_training_facts(model_dir),
        "load_average": os.getloadavg()[0], "cpus": os.cpu_count(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="VQGAN directory (default WORKDIR/model)")
    parser.add_argument("--workdir", default="runs/vqgan_shapes", help="training work directory")
    parser.add_argument("--train", action="store_true",
                        help="first train with training/configs/vqgan_shapes.py into --workdir")
    parser.add_argument("--num", type=int, default=1000, help="held-out images")
    parser.add_argument("--seed", type=int, default=12345, help="shapes seed of the held-out set")
    parser.add_argument("--layout", default="free", choices=["free", "centred"],
                        help="held-out images as the spec draws them (free) or without jitter "
                             "(centred: what the cell VQGAN is trained on and encodes)")
    parser.add_argument("--failures", action="store_true",
                        help="also count what the judge rejects (colour, shape, object count, ...)")
    args = parser.parse_args(argv)
    if args.train:
        from dalle_mini_jax import vqgan_train

        config = Path(__file__).resolve().parents[1] / "training/configs/vqgan_shapes.py"
        vqgan_train.train_vqgan(vqgan_train.load_config(str(config)), args.workdir)
    model_dir = Path(args.model or Path(args.workdir) / "model")
    result = benchmark(model_dir, args.num, args.seed, args.failures, args.layout)
    line = json.dumps(result)
    print(line)
    (model_dir.parent / "benchmark.json").write_text(line + "\n")
    if result["judge_accept"] < 0.99:
        print(f"judge acceptance {result['judge_accept']:.3f} is below the 0.99 target",
              file=sys.stderr)


if __name__ == "__main__":
    main()
