"""Few-row dense products on all CPU cores: a decode step's dots (`cpu_dots.cc`).

A decode step multiplies every decoder weight by a handful of rows (2 for one guided
image, 18 for a 3x3 grid), so it is bound by how fast the weights are read. On this
project's 2-core machine one core reads about half of what both read together, and
XLA:CPU runs each small dot on one thread: even with each kernel cut in one part per
core (`transformer.OutMajor`), the parts overlap only part of the time. `rows_dot`
calls a small C++ kernel (through XLA's FFI) that splits every dot's rows of W over a
pool of threads that spin between calls, so all cores read weights for the whole of
every dot. `python benchmarks/decode_step.py DIR` compares it with XLA's dots.

Also there, for the same decode step: `attend` (attention over the positions of the
cache written so far), `gelu_glu` (a GLU's gate and value products and gelu(gate) *
value in one call) and `table_rows` (a token table left on the host, read by compiled
code instead of a Python callback). While XLA runs the small ops between two products,
the pool's idle workers prefetch into their caches the rows they will take of the
product it expects next (it learns the order of the products from the first step; see
`Pool` in cpu_dots.cc).

The kernel is compiled on first use with the machine's C++ compiler (`$CXX`, else
`c++`; `-O3 -march=native`, against the FFI headers jaxlib ships) into a cache
directory (`$DALLE_MINI_JAX_CACHE`, else `~/.cache/dalle_mini_jax`), keyed by the
source, jaxlib's version and the CPU; later processes load the cached library. With
no compiler, or with `DALLE_MINI_JAX_CPU_DOTS=0`, `available()` is False and the
sampler uses XLA's dots (`reason()` says why).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("cpu_dots.cc")
TARGET = "dalle_mini_jax_rows_dot"
ATTEND_TARGET = "dalle_mini_jax_attend"
GLU_TARGET = "dalle_mini_jax_gelu_glu"
TABLE_TARGET = "dalle_mini_jax_table_rows"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")

_state: dict = {}


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    env = os.environ.get("DALLE_MINI_JAX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dalle_mini_jax"


def _cpu_signature() -> str:
    """The CPU the library is built for (-march=native): model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    fields = ("model name", "flags", "Features")
    keep = [line for line in text.splitlines()[:40] if line.split(":")[0].strip() in fields]
    return platform.machine() + "\n".join(keep)


def library_path(compiler: Sequence[str]) -> Path:
    """The cached library's path for this source, jaxlib, compiler and CPU."""
    import jaxlib

    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), " ".join(compiler + list(_FLAGS)).encode(),
                 _cpu_signature().encode()):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / f"cpu_dots-{h.hexdigest()[:16]}.so"


def _compiler(compiler: Sequence[str] | None = None) -> list[str]:
    """The C++ compiler's command: `compiler`, else `$CXX`, else `c++`."""
    return list(compiler or shlex.split(os.environ.get("CXX", "c++")))


def compile_command(source: Path, out: Path | str, compiler: Sequence[str] | None = None,
                    library: bool = True) -> list[str]:
    """The command that compiles `source` into `out` the way the kernel is compiled (the
    machine's compiler, -O3 -march=native, jaxlib's FFI headers): a shared library, or a
    program with `library=False` (`benchmarks/cpu_dots_ab.py` builds one around the kernel)."""
    flags = [f for f in _FLAGS if library or f not in ("-shared", "-fPIC")]
    return _compiler(compiler) + flags + ["-I", jax.ffi.include_dir(), str(source), "-o", str(out)]


def build(compiler: Sequence[str] | None = None) -> Path:
    """Compile the kernel into the cache (if not there yet) and return the library.

    Raises RuntimeError with the compiler's message when it fails. Safe when several
    processes build at once: each compiles to its own file and renames it in place.
    """
    compiler = _compiler(compiler)
    out = library_path(compiler)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = compile_command(SOURCE, tmp, compiler)
    try:
        run = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        os.unlink(tmp)
        raise RuntimeError(f"no C++ compiler ({' '.join(compiler)}: {e})") from e
    if run.returncode:
        os.unlink(tmp)
        raise RuntimeError(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{run.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def cpu_cores() -> int:
    """The CPU cores this process may run on (the threads a product is split over)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available() -> bool:
    """Whether `rows_dot` can run here: a CPU backend, not switched off, the kernel built
    and registered (on the first call; a failure warns once and is remembered)."""
    if "ok" not in _state:
        _state["ok"], _state["reason"] = _load()
        if not _state["ok"] and os.environ.get("DALLE_MINI_JAX_CPU_DOTS", "1") != "0":
            warnings.warn(f"dalle_mini_jax: decode steps use XLA's dots, {_state['reason']}", RuntimeWarning,
                          stacklevel=2)
    return _state["ok"]


def vector_bytes() -> int | None:
    """The kernel's vector width in bytes (64 with AVX-512, 32 with AVX/AVX2, 16 else;
    None when it is not available)."""
    return _state["lib"].DmjVectorBytes() if available() else None


def reason() -> str:
    """Why `available()` is False ('' when it is True)."""
    available()
    return _state["reason"]


def _load() -> tuple[bool, str]:
    if os.environ.get("DALLE_MINI_JAX_CPU_DOTS", "1") == "0":
        return False, "switched off by DALLE_MINI_JAX_CPU_DOTS=0"
    if jax.default_backend() != "cpu":
        return False, f"the backend is {jax.default_backend()}, not cpu"
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as e:
        return False, f"the CPU dot kernel could not be built: {e}"
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.DmjRowsDot), platform="cpu")
    jax.ffi.register_ffi_target(ATTEND_TARGET, jax.ffi.pycapsule(lib.DmjAttend), platform="cpu")
    jax.ffi.register_ffi_target(GLU_TARGET, jax.ffi.pycapsule(lib.DmjGeluGlu), platform="cpu")
    jax.ffi.register_ffi_target(TABLE_TARGET, jax.ffi.pycapsule(lib.DmjTableRows), platform="cpu")
    lib.DmjTableRegister.restype = ctypes.c_int
    lib.DmjTableRegister.argtypes = [ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_int32, ctypes.c_int32]
    lib.DmjTableUnregister.argtypes = [ctypes.c_int32]
    lib.DmjVectorBytes.restype = ctypes.c_int
    _state["lib"] = lib
    return True, ""


Norm = tuple  # (bias [K], scale [K] or None): a LayerNorm's float32 weights


def _norm_operands(norm: Norm | None, k: int, what: str = "norm") -> tuple[jax.Array, jax.Array]:
    """The kernel's (bias, scale) operands for a norm over k; empty arrays: no norm."""
    if norm is None:
        return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32)
    bias, scale = norm
    for name, a in (("bias", bias), ("scale", scale)):
        if a is not None and (a.shape != (k,) or a.dtype != jnp.float32):
            raise ValueError(f"the {what}'s {name} must be float32 [{k}], got {a.dtype} {a.shape}")
    return bias, jnp.zeros((0,), jnp.float32) if scale is None else scale


def rows_dot(x: jax.Array, weights: Sequence[jax.Array], num_threads: int | None = None,
             norm: Norm | None = None, eps: float = 1e-5, post: Norm | None = None,
             residual: jax.Array | None = None) -> tuple[jax.Array, ...]:
    """x @ W_i^T for each weight, on all cores: float32 [M, K] x [N_i, K] -> [M, N_i].

    Args:
      x: [M, K], cast to float32 (M small: every row is multiplied by every block of W).
      weights: [N_i, K] float32 or bfloat16 arrays ("out-major", `OutMajor`'s layout).
      num_threads: threads to split each product over (default `cpu_cores()`).
      norm: optional (bias, scale or None), float32 [K]: x is first LayerNormed over K
        with them and `eps`, as `transformer.layer_norm` does in float32.
      post: optional (bias, scale or None), float32 [N]: the product is LayerNormed over
        N afterwards (one weight only).
      residual: optional float32 [M, N], added last (one weight only): a residual
        branch's `residual + post_norm(norm(x) @ W^T)` in one call.

    Returns:
      one float32 [M, N_i] per weight; the same products as
      `jnp.einsum("mk,nk->mn", x, w, preferred_element_type=float32)` up to summation order.
    """
    if not available():
        raise RuntimeError(f"cpu_dots.rows_dot is not available: {reason()}")
    x = jnp.asarray(x, jnp.float32)
    m, k = x.shape
    if not weights:
        raise ValueError("rows_dot: no weights given (one or more [N, K] arrays)")
    for w in weights:
        if w.ndim != 2 or w.shape[1] != k or not supports(w.dtype):
            raise ValueError(f"rows_dot: weights must be float32/bfloat16 [N, {k}], got {w.dtype} {w.shape}")
    if (post is not None or residual is not None) and len(weights) != 1:
        raise ValueError(f"rows_dot: post= and residual= take one weight, got {len(weights)}")
    n = weights[0].shape[0]
    if residual is None:
        residual = jnp.zeros((0,), jnp.float32)
    elif residual.shape != (m, n) or residual.dtype != jnp.float32:
        raise ValueError(f"rows_dot: the residual must be float32 [{m}, {n}], got {residual.dtype} {residual.shape}")
    outs = tuple(jax.ShapeDtypeStruct((m, w.shape[0]), jnp.float32) for w in weights)
    call = jax.ffi.ffi_call(TARGET, outs, vmap_method="sequential")
    return tuple(call(x, *_norm_operands(norm, k), *_norm_operands(post, n, "post-norm"), residual, *weights,
                      threads=np.int64(num_threads or cpu_cores()), eps=np.float32(eps)))


def gelu_glu(x: jax.Array, gate: jax.Array, value: jax.Array, num_threads: int | None = None,
             norm: Norm | None = None, eps: float = 1e-5) -> jax.Array:
    """gelu(x @ gate^T) * (x @ value^T), gelu exact (erf), on all cores: a GLU's first half.

    Args:
      x: [M, K], cast to float32.
      gate, value: [N, K] float32 or bfloat16 ("out-major").
      num_threads, norm, eps: as for `rows_dot`.

    Returns:
      [M, N] float32. One job for both products (their rows split over the threads
      together), the GLU on the calling thread; erf is Eigen's rational approximation
      (as XLA:CPU's), so the values match `jax.nn.gelu(g, approximate=False) * v` to
      ~1e-6 absolute (tested) on top of the products' summation order.
    """
    if not available():
        raise RuntimeError(f"cpu_dots.gelu_glu is not available: {reason()}")
    x = jnp.asarray(x, jnp.float32)
    for w in (gate, value):
        if w.ndim != 2 or w.shape != gate.shape or w.shape[1] != x.shape[1] or not supports(w.dtype):
            raise ValueError(f"gelu_glu: gate and value must be float32/bfloat16 [N, {x.shape[1]}] alike, "
                             f"got {gate.dtype} {gate.shape} and {value.dtype} {value.shape}")
    out = jax.ShapeDtypeStruct((x.shape[0], gate.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call(GLU_TARGET, out, vmap_method="sequential")
    return call(x, *_norm_operands(norm, x.shape[1]), gate, value, threads=np.int64(num_threads or cpu_cores()),
                eps=np.float32(eps))


def _kind(dtype) -> int | None:
    """A dtype's code in cpu_dots.cc's `Kind` (None: not one the table reader converts)."""
    names = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return names.index(jnp.dtype(dtype)) if jnp.dtype(dtype) in names else None


def register_table(key: int, table: np.ndarray, dtype) -> bool:
    """Let `table_rows(key, ...)` read `table`'s rows, rounded to `dtype`, in compiled code.

    The caller keeps `table` alive (and its memory where it is) until
    `unregister_table(key)`. Returns False, registering nothing, when the kernel is not
    available or it cannot read this table (a dtype other than float32, bfloat16,
    float16; not C-contiguous): read it some other way then (`sampling.HostTable`).
    """
    src, rnd = _kind(table.dtype), _kind(dtype)
    if src is None or rnd is None or table.ndim != 2 or not table.flags.c_contiguous or not available():
        return False
    return bool(_state["lib"].DmjTableRegister(key, table.ctypes.data, table.shape[0], table.shape[1], src, rnd))


def unregister_table(key: int) -> None:
    """Forget `register_table(key, ...)`'s table (a later `table_rows` call with it fails)."""
    if "lib" in _state:
        _state["lib"].DmjTableUnregister(key)


def table_rows(key: jax.Array | int, ids: jax.Array, dim: int) -> jax.Array:
    """[B] int token ids -> [B, dim] float32 rows of the table registered under `key`
    (`register_table`), rounded to its dtype, as `transformer.host_rows` gives them.

    An id outside the table, or a key with no table, fails the computation with a
    message naming it.
    """
    out = jax.ShapeDtypeStruct((ids.shape[0], dim), jnp.float32)
    call = jax.ffi.ffi_call(TABLE_TARGET, out, vmap_method="sequential")
    return call(jnp.asarray(key, jnp.int32), jnp.asarray(ids, jnp.int32))


@functools.cache
def supports(dtype) -> bool:
    """Whether `rows_dot` takes weights of this dtype."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def attends(head_size: int, dtype) -> bool:
    """Whether `attend` takes a cache of this head size and dtype (else use XLA's)."""
    return head_size % 16 == 0 and head_size <= 256 and supports(dtype) and available()


def attend(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, length: jax.Array | int,
           num_threads: int | None = None) -> jax.Array:
    """`attention.attend_one` on all cores, reading only the cache positions < `length`.

    Args:
      q: [B, H, D] queries (cast to float32); D a multiple of 16, at most 256.
      k, v: [B, H, S, D] float32 or bfloat16 caches (or bfloat16 bits as uint16, the
        way `DecodeCache` holds them).
      valid: [B or 1, S] bool, True where attending is allowed.
      length: int32 scalar; positions >= length are not read (nor attended).
      num_threads: as for `rows_dot`.

    Returns:
      [B, H, D] float32: softmax(q . k / sqrt(D)) @ v over the valid positions < length,
      the weights rounded to bfloat16 before the product with a bfloat16 cache (as
      `attend_one` does); the same values up to summation order and exp's rounding.
    """
    if not available():
        raise RuntimeError(f"cpu_dots.attend is not available: {reason()}")
    q = jnp.asarray(q, jnp.float32)
    call = jax.ffi.ffi_call(ATTEND_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    return call(q, k, v, jnp.asarray(valid, bool), jnp.asarray(length, jnp.int32),
                threads=np.int64(num_threads or cpu_cores()))
