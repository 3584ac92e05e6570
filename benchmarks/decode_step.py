"""Decode-step time by the layout of the decoder's dense kernels: an A/B in one process.

    python benchmarks/decode_step.py DIR [--images 1 9] [--dtype float32] [--steps 256] [--runs 3]
        [--prompt-tokens 9] [--layouts in-out one-part parts parts-head threaded threaded-huge threaded-folded]

DIR is a model directory, e.g. the random DALL-E Mini one that `python
benchmarks/generate.py --preset mini --only ours1 --runs 1 --workdir W` leaves in
W/mini-model. For each number of images and each layout the sampler could hold its
per-layer kernels in (`sampling.split_decoder_layers(parts=, threaded=)`), `--layouts`:

  in-out      parts 0: [in, out], as the model stores them (the layout before `OutMajor`);
  one-part    parts 1: [out, in] in one piece (`transformer.OutMajor`);
  parts       parts C: [out, in] cut in one part per core (`sampling.kernel_parts()`);
  parts-head  parts C + head: the same with lm_head cut likewise, and "+ host table":
              also the decoder's token table read on the host, a row per image each
              step (`sampling.HostTable`, what a pipeline's sampler holds on a CPU
              without cpu_dots; here a numpy copy of the table, not a memory map);
  threaded    threaded + head (+ host table): one [out, in] part per kernel and
              lm_head, multiplied by `cpu_dots.rows_dot` on all cores, attention by
              `cpu_dots.attend` (`sampling.dot_layout`: what a pipeline's sampler holds
              on a CPU for DALL-E Mini when the kernel builds);
  threaded-huge  threaded, its weights then moved onto 2 MiB pages (`onto_huge_pages`
              below; it prints how much moved and how long that took);
  threaded-folded  threaded, the cross-attention folded with the prompt's keys/values
              where that reads less (`transformer.fold_cross_attention`; what a
              pipeline's sampler does with float32 weights); the others never fold,

it runs the first `--steps` guided decode steps (top-k 50, guidance 10, a random
prompt of `--prompt-tokens` real tokens, 9 by default as `generate.py`'s prompt, and
an unconditional one of 2, as the tokenizer makes them; by default all the steps: with
`cpu_dots` a step reads only the cache positions written so far, so its cost grows
with the position) `--runs` times after a warm-up,
all layouts alternating, and prints the median ms per step and the ratio to the first
layout. Timings vary between runs on a shared machine: compare the ratios within one
run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


LAYOUTS = ("in-out", "one-part", "parts", "parts-head", "threaded", "threaded-huge",
           "threaded-folded")  # in the order they run


_MADV_COLLAPSE = 25  # linux/mman.h (Linux 6.1+)


def onto_huge_pages(arrays) -> int:
    """Move the whole 2 MiB pages inside each array's host buffer onto transparent huge
    pages (madvise MADV_COLLAPSE: copied at once, whatever the THP setting); returns the
    bytes moved (0 where the kernel or libc cannot). The first and last partial huge
    page of each buffer stay on 4 KiB pages: a [1024, 1024] f32 kernel (4 MiB, not
    2 MiB-aligned) moves only 2 MiB.

    Why in a benchmark: the floor in `generate.py` is measured on a numpy array, which
    numpy puts on huge pages, and `cpu_dots_ab.py --pages both` read weights on them
    ~2 % faster (within that tool's resolution); this layout measures what it is worth
    to a whole decode step.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            huge = int(f.read())
    except (OSError, ValueError):
        return 0
    libc.madvise.argtypes, libc.madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    moved = 0
    for a in arrays:
        start = a.unsafe_buffer_pointer()
        lo, hi = -(-start // huge) * huge, (start + a.nbytes) // huge * huge
        if hi > lo and libc.madvise(lo, hi - lo, _MADV_COLLAPSE) == 0:
            moved += hi - lo
    return moved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--images", type=int, nargs="+", default=[1, 9])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=None, help="default: the model's image_len")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=9, help="real tokens of the prompt (the rest padding)")
    args = p.parse_args(argv)

    import jax
    import numpy as np

    from dalle_mini_jax import cpu_dots
    from dalle_mini_jax.sampling import (HostTable, SamplingSettings, TokenSampler, _unstack, fold_kernels,
                                         image_keys, kernel_parts, split_decoder_layers)
    from dalle_mini_jax.transformer import DalleBart, OutMajor

    model = DalleBart.from_pretrained(args.model_dir, dtype=args.dtype)
    cfg = model.config
    sampler = TokenSampler(model, cpu_kernels=False)  # its layers are replaced by each layout's
    settings = SamplingSettings(top_k=50, guidance=10.0)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, cfg.text_vocab_size, (2, cfg.text_len)).astype(np.int32)  # prompt, uncond
    mask = (np.arange(cfg.text_len) < np.asarray([[args.prompt_tokens], [2]])).astype(np.int32)
    cores = kernel_parts()
    steps = args.steps or cfg.image_len
    # (parts, lm_head split too, threaded, on huge pages, cross-attention folded)
    chosen = {"in-out": (0, False, False, False, False), "one-part": (1, False, False, False, False),
              "parts": (cores, False, False, False, False), "parts-head": (cores, True, False, False, False),
              "threaded": (1, True, True, False, False), "threaded-huge": (1, True, True, True, False),
              "threaded-folded": (1, True, True, False, True)}
    layouts = list(dict.fromkeys(chosen[name] for name in LAYOUTS if name in args.layouts))
    threaded_ok = cpu_dots.supports(model.dtype) and cpu_dots.available()
    if not threaded_ok and any(threaded for _, _, threaded, _ in layouts):
        layouts = [layout for layout in layouts if not layout[2]]
        print(f"no threaded layout: {cpu_dots.reason() or f'{args.dtype} weights'}")
    print(f"{args.model_dir} {args.dtype}, {kernel_parts()} core(s); ms per decode step, median of {args.runs}")
    # Every layout is held at once and the runs alternate between them (run r of each,
    # then r + 1), so a drift of the machine's speed biases none of them.
    lm = model.lm_head[...]
    table = np.asarray(jax.device_get(model.dec_embed.tokens[...]))
    host = HostTable.register(sampler, table, model.dtype)
    held = []  # (name, layers, head, token source, the kernels folded or None)
    for parts, split, threaded, huge, fold in layouts:
        layers = split_decoder_layers(model, parts=parts, threaded=threaded)
        name = ("threaded" if threaded else f"parts {parts}") + (", huge pages" if huge else "")
        name += ", folded" if fold else ""
        kernels = fold_kernels(layers) if fold else None  # what a TokenSampler folds with
        if not split:
            held.append((name, layers, None, None, kernels))
            continue
        head = OutMajor(_unstack(lm[None], parts)[0], threaded)  # as `split_head` cuts it
        if huge:
            t = time.perf_counter()
            moved = onto_huge_pages(jax.tree.leaves((layers, head)))
            print(f"{name}: {moved / 2**20:.0f} MiB of weights moved onto huge pages in "
                  f"{time.perf_counter() - t:.2f} s")
        held.append((name + " + head", layers, head, None, kernels))
        held.append((name + " + head + host table", layers, head, host, kernels))
    results: dict[int, list[tuple[str, float, list[float]]]] = {n: [] for n in args.images}
    for n in args.images:
        keys = image_keys(1, ["p"] * n, list(range(n)))
        times = {name: [] for name, *_ in held}
        for r in range(args.runs + 1):  # the first run compiles: not timed
            for name, layers, head, source, kernels in held:
                sampler._layers, sampler._head, sampler._tokens = layers, head, source
                sampler._fold_kernels = kernels
                state = sampler.start(ids, mask, np.zeros(n, np.int32), 1)
                jax.block_until_ready(state)
                t = time.perf_counter()
                state = sampler.run(state, keys, 0, steps, settings)
                state.tokens.block_until_ready()
                if r:
                    times[name].append((time.perf_counter() - t) / steps * 1e3)
        results[n] = [(name, statistics.median(ts), ts) for name, ts in times.items()]
    for n, rows in results.items():
        first = rows[0][1]
        for name, ms, times in rows:
            print(f"images {n}  {name:<36} {ms:7.1f} ms/step  {first / ms:5.2f}x  "
                  f"({', '.join(f'{t:.1f}' for t in times)})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
