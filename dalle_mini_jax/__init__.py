"""dalle_mini_jax: DALL·E Mini style text-to-image generation on today's JAX / Flax NNX."""

__version__ = "0.1.0"

# Public names, imported lazily so `import dalle_mini_jax` stays cheap (no JAX start-up)
# until one of them is used.
_LAZY = {
    "DalleMini": "pipeline",
    "DalleBart": "transformer",
    "VQModel": "vqgan",
    "DalleBartConfig": "config",
    "VQGANConfig": "config",
    "TextTokenizer": "text",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dalle_mini_jax' has no attribute {name!r}")
