"""VQGAN decode time with XLA:CPU's default options vs the pipeline's: an A/B in one process.

    python benchmarks/vqgan_decode.py DIR [--runs 9] [--dtype float32]

DIR is a VQGAN directory or a model directory with vqgan/ inside (e.g. W/mini-model from
`python benchmarks/generate.py --preset mini --only ours1 --runs 1 --workdir W`). Compiles
the decode of one image (the pipeline's own jit, `pipeline._decode_jit`) twice: with XLA's
defaults and with `xla_cpu.compiler_options()` (what the pipeline uses for float32
weights), then times them alternately, `--runs` times each after a warm-up, on the same
random codes, and prints each median, their ratio, the largest pixel difference and
XLA's temporaries of each (`memory_analysis`). Alternating keeps the machine's slow
phases out of the ratio.
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vqgan_dir", type=Path)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dalle_mini_jax import xla_cpu
    from dalle_mini_jax.pipeline import VQGANDecoder, _decode_jit

    path = args.vqgan_dir / "vqgan" if (args.vqgan_dir / "vqgan").is_dir() else args.vqgan_dir
    vq = VQGANDecoder.from_pretrained(path, dtype=args.dtype)
    graphdef, state = nnx.split(vq)
    S = vq.config.num_tokens
    codes = jnp.asarray(np.random.default_rng(0).integers(0, vq.config.codebook_size, (1, S)), jnp.int32)
    done = jnp.int32(S)
    variants = {"XLA defaults": {}, "xla_cpu.compiler_options()": xla_cpu.compiler_options()}
    compiled = {name: _decode_jit(**opts).lower(graphdef, state, codes, done).compile()
                for name, opts in variants.items()}
    out = {name: np.asarray(f(state, codes, done)) for name, f in compiled.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(args.runs):
        for name, f in compiled.items():
            t = time.perf_counter()
            f(state, codes, done).block_until_ready()
            times[name].append(time.perf_counter() - t)
    first = None
    print(f"{path} {args.dtype}: one {vq.config.resolution}x{vq.config.resolution} image, "
          f"median of {args.runs} (alternating)")
    for name, f in compiled.items():
        med = statistics.median(times[name])
        first = first or med
        diff = float(np.abs(out[name] - out["XLA defaults"]).max())
        temps = f.memory_analysis().temp_size_in_bytes / 2**20
        print(f"  {name:<28} {med:6.3f} s  {first / med:5.2f}x  max |diff| {diff:.1e}  "
              f"temporaries {temps:6.1f} MiB  options {variants[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
