"""Tiny random model directories for tests (reusable by any test module).

`make_model_dir(path)` writes what `DalleMini.from_pretrained` loads: a random tiny
DalleBart (`TRANSFORMER_PRESETS['tiny']`, its image vocabulary matched to the VQGAN's
codebook), a BPE tokenizer trained with `text.train_bpe` on a few captions (vocabulary
within the model's `text_vocab_size`), and a random tiny VQGAN in `path/vqgan`.
Everything is saved with the modules' own `save_pretrained`, in the released format.

    from tests.model_dirs import make_model_dir
    model_dir = make_model_dir(tmp_path / "model")

or the session-scoped fixture `tiny_model_dir` (import it into a test module or a
conftest: `from tests.model_dirs import tiny_model_dir  # noqa: F401`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

CAPTIONS = [
    "a red square on a white background",
    "a blue circle next to a green triangle",
    "two small yellow stars above a black line",
    "a large purple square and a small orange circle",
    "an empty white picture",
    "three green triangles in a row",
] * 4


def make_model_dir(path: str | Path, seed: int = 0, transformer: str = "tiny", vqgan: str = "tiny",
                   vocab_size: int = 320, **config_changes) -> Path:
    """Write a random model directory (transformer + tokenizer + vqgan/) and return its path.

    Args:
      path: directory to create.
      seed: parameter initialisation seed.
      transformer, vqgan: preset names of `config.TRANSFORMER_PRESETS` / `VQGAN_PRESETS`.
      vocab_size: BPE vocabulary (must be <= the preset's text_vocab_size).
      config_changes: DalleBartConfig fields to override (e.g. normalize_text=False).
    """
    from flax import nnx

    from dalle_mini_jax.config import TRANSFORMER_PRESETS, VQGAN_PRESETS
    from dalle_mini_jax.text import train_bpe
    from dalle_mini_jax.transformer import DalleBart
    from dalle_mini_jax.vqgan import VQModel

    path = Path(path)
    vq_cfg = VQGAN_PRESETS[vqgan]
    cfg = TRANSFORMER_PRESETS[transformer].replace(
        image_vocab_size=vq_cfg.codebook_size, image_len=vq_cfg.num_tokens, **config_changes
    )
    if vocab_size > cfg.text_vocab_size:
        raise ValueError(f"vocab_size={vocab_size} > text_vocab_size={cfg.text_vocab_size}")
    tokenizer = train_bpe(CAPTIONS, vocab_size=vocab_size, text_len=cfg.text_len, min_frequency=1)
    # Jitted init: one compilation instead of one per parameter shape (much faster).
    nnx.jit(lambda: DalleBart(cfg, rngs=nnx.Rngs(seed)))().save_pretrained(path, tokenizer=tokenizer)
    nnx.jit(lambda: VQModel(vq_cfg, rngs=nnx.Rngs(seed + 1)))().save_pretrained(path / "vqgan")
    return path


_MADE: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A session-wide tiny random model directory (see `make_model_dir`).

    Importing the fixture into several test modules registers it once per module; the
    cache makes them all share one directory (and so one set of compilations).
    """
    if "tiny" not in _MADE:
        _MADE["tiny"] = make_model_dir(tmp_path_factory.mktemp("tiny_model") / "model")
    return _MADE["tiny"]
