"""Test setup: 8 fake CPU devices, set before JAX starts, so sharding is tested anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded at test time

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
