"""Where generation's memory goes: RSS and peak RSS after each stage of loading and generating.

    python benchmarks/generate.py --preset mini --only ours1 --runs 1 --workdir /tmp/bench_mini
    python benchmarks/load_memory.py /tmp/bench_mini/mini-model [--dtype bfloat16] [--compiled]
        [--generations 4] [--default-arenas]
    python benchmarks/load_memory.py /tmp/bench_mini/mini-model --timeline [--dtype bfloat16]

The stages are those of `DalleMini.from_pretrained` taken apart (VQGAN decoder,
DalleBart, the sampler's per-layer split, the VQGAN decode compiled), with glibc's
`malloc_trim` after each, then `--generations` generations, each followed by a trim.
Like from_pretrained it first limits glibc to one arena (`host_memory.one_arena`);
`--default-arenas` leaves glibc's defaults, for comparison. Each line: seconds since
start, stage, VmRSS and VmHWM (peak) in MiB, read from /proc/self/status (Linux).
With --compiled, then XLA's own account of the three
compiled functions of one guided image (the sampler's start = encoder + cross K/V, its
decode loop, the VQGAN decode): arguments and temporaries in MiB, from
`Compiled.memory_analysis()`. Compare the peak with `benchmarks/generate.py`'s
`peak_rss_mb` for ours1 to see what the pipeline's own order of stages costs.

With --timeline, none of that: `DalleMini.from_pretrained` itself and `--generations`
generations, RSS sampled every millisecond by a thread (`RssSampler`), and for each
phase (loading; each generation's start, decode loop, VQGAN decode and the gaps
between) its RSS at the start, its highest and when, and at the end: where the peak
is, and what it sits on.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from generate import proc_memory_mb  # noqa: E402  (benchmarks/generate.py, beside this file)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="a model directory with vqgan/ inside")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt", default="a red square on a white background")
    p.add_argument("--probe", action="store_true",
                   help="before the split, wait for every weight to be on the device, read one "
                        "stacked decoder weight on the host (np.asarray) and run gc.collect(), "
                        "reporting after each; then stop")
    p.add_argument("--generations", type=int, default=2,
                   help="generations to run, each followed by a malloc_trim (default 2)")
    p.add_argument("--default-arenas", action="store_true",
                   help="leave glibc's per-thread arenas as they are (from_pretrained "
                        "calls host_memory.one_arena)")
    p.add_argument("--compiled", action="store_true",
                   help="after the generations, print XLA's memory analysis of the compiled "
                        "start, decode loop and VQGAN decode")
    p.add_argument("--programs", action="store_true",
                   help="after the generations, compile the decode loop for 3 more top-k values, "
                        "reporting RSS after each compile, after gc.collect() and after a malloc_trim "
                        "(as host_memory.compile_then_trim does): what a compiled program keeps")
    p.add_argument("--timeline", action="store_true",
                   help="instead of the stages: DalleMini.from_pretrained itself, then --generations "
                        "generations, with RSS sampled every millisecond by a thread; prints each "
                        "phase's RSS at its start, its highest (and when) and at its end")
    args = p.parse_args(argv)
    if args.timeline:
        return timeline(args)
    start = time.perf_counter()

    def report(stage: str) -> None:
        mem = proc_memory_mb()
        print(f"{time.perf_counter() - start:6.1f} s  {stage:<28} RSS {mem['VmRSS']:7.0f} MiB  "
              f"peak {mem['VmHWM']:7.0f} MiB", flush=True)

    report("start")
    from dalle_mini_jax import pipeline as pl
    from dalle_mini_jax.config import DalleBartConfig
    from dalle_mini_jax.host_memory import large_buffers_mapped, one_arena, return_free_memory
    from dalle_mini_jax.text import TextTokenizer
    from dalle_mini_jax.transformer import IMAGE_TABLE, TEXT_TABLE, DalleBart

    report("imports")
    if not args.default_arenas:
        one_arena()  # as from_pretrained, before any computation
    dtype = pl.resolve_dtype(args.dtype)
    loading = contextlib.ExitStack()  # from_pretrained's allocator setting, until the split
    loading.enter_context(large_buffers_mapped())
    config = DalleBartConfig.load(args.model_dir / "config.json")
    vqgan = pl.VQGANDecoder.from_pretrained(args.model_dir / "vqgan", dtype=dtype)
    return_free_memory()
    report("VQGAN decoder loaded")
    loading.close()
    pl.compile_vqgan_decode(vqgan)
    report("VQGAN decode compiled")
    loading = contextlib.ExitStack()
    loading.enter_context(large_buffers_mapped())
    # As DalleMini.from_pretrained on a CPU: both token tables stay in the file.
    model, on_host = DalleBart.from_pretrained_tables_on_host(args.model_dir, dtype=dtype)
    report("DalleBart loaded")
    return_free_memory()
    report("trimmed")
    if args.probe:
        import gc

        import numpy as np

        import jax
        from flax import nnx

        t = time.perf_counter()
        jax.block_until_ready(nnx.state(model))
        report(f"all weights ready ({time.perf_counter() - t:.2f} s)")
        host = np.asarray(model.dec_layers.self_attn.q[...])  # a view: no copy of the data
        report(f"host read {host.nbytes >> 20} MiB weight")
        report(f"gc.collect() freed {gc.collect()} objects")
        return_free_memory()
        report("trimmed")
        loading.close()
        return 0
    tokenizer = TextTokenizer.from_pretrained(args.model_dir, text_len=config.text_len,
                                              normalize=config.normalize_text)
    pipe = pl.DalleMini(model, vqgan, tokenizer, name=args.model_dir.name, release_stacked=True,
                        text_table=on_host[TEXT_TABLE], image_table=on_host[IMAGE_TABLE])
    loading.close()
    report("layers split (enc + dec)")
    return_free_memory()
    report("trimmed")
    pipe._vq_compiled = True  # compile_vqgan_decode above
    pipe.compile_for()
    report("default generation compiled")
    for i in range(1, args.generations + 1):
        pipe.generate([args.prompt], num_images=1, seed=i, top_k=50, guidance=10.0, top_p=None,
                      temperature=1.0)
        report(f"generate {i}")
        return_free_memory()
        report("trimmed")
    if args.compiled:
        compiled_memory(pipe, args.prompt)
    if args.programs:
        program_memory(pipe, args.prompt, report)
    return 0


class RssSampler:
    """A thread reading this process's RSS (/proc/self/statm) every millisecond into
    preallocated arrays (no Python objects per sample: they would be counted too), each
    sample labelled with the phase current at the time (`phase`)."""

    def __init__(self, capacity: int = 1 << 20):
        import os
        import threading

        import numpy as np

        self.t = np.zeros(capacity)
        self.rss = np.zeros(capacity, np.int32)  # MiB
        self.label = np.zeros(capacity, np.int16)
        self.phases = ["import"]
        self.n = 0
        self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import os

        while not self._stop and self.n < len(self.t):
            i = self.n
            self.t[i] = time.perf_counter()
            self.rss[i] = int(os.pread(self._fd, 64, 0).split()[1]) * self._page >> 20
            self.label[i] = len(self.phases) - 1
            self.n = i + 1
            time.sleep(0.001)

    def phase(self, name: str) -> None:
        self.phases.append(name)

    def stop(self) -> None:
        time.sleep(0.01)
        self._stop = True
        self._thread.join()

    def report(self) -> None:
        import numpy as np

        t0 = self.t[0]
        for k, name in enumerate(self.phases):
            at = np.nonzero(self.label[:self.n] == k)[0]
            if len(at) == 0:
                continue
            r, top = self.rss[at], at[np.argmax(self.rss[at])]
            print(f"{self.t[at[0]] - t0:7.2f} s  {name:<22} RSS {r[0]:5d} MiB, highest {r.max():5d} "
                  f"at +{self.t[top] - self.t[at[0]]:6.2f} s, end {r[-1]:5d}  "
                  f"({self.t[at[-1]] - self.t[at[0]]:.2f} s)")
        print(f"highest RSS sampled {self.rss[:self.n].max()} MiB; peak (VmHWM) "
              f"{proc_memory_mb()['VmHWM']:.0f} MiB")


def timeline(args) -> int:
    """`--timeline`: from_pretrained and generations as a user runs them, RSS by phase.

    Each generation's phases (the sampler's start, its decode loop, the VQGAN decode) are
    marked by wrapping those calls; the wrappers wait for their results, so a phase's
    RSS is its own, not the next one's (the pipeline itself dispatches ahead).
    """
    sampler = RssSampler()
    import jax

    from dalle_mini_jax.pipeline import DalleMini

    sampler.phase("from_pretrained")
    pipe = DalleMini.from_pretrained(args.model_dir, dtype=args.dtype)
    start, run, decode = pipe._start, pipe.sampler.run, pipe.decode_codes
    gen = [0]

    def marked(name, f):
        def call(*a, **kw):
            sampler.phase(f"{gen[0]}: {name}")
            out = f(*a, **kw)
            jax.block_until_ready(out)
            sampler.phase(f"{gen[0]}: after {name}")
            return out
        return call

    pipe._start = marked("start", start)
    pipe.sampler.run = marked("decode loop", run)
    pipe.decode_codes = marked("VQGAN decode", decode)
    for i in range(1, args.generations + 1):
        gen[0] = i
        pipe.generate([args.prompt], num_images=1, seed=i, top_k=50, guidance=10.0, top_p=None,
                      temperature=1.0)
    sampler.phase("end")
    sampler.stop()
    sampler.report()
    return 0


def program_memory(pipe, prompt: str, report) -> None:
    """RSS kept by each newly compiled decode loop (top-k 40, 30, 20: new programs)."""
    import gc

    from dalle_mini_jax import sampling
    from dalle_mini_jax.host_memory import return_free_memory

    batch = pipe._plan([prompt], 1, 1, 1.0, 50, None, 10.0, 1)[2][0]
    ids, mask, rows, uncond_row, keys = pipe._start_inputs(batch, sampling.SamplingSettings())
    state = pipe.sampler.start(ids, mask, rows, uncond_row)
    gc.collect()
    return_free_memory()
    report("decode state, trimmed")
    for k in (40, 30, 20):
        settings = sampling.SamplingSettings(top_k=k, guidance=10.0)
        pipe.sampler.lower_run(state, keys, 0, pipe.config.image_len, settings).compile()
        report(f"decode loop top-k {k} compiled")
        gc.collect()
        report("  gc.collect()")
        return_free_memory()
        report("  trimmed")


def compiled_memory(pipe, prompt: str) -> None:
    """XLA's memory analysis of the three compiled functions of one guided image."""
    import jax.numpy as jnp

    from dalle_mini_jax import sampling

    settings = sampling.SamplingSettings(top_k=50, guidance=10.0)
    batch = pipe._plan([prompt], 1, 1, 1.0, 50, None, 10.0, 1)[2][0]
    ids, mask, rows, uncond_row, keys = pipe._start_inputs(batch, settings)
    state = pipe.sampler.start(ids, mask, rows, uncond_row)
    S = pipe.config.image_len
    codes = jnp.zeros((1, S), jnp.int32)
    for name, compiled in (
        ("start (encoder, cross K/V)",
         pipe.sampler.lower_start(ids, mask, rows, uncond_row).compile()),
        ("decode loop", pipe.sampler.lower_run(state, keys, 0, S, settings).compile()),
        ("VQGAN decode", pipe._vq_decode.lower(pipe._vq_graphdef, pipe._vq_state, codes,
                                               jnp.int32(S)).compile()),
    ):
        m = compiled.memory_analysis()
        print(f"compiled {name:<28} arguments {m.argument_size_in_bytes / 2**20:7.1f} MiB  "
              f"temporaries {m.temp_size_in_bytes / 2**20:7.1f} MiB", flush=True)


if __name__ == "__main__":
    sys.exit(main())
