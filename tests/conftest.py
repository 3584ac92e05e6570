"""Test setup: 8 fake CPU devices, set before JAX starts, so sharding is tested anywhere."""

import os

# LLVM at -O0 unless the caller chose a level (XLA_FLAGS=--xla_backend_optimization_level=3
# tests the code the way users compile it). Why: most tests here are bound by XLA:CPU's
# compile time, not by running what it compiles. The default run on the 2-core AMD EPYC
# machine, 2026-12-04, `python -m pytest -q --durations=30`: 898 s at XLA's default
# level, 769 s at 0, every test passing both ways (the 15-minute budget was nearly spent).
# Tests that mostly compute (the notebooks, the bundled model's quality test) run a few
# seconds slower.
# Subprocesses the tests start inherit the flags (those that set XLA_FLAGS of their own,
# the multi-process and SIGKILL tests, run at the default level).
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded at test time

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
