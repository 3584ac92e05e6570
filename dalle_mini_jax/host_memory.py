"""The process's own memory on the host: what glibc keeps after XLA and the loader free.

On a CPU the "device" memory is the process's heap, and freed memory stays counted in
its resident set (RSS) until glibc gives it back. Generation frees a lot at a few known
points (loading's host tensors, the sampler's stacked weights, the compiler's working
memory, the decode loop's KV cache), and its peak was that garbage stacked under the
next allocation. These helpers give it back; all are no-ops off glibc (macOS, musl).
`benchmarks/load_memory.py` shows the effect stage by stage.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import time
from typing import Any, Callable

# mallopt's parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


@functools.cache  # looked up once: return_free_memory runs before every VQGAN decode
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (glibc or not)
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def large_buffers_mapped():
    """While loading, glibc serves each allocation of 1 MiB or more from its own mmap.

    Why: glibc's mmap threshold is dynamic. Once a mapped block is freed it rises to that
    block's size (up to 32 MiB), and from then on tensors of that size come from the heap,
    where freeing them keeps their pages (RSS) until a `malloc_trim`. Loading frees a
    model's worth of host tensors and the sampler's split frees the stacked layers, so the
    peak was one model plus that garbage. With a fixed 1 MiB threshold every freed tensor
    goes back to the OS at once (`benchmarks/load_memory.py DIR --dtype bfloat16`, mini:
    the peak of `from_pretrained` 1,436 -> 1,279 MiB).

    Not for generation: there the same setting made each image clearly slower (every new
    buffer is faulted in page by page; a scratch A/B, README), so on exit
    the thresholds are fixed where the dynamic rule would have taken them (mmap 32 MiB;
    trim twice that), and reuse from the heap is as fast as before.
    """
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def one_arena() -> bool:
    """Have glibc serve every thread from one heap (its main arena), unless the user
    chose otherwise (the MALLOC_ARENA_MAX environment variable). Returns whether set.

    Why: glibc gives threads their own arenas (up to 8 per core), and XLA's worker
    threads and compiler fill several. Memory freed in an arena other than the main
    one is given back only when a whole region at its top is free, so `malloc_trim`
    leaves most of it counted in RSS, and RSS crept up generation after generation. With
    one arena, RSS after a trim stays where it was after the first image: DALL-E Mini
    in bf16 after each of four generations, 1,273 / 1,298 / 1,342 / 1,315 MiB with
    glibc's default arenas (peak 1,397), 1,229 / 1,231 / 1,232 / 1,233 with one (peak
    1,356; `benchmarks/load_memory.py DIR --dtype bfloat16 --generations 4
    [--default-arenas]`).
    Call it before the first JAX computation: a thread that already has an arena keeps it.
    """
    libc = _libc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, 1))


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (malloc.h)."""
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _heap_in_use() -> int | None:
    """Bytes glibc's heap has handed out and not had back (mallinfo2's uordblks), or None
    where there is no mallinfo2 (not glibc, or glibc < 2.33)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().uordblks


def wait_for_frees(interval: float = 0.01, timeout: float = 0.2) -> None:
    """Wait until the heap's bytes in use hold still for two `interval`s (at most
    `timeout` seconds): memory XLA:CPU is about to free is then freed, and a
    `return_free_memory` after it can give it back.

    Why: XLA:CPU runs a computation on a worker thread, which frees the buffers it held
    (its temporaries, and donated inputs it updated in place) a few milliseconds *after*
    the outputs are ready, and `block_until_ready` does not wait for that. After
    DALL-E Mini's bf16 decode loop, the VQGAN decode that followed found the decode state
    and the loop's temporaries (47 MiB) still in use in two generations of six, 2-3 ms
    before they were freed (a scratch probe of mallinfo2), so the trim before it gave
    nothing back and the decode's temporaries stacked on them: the peak RSS of the same
    benchmark varied by ~30 MiB between runs. A heuristic (XLA offers no wait for it): it
    catches frees that come within two `interval`s of each other, and costs ~30 ms.
    """
    before = _heap_in_use()
    if before is None:
        return
    deadline = time.perf_counter() + timeout
    steady = 0
    while steady < 2 and time.perf_counter() < deadline:
        time.sleep(interval)
        now = _heap_in_use()
        steady = steady + 1 if now == before else 0
        before = now


def return_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`).

    Loading frees ~a model's worth of host tensors in pieces smaller than glibc's mmap
    threshold; without a trim they stay counted in the process's RSS.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def compile_then_trim(lower: Callable[[], Any]) -> None:
    """Compile a jitted function ahead of its first run, then `return_free_memory`.

    `lower` returns the function lowered for the arguments of the coming call
    (`jitted.lower(*args)`); compiling it fills jit's own caches, so the call that
    follows neither traces nor compiles again. Why: XLA's compiler frees its working
    memory into the heap (DALL-E Mini's decode loop: +100-147 MiB while compiling,
    28-40 MiB kept after the trim, `benchmarks/load_memory.py DIR --programs`), and a
    program's temporaries (one block each, mapped fresh when over 32 MiB) do not reuse
    it, so without the trim the first run of a big program stacked its temporaries on
    the compiler's garbage.
    """
    lower().compile()
    gc.collect()  # whatever the lowering left in reference cycles; cheap next to a compile
    return_free_memory()
