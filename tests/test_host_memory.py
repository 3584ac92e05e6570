"""host_memory: glibc's arenas (the allocator settings generation runs with)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")

# Threads allocate, then glibc describes its heaps: one <heap nr=...> per arena.
_COUNT_ARENAS = textwrap.dedent("""
    import ctypes, sys, tempfile, threading
    from dalle_mini_jax import host_memory
    print(host_memory.one_arena() if sys.argv[1] == "one" else None)
    def work():
        keep = [bytearray(4096) for _ in range(1000)]
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    with tempfile.NamedTemporaryFile("r") as f:
        fp = libc.fopen(f.name.encode(), b"w")
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        print(f.read().count("<heap nr="))
""")


def _arenas(mode: str, **env) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env
    out = subprocess.run([sys.executable, "-c", _COUNT_ARENAS, mode], capture_output=True, text=True,
                         env=environ, check=True).stdout.split()
    return out[0], int(out[1])


def test_one_arena_serves_every_thread_from_the_main_heap():
    """With `one_arena`, threads that allocate share glibc's main arena (one heap);
    without it each gets its own; a user's MALLOC_ARENA_MAX is left alone."""
    assert _arenas("one") == ("True", 1)
    assert _arenas("default")[1] > 1
    assert _arenas("one", MALLOC_ARENA_MAX="3")[0] == "False"


def test_wait_for_frees_waits_for_another_threads_free():
    """As XLA:CPU's worker thread frees a computation's buffers a few ms after its outputs
    are ready: `wait_for_frees` returns only once they are freed."""
    import threading
    import time

    from dalle_mini_jax import host_memory

    if host_memory._heap_in_use() is None:
        pytest.skip("no mallinfo2 (glibc < 2.33)")
    allocated, measured, freed_at = threading.Event(), threading.Event(), []

    def worker():
        held = [bytes(2048) for _ in range(5000)]  # ~10 MiB of malloc'd (not mmapped) blocks
        allocated.set()
        measured.wait()  # not before `before` is read (a busy machine may delay that)
        time.sleep(0.005)
        held.clear()
        freed_at.append(time.perf_counter())

    thread = threading.Thread(target=worker)
    thread.start()
    allocated.wait()
    before = host_memory._heap_in_use()
    measured.set()
    host_memory.wait_for_frees()
    returned = time.perf_counter()
    after = host_memory._heap_in_use()
    thread.join()
    assert freed_at and freed_at[0] <= returned
    assert before - after > 8 << 20
