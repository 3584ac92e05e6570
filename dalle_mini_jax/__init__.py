"""dalle_mini_jax: DALL·E Mini style text-to-image generation on today's JAX / Flax NNX."""

__version__ = "0.1.0"
