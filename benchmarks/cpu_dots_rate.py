"""How fast `cpu_dots.rows_dot` reads weights, against the machine's plain read, in one run.

    python benchmarks/cpu_dots_rate.py [--rows 2 18] [--weights 60] [--shape 2730 1024]
        [--dtype float32] [--runs 7] [--threads N] [--gib 1.0] [--json]

A chain of `--weights` products, each of x [M, K] (M = each of `--rows`) by its own
weight [N, K] (`--shape N K`, default DALL-E Mini's GLU: 60 of them are 671 MB of f32,
far more than any cache), jitted as one program the way a decode step calls them, each
product's x depending on the one before (so XLA cannot run two at once). It prints the
median time of `--runs` calls, the bytes of weights read per second, and that rate's
ratio to the machine's plain read measured just before and after (the faster of the two;
`generate.memory_bandwidth`): the part of a decode step's distance from its bandwidth
floor that the products alone account for. It also prints the kernel's vector width
(`cpu_dots.vector_bytes()`). With --json the last line is one JSON object.

M = 2 is one guided image (its conditional and unconditional rows), 18 a 3x3 grid.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import _median_runs, memory_bandwidth  # noqa: E402


def product_chain(num_weights: int, n: int, k: int, rows: int, dtype: str, threads: int | None, runs: int) -> dict:
    """Median seconds of one call of the chain and the weight bytes it reads."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dalle_mini_jax import cpu_dots

    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((n, k), dtype=np.float32), dtype) for _ in range(num_weights)]
    x = jnp.asarray(rng.standard_normal((rows, k), dtype=np.float32))
    width = min(n, k)

    @jax.jit
    def chain(x, ws):
        for w in ws:
            y = cpu_dots.rows_dot(x, [w], num_threads=threads)[0]
            x = x.at[:, :width].add(y[:, :width] * 1e-9)  # the next product waits for this one
        return x

    seconds, _ = _median_runs(lambda: chain(x, ws).block_until_ready(), runs)
    return {"s": seconds, "bytes": sum(w.nbytes for w in ws)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[2, 18])
    p.add_argument("--weights", type=int, default=60)
    p.add_argument("--shape", type=int, nargs=2, default=[2730, 1024], metavar=("N", "K"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="threads per product (default: all cores)")
    p.add_argument("--gib", type=float, default=1.0, help="size of the plain read's array")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if min(args.rows) < 1 or args.weights < 1 or args.runs < 1 or min(args.shape) < 1:
        p.error("--rows, --weights, --runs and --shape must be positive")

    from dalle_mini_jax import cpu_dots

    if not cpu_dots.available():
        print(f"cpu_dots is not available here: {cpu_dots.reason()}", file=sys.stderr)
        return 1
    out = {"vector_bytes": cpu_dots.vector_bytes(), "threads": args.threads or cpu_dots.cpu_cores(),
           "dtype": args.dtype, "shape": args.shape, "weights": args.weights, "rows": {}}
    print(f"cpu_dots: {out['vector_bytes']}-byte vectors, {out['threads']} thread(s); "
          f"{args.weights} weights [{args.shape[0]}, {args.shape[1]}] {args.dtype}, median of {args.runs}")
    for m in args.rows:
        before = memory_bandwidth(args.gib)["best"]
        r = product_chain(args.weights, *args.shape, m, args.dtype, args.threads, args.runs)
        after = memory_bandwidth(args.gib)["best"]
        rate, plain = r["bytes"] / r["s"], max(before, after)
        out["rows"][m] = {"ms": r["s"] * 1e3, "gb_s": rate / 1e9, "plain_gb_s": plain / 1e9,
                          "plain_over_kernel": plain / rate}
        print(f"  M={m:<3} {r['s'] * 1e3:8.2f} ms  {rate / 1e9:6.2f} GB/s   plain read {plain / 1e9:6.2f} GB/s   "
              f"plain / kernel {plain / rate:.3f}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
