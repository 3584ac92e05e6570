"""VQGAN decode: time and temporaries of whole maps vs strips of rows, with XLA:CPU's
default options and with the pipeline's, an A/B in one process.

    python benchmarks/vqgan_decode.py DIR [--runs 9] [--dtype float32] [--rows 32 16]

DIR is a VQGAN directory or a model directory with vqgan/ inside (e.g. W/mini-model from
`python benchmarks/generate.py --preset mini --only ours1 --runs 1 --workdir W`). Compiles
the decode of one image (the pipeline's own jit, `pipeline._decode_jit`) with whole maps
and with each strip height of `--rows` (`vqgan.conv_rows`; default the pipeline's,
`VQGANDecoder.ROWS`), each with XLA's defaults and with `xla_cpu.compiler_options()`,
then times them alternately, `--runs` times each after a warm-up, on the same random
codes, and prints each median, its speed-up over the first (whole maps, XLA defaults),
the largest pixel difference from it and XLA's temporaries (`memory_analysis`). The
pipeline's own choice for `--dtype` (`pipeline.vqgan_decode_fn`) is marked.
Alternating keeps the machine's slow phases out of the ratios.
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
    p.add_argument("--rows", type=int, nargs="+", default=None,
                   help="strip heights to compare with whole maps (default: VQGANDecoder.ROWS)")
    args = p.parse_args(argv)

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dalle_mini_jax import xla_cpu
    from dalle_mini_jax.pipeline import VQGANDecoder, _decode_jit, vqgan_decode_fn

    path = args.vqgan_dir / "vqgan" if (args.vqgan_dir / "vqgan").is_dir() else args.vqgan_dir
    vq = VQGANDecoder.from_pretrained(path, dtype=args.dtype)
    graphdef, state = nnx.split(vq)
    S = vq.config.num_tokens
    codes = jnp.asarray(np.random.default_rng(0).integers(0, vq.config.codebook_size, (1, S)), jnp.int32)
    done = jnp.int32(S)
    variants = {}
    for rows in [None] + (args.rows or [VQGANDecoder.ROWS]):
        for opts_name, opts in (("XLA defaults", {}), ("compiler_options()", xla_cpu.compiler_options())):
            name = f"{'whole maps' if rows is None else f'strips of {rows}'}, {opts_name}"
            variants[name] = _decode_jit(rows, **opts)
    ours = [name for name, f in variants.items() if f is vqgan_decode_fn(args.dtype)]
    compiled = {name: f.lower(graphdef, state, codes, done).compile() for name, f in variants.items()}
    out = {name: np.asarray(f(state, codes, done)) for name, f in compiled.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(args.runs):
        for name, f in compiled.items():
            t = time.perf_counter()
            f(state, codes, done).block_until_ready()
            times[name].append(time.perf_counter() - t)
    first = None
    base = next(iter(out.values()))
    print(f"{path} {args.dtype}: one {vq.config.resolution}x{vq.config.resolution} image, "
          f"median of {args.runs} (alternating)")
    for name, f in compiled.items():
        med = statistics.median(times[name])
        first = first or med
        diff = float(np.abs(out[name] - base).max())
        temps = f.memory_analysis().temp_size_in_bytes / 2**20
        mark = "  <- the pipeline's" if name in ours else ""
        print(f"  {name:<36} {med:6.3f} s  {first / med:5.2f}x  max |diff| {diff:.1e}  "
              f"temporaries {temps:6.1f} MiB{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
