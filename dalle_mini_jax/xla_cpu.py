"""XLA:CPU compiler options: YNNPACK for dots only.

Recent jaxlibs hand parts of a CPU program to YNNPACK, a kernel library, by default:
dots, and also reductions (`multiply`+`reduce` fusions: layer norms, softmax sums, the
backward pass's bias and scale gradients). For the training step of a small model the
reductions are the slow part: compiled as YNNPACK fusions they run slower than XLA's own
loops. Restricting YNNPACK to dots (`xla_cpu_experimental_ynn_fusion_type=DOT`) keeps the
dots in YNNPACK, now fused with their bitcasts and adds, and leaves the reductions to XLA:
the bundled model's training step (D=128, batch 32) then has 46 YNNPACK fusions, all
dots, where it had 198, 148 of them reductions, and runs 1.35x faster (489 -> 361 ms),
same loss (`python benchmarks/train.py --models bundled tiny --steps 20 --cpu-libraries
both`, README "Measured"; the tiny model, whose step is mostly overhead: 1.03x).

The option goes to `jax.jit(..., compiler_options=...)` of the functions it was measured
on (the transformer trainer's steps), never to `XLA_FLAGS`: an unknown name in `XLA_FLAGS`
aborts the process, while a jaxlib that lacks the option makes `compiler_options()` return
{} (found by compiling a tiny function once). Set `DALLE_MINI_JAX_CPU_LIBRARIES=0` to get
XLA's defaults.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections import Counter

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

ENV_SWITCH = "DALLE_MINI_JAX_CPU_LIBRARIES"

# A DebugOptions field (xla/xla.proto) and the enum value it takes; the field is repeated,
# and compiler_options sets it to this one value.
CPU_LIBRARY_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


@functools.cache
def _supported() -> bool:
    """Whether this jaxlib's XLA:CPU accepts `CPU_LIBRARY_OPTIONS` (compiles a tiny dot)."""
    try:
        x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
        jax.jit(jnp.dot, compiler_options=CPU_LIBRARY_OPTIONS).lower(x, x).compile()
    except Exception as e:  # an older/newer jaxlib: unknown field or enum value
        logger.info("XLA:CPU option %s not available (%s); using XLA's defaults",
                    CPU_LIBRARY_OPTIONS, e)
        return False
    return True


def compiler_options(platform: str | None = None) -> dict[str, str]:
    """Options for `jax.jit(..., compiler_options=)` of a function run on `platform`.

    Args:
      platform: the platform the function runs on ("cpu", "gpu", "tpu"); None means
        `jax.default_backend()`.

    Returns:
      `CPU_LIBRARY_OPTIONS` on a CPU whose jaxlib has them (unless the environment
      variable DALLE_MINI_JAX_CPU_LIBRARIES is "0"), else {}.
    """
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return {}
    if (platform or jax.default_backend()) != "cpu" or not _supported():
        return {}
    return dict(CPU_LIBRARY_OPTIONS)


def library_fusions(hlo_text: str) -> Counter:
    """What the kernel-library fusions of a compiled program hold.

    Args:
      hlo_text: `jax.jit(f).lower(...).compile().as_text()`.

    Returns:
      Counter {(fusion kind, sorted op names of its computation): count}, e.g.
      {("__ynn_fusion", ("bitcast", "dot")): 27}.
    """
    bodies = {}
    for m in re.finditer(r"^(%[\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo_text, re.S | re.M):
        bodies[m.group(1)] = m.group(2)
    found = Counter()
    for m in re.finditer(r"kind=kCustom, calls=(%[\w.\-]+)[^\n]*\"kind\":\"(\w+)\"", hlo_text):
        ops = set(re.findall(r"= \S+ (\w+)\(", bodies.get(m.group(1), ""))) - {"parameter"}
        found[(m.group(2), tuple(sorted(ops)))] += 1
    return found
