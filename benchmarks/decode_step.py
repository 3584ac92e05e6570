"""Decode-step time by the layout of the decoder's dense kernels: an A/B in one process.

    python benchmarks/decode_step.py DIR [--images 1 9] [--dtype float32] [--steps 32] [--runs 3]

DIR is a model directory, e.g. the random DALL-E Mini one that `python
benchmarks/generate.py --preset mini --only ours1 --runs 1 --workdir W` leaves in
W/mini-model. For each number of images and each layout the sampler could hold its
per-layer kernels in (`sampling.split_decoder_layers(parts=)`):

  parts 0   [in, out], as the model stores them (the layout before `OutMajor`);
  parts 1   [out, in] in one piece (`transformer.OutMajor`);
  parts C   [out, in] cut in one part per core (`sampling.kernel_parts()`, the default);
  parts C + head   the same with lm_head cut likewise (`sampling.split_head`);
  parts C + head + host table   and the decoder's token table read on the host, a row
            per image each step (`sampling.HostTable`, what a pipeline's sampler holds
            on a CPU: here a numpy copy of the table rather than a memory map of the file);

it runs the first `--steps` guided decode steps (top-k 50, guidance 10, a random
prompt; a step attends over the whole cache, masked, so its cost does not depend on
the position) `--runs` times after a warm-up, and prints the median ms per step and
the ratio to the first layout. Timings vary between runs on a shared machine: compare
the ratios within one run.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--images", type=int, nargs="+", default=[1, 9])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from dalle_mini_jax.sampling import (HostTable, SamplingSettings, TokenSampler, image_keys, kernel_parts,
                                         split_decoder_layers, split_head)
    from dalle_mini_jax.transformer import DalleBart

    model = DalleBart.from_pretrained(args.model_dir, dtype=args.dtype)
    cfg = model.config
    sampler = TokenSampler(model)
    settings = SamplingSettings(top_k=50, guidance=10.0)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, cfg.text_vocab_size, (2, cfg.text_len)).astype(np.int32)  # prompt, uncond
    mask = np.ones_like(ids)
    cores = kernel_parts()
    layouts = [(p, False) for p in dict.fromkeys([0, 1, cores])] + [(cores, True)]
    print(f"{args.model_dir} {args.dtype}, {kernel_parts()} core(s); ms per decode step, median of {args.runs}")
    results: dict[int, list[tuple[str, float, list[float]]]] = {n: [] for n in args.images}
    for parts, split in layouts:  # the head layout last: it takes lm_head over
        sampler._layers = None
        gc.collect()
        sampler._layers = split_decoder_layers(model, parts=parts)
        sources = {"": None}
        if split:
            sampler._head = split_head(model, parts)
            # The token table's two homes, run alternately (run r of each, then r + 1).
            table = np.asarray(jax.device_get(model.dec_embed.tokens[...]))
            sources[" + host table"] = HostTable.register(sampler, table, model.dtype)
        for n in args.images:
            keys = image_keys(1, ["p"] * n, list(range(n)))
            times = {k: [] for k in sources}
            for r in range(args.runs + 1):  # the first run compiles: not timed
                for k, source in sources.items():
                    sampler._tokens = source
                    state = sampler.start(ids, mask, np.zeros(n, np.int32), 1)
                    jax.block_until_ready(state)
                    t = time.perf_counter()
                    state = sampler.run(state, keys, 0, args.steps, settings)
                    state.tokens.block_until_ready()
                    if r:
                        times[k].append((time.perf_counter() - t) / args.steps * 1e3)
            for k, ts in times.items():
                name = f"parts {parts}" + (" + head" if split else "") + k
                results[n].append((name, statistics.median(ts), ts))
    for n, rows in results.items():
        first = rows[0][1]
        for name, ms, times in rows:
            print(f"images {n}  {name:<27} {ms:7.1f} ms/step  {first / ms:5.2f}x  "
                  f"({', '.join(f'{t:.1f}' for t in times)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
