"""Versions of the cpu_dots kernel against each other in one process, round by round.

    python benchmarks/cpu_dots_ab.py [VERSION ...] [--rows 2] [--dtype float32] [--rounds 25]
        [--weights 60] [--shape 2730 1024] [--pages 4k|huge|both] [--json]

VERSION is a git revision (the kernel as committed there) or the path of a cpu_dots.cc,
optionally named as NAME=VERSION; by default HEAD's kernel against the working tree's
(`HEAD dalle_mini_jax/cpu_dots.cc`). The first version is the one the others are
divided by.

Why not `cpu_dots_rate.py` twice: this machine's memory read moves by 20-30 % from one
minute to the next, more than most kernel changes, and one process holds one kernel
(the library is loaded once). Here every version's products (`run_rows`, the pool
included) are compiled into one program, each in a namespace of its own with its own
thread pool, and every round times each version's chain (`--weights` products of x
[M, K] by weights [N, K] in a row, each waiting for the one before, as a decode step
calls them; two timed calls after an untimed one) and a plain read of the same weights,
both on `--threads` threads (default: every core, as the pipeline's products). Each
version's time is divided by the first version's and by the plain read's within the
round, and the medians over rounds are printed: the ratios hold still while the
machine does not.

`--pages both` runs every version on two sets of the same weights, one on 4 KiB pages
(as XLA's buffers are) and one on 2 MiB transparent huge pages (as the numpy array that
`generate.memory_bandwidth` reads is: numpy asks for them for large arrays), each with
its own plain read.

The versions take turns in a rotating order (round r starts with version r mod the
count), so none always runs after the same one. Keep the weights well beyond the
last-level cache (the default, 60 of 11 MB): with a few weights, what one call leaves
in the cache decides the next call's time. Copies of one kernel (`a=HEAD b=HEAD
c=HEAD`) show the resolution: on the AMD EPYC 2-core machine (2026-12-04), with the
default 60 weights and 20 rounds, 0.960 to 1.018 of the first copy's time in f32 and
0.977 to 0.983 in bf16, so differences under ~4 % are not told apart (the copies'
code lies at different addresses, one possible reason).

Before timing, every version's products are checked against the first's. The kernel's
FFI handlers are not compiled in: this times its products and pool, not XLA's call.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL = "dalle_mini_jax/cpu_dots.cc"

# Everything the kernel includes, included once outside the namespaces (each version's
# own #include lines are dropped: inside a namespace they would declare the library
# there).
_PRELUDE = """\
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include "xla/ffi/api/ffi.h"

typedef void (*Chain)(const std::vector<void*>&, float*, float*, int64_t, int64_t, int64_t, bool);
int g_threads = 1;  // threads per product and for the plain read (set by main)
"""

# Per version: its chain of products, each product's x made to wait for the last product.
_CHAIN = """
void chain(const std::vector<void*>& ws, float* x, float* y, int64_t M, int64_t N, int64_t K, bool bf16) {
  for (void* w : ws) {
    std::vector<Weight> one{Weight{w, bf16, y, N}};
    run_rows(one, x, M, K, g_threads);
    x[0] += y[0] * 1e-9f;
  }
}
"""

_MAIN = r"""
// Each of g_threads threads sums its share of every weight (no barrier between weights):
// the read the products are measured against.
double plain_sum(const std::vector<void*>& ws, int64_t lo, int64_t hi) {
  typedef float v8 __attribute__((vector_size(32), aligned(4)));
  v8 acc[8] = {};
  for (void* w : ws) {
    const float* p = static_cast<const float*>(w) + lo;
    const float* e = static_cast<const float*>(w) + hi;
    for (; p + 64 <= e; p += 64)
      for (int j = 0; j < 8; ++j) acc[j] += *reinterpret_cast<const v8*>(p + 8 * j);
  }
  double s = 0;
  for (int j = 0; j < 8; ++j)
    for (int i = 0; i < 8; ++i) s += acc[j][i];
  return s;
}

void plain(const std::vector<void*>& ws, int64_t bytes) {
  const int64_t floats = bytes / 4, T = g_threads;
  std::vector<double> sums(size_t(T), 0.0);
  auto share = [&](int64_t t) {  // [lo, hi) of thread t, whole 64-float groups but the last
    const int64_t lo = floats * t / T / 64 * 64, hi = t + 1 == T ? floats : floats * (t + 1) / T / 64 * 64;
    sums[size_t(t)] = plain_sum(ws, lo, hi);
  };
  std::vector<std::thread> helpers;
  for (int64_t t = 1; t < T; ++t) helpers.emplace_back(share, t);
  share(0);
  for (std::thread& h : helpers) h.join();
  volatile double keep = 0;  // the sums are used: the reads are not optimised away
  for (double v : sums) keep = keep + v;
}

double seconds(const std::function<void()>& f) {
  auto t = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// The weights of one chain; `huge`: each on 2 MiB pages (aligned to them, madvise'd
// before the first touch), as the plain read's numpy array is (numpy asks for huge
// pages for its large arrays).
std::vector<void*> make_weights(int64_t NW, int64_t N, int64_t K, bool bf16, bool huge) {
  const int64_t bytes = N * K * (bf16 ? 2 : 4), page = huge ? int64_t(2) << 20 : 64;
  const int64_t size = (bytes + page - 1) / page * page;
  std::vector<void*> ws;
  for (int64_t i = 0; i < NW; ++i) {
    void* w = aligned_alloc(page, size);
    if (huge) madvise(w, size, MADV_HUGEPAGE);  // a refusal leaves 4 KiB pages: huge_kb tells
    for (int64_t j = 0; j < N * K; ++j) {
      float v = 1e-3f * float((j * 7 + i) % 97) - 0.048f;
      uint32_t b;
      std::memcpy(&b, &v, 4);
      if (bf16) static_cast<uint16_t*>(w)[j] = uint16_t(b >> 16);
      else static_cast<float*>(w)[j] = v;
    }
    ws.push_back(w);
  }
  return ws;
}

// KiB of this process's memory on transparent huge pages (0 where unknown).
long huge_kb() {
  FILE* f = fopen("/proc/self/smaps_rollup", "r");
  if (!f) return 0;
  char line[256];
  long kb = 0;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "AnonHugePages: %ld kB", &kb) == 1) break;
  fclose(f);
  return kb;
}

void timed(const char* label, const std::function<void()>& f) {
  printf(" | %s", label);
  for (int rep = 0; rep < 3; ++rep) {
    const double s = seconds(f);
    if (rep) printf(" %.9f", s);  // the first call of each is not timed (ns: a tiny read is < 1 us)
  }
}

int main(int argc, char** argv) {
  // argv: rounds M N K weights bf16 pages (0: 4 KiB, 1: huge, 2: both) threads
  const int rounds = atoi(argv[1]);
  const int64_t M = atoll(argv[2]), N = atoll(argv[3]), K = atoll(argv[4]), NW = atoll(argv[5]);
  const bool bf16 = atoi(argv[6]);
  const int pages = atoi(argv[7]);
  g_threads = atoi(argv[8]);
  const int64_t bytes = N * K * (bf16 ? 2 : 4);
  std::vector<std::vector<void*>> sets;
  if (pages != 1) sets.push_back(make_weights(NW, N, K, bf16, false));
  const long before = huge_kb();
  if (pages != 0) sets.push_back(make_weights(NW, N, K, bf16, true));
  printf("huge_kb %ld\n", huge_kb() - before);
  float* x = static_cast<float*>(aligned_alloc(64, M * K * 4));
  float* y = static_cast<float*>(aligned_alloc(64, M * N * 4));
  const int P = sizeof(kChains) / sizeof(kChains[0]), S = int(sets.size());
  // The same products from every version (one weight, the same x).
  std::vector<float> first;
  for (int p = 0; p < P; ++p) {
    for (int64_t i = 0; i < M * K; ++i) x[i] = std::sin(0.01f * float(i));
    std::vector<void*> one{sets[0][0]};
    kChains[p](one, x, y, M, N, K, bf16);
    if (p == 0) first.assign(y, y + M * N);
    for (int64_t i = 0; i < M * N; ++i)
      if (std::fabs(y[i] - first[i]) > 1e-4f * (1.f + std::fabs(first[i]))) {
        printf("MISMATCH %s y[%lld] = %g, %s gives %g\n", kNames[p], (long long)i, y[i], kNames[0], first[i]);
        return 3;
      }
  }
  for (int64_t i = 0; i < M * K; ++i) x[i] = 1.f;
  for (int r = 0; r <= rounds; ++r) {  // round 0: warm-up, not printed
    printf("round %d", r);
    for (int s = 0; s < S; ++s) timed(("plain" + std::to_string(s)).c_str(), [&] { plain(sets[s], bytes); });
    for (int q = 0; q < P; ++q)  // each round starts with the next version: no version always follows another
      for (int s = 0; s < S; ++s) {
        const int p = (q + r) % P;
        timed(std::to_string(p * S + s).c_str(), [&] { kChains[p](sets[s], x, y, M, N, K, bf16); });
        // The version just timed leaves its pool's worker spinning for ~1 ms: let it sleep.
        std::this_thread::sleep_for(std::chrono::milliseconds(3));
      }
    printf("\n");
    fflush(stdout);
  }
  return 0;
}
"""


def kernel_source(version: str) -> str:
    """A version's cpu_dots.cc: the file at `version` if it is one, else git's at that revision."""
    path = Path(version)
    if path.is_file():
        return path.read_text()
    run = subprocess.run(["git", "show", f"{version}:{KERNEL}"], cwd=REPO, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{version!r} is neither a file nor a git revision with {KERNEL}: {run.stderr.strip()}")
    return run.stdout


def wrapped(name: str, index: int, source: str) -> str:
    """The kernel's anonymous namespace (its products and pool), without its FFI handlers
    and #include lines, inside namespace v<index>, with a chain of products."""
    lines = source.splitlines()
    try:
        end = next(i for i, line in enumerate(lines) if line.startswith("}  // namespace"))
    except StopIteration:
        raise SystemExit(f"{name}: no '}}  // namespace' line closing the kernel's namespace") from None
    body = "\n".join(line for line in lines[: end + 1] if not line.startswith("#include"))
    return f"// ---- {name}\nnamespace v{index} {{\n{body}\n{_CHAIN}}}  // namespace v{index}\n"


def program(versions: list[tuple[str, str]]) -> str:
    """One C++ program: every version wrapped, the table of their chains, the timing loop."""
    chains = ", ".join(f"v{i}::chain" for i in range(len(versions)))
    names = ", ".join(json.dumps(name) for name, _ in versions)
    return "".join([_PRELUDE, *(wrapped(name, i, src) for i, (name, src) in enumerate(versions)),
                    f"const Chain kChains[] = {{{chains}}};\n", f"const char* const kNames[] = {{{names}}};\n", _MAIN])


def parse_rounds(text: str) -> list[dict[str, list[float]]]:
    """[{"plain0": [s, s], "0": [s, s], "1": ...}, ...] of the timed rounds (round 0 dropped)."""
    out = []
    for line in text.splitlines():
        m = re.match(r"round (\d+) \| (.*)", line)
        if not m or m.group(1) == "0":
            continue
        row = {}
        for field in m.group(2).split(" | "):
            label, *times = field.split()
            row[label] = [float(t) for t in times]
        out.append(row)
    return out


def summarise(rounds: list[dict], names: list[str], set_names: list[str], bytes_per_chain: float) -> dict:
    """Medians over all timed calls: GB/s of each version on each set of weights and of
    the plain reads; each time over the first's, and each set's plain read over it
    (paired call by call). `names`: one per version and set, the sets innermost."""
    import statistics

    def rate(times):
        return bytes_per_chain / statistics.median(times) / 1e9

    out = {"plain_gb_s": {}, "versions": {}}
    for s, set_name in enumerate(set_names):
        out["plain_gb_s"][set_name] = rate([t for r in rounds for t in r[f"plain{s}"]])
    for i, name in enumerate(names):
        key, plain = str(i), f"plain{i % len(set_names)}"
        out["versions"][name] = {
            "gb_s": rate([t for r in rounds for t in r[key]]),
            "time_over_first": statistics.median(a / b for r in rounds for a, b in zip(r[key], r["0"])),
            "plain_over_kernel": statistics.median(a / b for r in rounds for a, b in zip(r[key], r[plain])),
        }
    return out


# The sets of weights each version runs on, by --pages: (the program's argument, names).
_PAGES = {"4k": (0, ["4k"]), "huge": (1, ["huge"]), "both": (2, ["4k", "huge"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("versions", nargs="*", default=["HEAD", KERNEL],
                   help="git revisions or cpu_dots.cc paths, each optionally NAME=VERSION")
    p.add_argument("--rows", type=int, default=2, help="M, rows of x (2: one guided image; 18: a 3x3 grid)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--weights", type=int, default=60)
    p.add_argument("--shape", type=int, nargs=2, default=[2730, 1024], metavar=("N", "K"))
    p.add_argument("--threads", type=int, default=None, help="threads per product and read (default: all cores)")
    p.add_argument("--pages", default="4k", choices=list(_PAGES),
                   help="the weights on 4 KiB pages, on 2 MiB (transparent huge) pages, or each version on both")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.rows < 1 or args.rounds < 1 or args.weights < 1 or min(args.shape) < 1 or (args.threads or 1) < 1:
        p.error("--rows, --rounds, --weights, --shape and --threads must be positive")
    if not args.versions:
        p.error("name at least one version")

    from dalle_mini_jax import cpu_dots

    versions = []
    for v in args.versions:
        name, _, ref = v.rpartition("=")
        versions.append((name or ref, kernel_source(ref)))
    threads = args.threads or cpu_dots.cpu_cores()
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "ab.cc", Path(tmp) / "ab"
        src.write_text(program(versions))
        build = subprocess.run(cpu_dots.compile_command(src, exe, library=False), capture_output=True, text=True)
        if build.returncode:
            print(f"compiling the versions failed:\n{build.stderr[-3000:]}", file=sys.stderr)
            return 1
        n, k = args.shape
        pages, set_names = _PAGES[args.pages]
        run = subprocess.run([str(exe), str(args.rounds), str(args.rows), str(n), str(k), str(args.weights),
                              str(int(args.dtype == "bfloat16")), str(pages), str(threads)],
                             capture_output=True, text=True)
    if run.returncode:
        print(run.stdout[-2000:] + run.stderr[-2000:], file=sys.stderr)
        return 1
    names = [f"{name} {s}" if args.pages != "4k" else name for name, _ in versions for s in set_names]
    chain_bytes = args.weights * n * k * (2 if args.dtype == "bfloat16" else 4)
    out = summarise(parse_rounds(run.stdout), names, set_names, chain_bytes)
    huge_mb = int(re.search(r"^huge_kb (-?\d+)", run.stdout, re.M).group(1)) / 1024
    out.update(rows=args.rows, dtype=args.dtype, rounds=args.rounds, weights=args.weights, shape=args.shape,
               pages=args.pages, huge_page_mb=huge_mb, threads=threads)
    plain = ", ".join(f"{s} {r:.2f}" for s, r in out["plain_gb_s"].items())
    print(f"{args.weights} weights [{n}, {k}] {args.dtype}, M={args.rows}, {threads} thread(s), {args.rounds} rounds "
          f"(medians of {2 * args.rounds} calls each); plain read GB/s: {plain}")
    if args.pages != "4k":
        print(f"  the huge-page weights ({chain_bytes / 2**20:.0f} MiB, each rounded up to whole 2 MiB pages) "
              f"hold {huge_mb:.0f} MiB of huge pages")
    for name, r in out["versions"].items():
        print(f"  {name:<24} {r['gb_s']:6.2f} GB/s   time / {names[0]} {r['time_over_first']:.3f}   "
              f"plain / kernel {r['plain_over_kernel']:.3f}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
