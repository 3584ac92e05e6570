"""Where a decode step's time goes: XLA:CPU's per-op times in the sampler's decode loop.

    python benchmarks/decode_profile.py DIR [--images 1] [--dtype float32] [--steps 32] [--begin 4]
        [--top 25]

DIR is a model directory (e.g. W/mini-model from `python benchmarks/generate.py --preset
mini --only ours1 --runs 1 --workdir W`). Loads it as a pipeline, runs `--steps` guided
decode steps (top-k 50, guidance 10) under `jax.profiler` after a warm-up, and prints, per
kind of op, the time XLA:CPU's threads spent in it per step, summed over the threads
(ops are grouped by kind, the op name in the source and the output shape, from the
compiled program's text), next to the wall time per step. A sum well above the wall
time means ops ran at once on several threads; close to it, one at a time. The
profiler costs some time itself: compare with `benchmarks/decode_step.py`.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def op_table(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """{instruction name: (output shape, opcode, source op name)} of a compiled program."""
    info = {}
    # A shape is one array type, or a tuple of them in parentheses (a call with several results).
    for m in re.finditer(r"^\s+%(\S+) = (\([^)]*\)|\S+) (\S+?)\((.*)$", hlo_text, re.M):
        name, shape, op, rest = m.groups()
        src = re.search(r'op_name="([^"]+)"', rest)
        info[name] = (re.sub(r"\{[^}]*\}", "", shape), op, src.group(1).split("/")[-1] if src else "")
    return info


def body_size(hlo_text: str) -> int:
    """Instructions in the largest computation of a compiled program (the decode loop's body)."""
    comps = re.split(r"\n(?=\S)", hlo_text)
    return max(sum(" = " in line for line in c.splitlines()[1:]) for c in comps)


def self_times(events) -> list[tuple[str, int]]:
    """(name, ns) of each event on one thread less the time of the events inside it: a
    while loop's own time, not its body's (the body's ops are events of their own)."""
    out, open_ = [], []  # open_: [end_ns, index into out] of the events enclosing this one
    for ev in sorted(events, key=lambda e: (e.start_ns, -e.duration_ns)):
        while open_ and open_[-1][0] <= ev.start_ns:
            open_.pop()
        if open_:
            out[open_[-1][1]][1] -= ev.duration_ns
        out.append([ev.name, ev.duration_ns])
        open_.append([ev.start_ns + ev.duration_ns, len(out) - 1])
    return [tuple(x) for x in out]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--begin", type=int, default=4,
                   help="first position profiled (>= 1; the steps before it run unprofiled): a step's "
                        "attention reads the cache up to its position")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)

    import jax
    from jax._src import profiler as jax_profiler
    from jaxlib import _profiler

    from dalle_mini_jax import cpu_dots
    from dalle_mini_jax.pipeline import DalleMini
    from dalle_mini_jax.sampling import SamplingSettings

    pipe = DalleMini.from_pretrained(args.model_dir, dtype=args.dtype)
    n = args.images
    settings = SamplingSettings(top_k=50, guidance=10.0)
    batch = pipe._plan(["a red square"], n, 1, 1.0, 50, None, 10.0, n)[2][0]
    state, keys = pipe._start(batch, settings)
    if not 1 <= args.begin <= pipe.config.image_len - args.steps:
        p.error(f"--begin must be in 1..{pipe.config.image_len - args.steps} (image_len - --steps)")
    state = pipe.sampler.run(state, keys, 0, args.begin, settings)  # compiles and warms up
    jax.block_until_ready(state)
    hlo = pipe.sampler.lower_run(state, keys, 0, pipe.config.image_len, settings).compile().as_text()

    session = _profiler.ProfilerSession(_profiler.ProfileOptions())
    t = time.perf_counter()
    state = pipe.sampler.run(state, keys, args.begin, args.begin + args.steps, settings)
    state.tokens.block_until_ready()
    wall_ms = (time.perf_counter() - t) / args.steps * 1e3
    data = jax_profiler.ProfileData.from_serialized_xspace(session.stop())

    info = op_table(hlo)
    spent = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            # XLA:CPU's threads: its intra-op pool, or the client's thread that runs a
            # program itself (which one runs the decode loop has varied between runs).
            if not line.name.startswith(("tf_XLAEigen", "tf_XLAPjRtCpuClient")):
                continue
            for name, ns in self_times(line.events):
                if name in info:
                    shape, op, src = info[name]
                    kind = op if op != "fusion" else re.sub(r"[._]?\d+$", "", name)
                    spent[(kind, src, shape)] += ns
    total = sum(spent.values()) / 1e6 / args.steps
    print(f"{args.model_dir} {args.dtype}, {n} image(s), {args.steps} steps from position {args.begin}: "
          f"{wall_ms:.1f} ms a step (wall, profiled); ops {total:.1f} ms a step summed over the threads; "
          f"the loop's body: {body_size(hlo)} instructions; cpu_dots vectors: {cpu_dots.vector_bytes()} bytes")
    for (kind, src, shape), ns in spent.most_common(args.top):
        print(f"  {ns / 1e6 / args.steps:7.2f} ms  {kind:<28} {src:<22} {shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
