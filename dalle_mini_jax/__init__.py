"""dalle_mini_jax: DALL·E Mini style text-to-image generation on today's JAX / Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import dalle_mini_jax` stays cheap (no JAX start-up) until it is used.
    if name == "DalleMini":
        from .pipeline import DalleMini

        return DalleMini
    raise AttributeError(f"module 'dalle_mini_jax' has no attribute {name!r}")
