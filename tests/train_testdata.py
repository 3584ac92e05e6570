"""Tiny encoded data for the trainer tests: random captions, random codes, a small BPE."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dalle_mini_jax.config import transformer_preset
from dalle_mini_jax.data import write_encoded
from dalle_mini_jax.text import train_bpe
from dalle_mini_jax.train_config import DataConfig, OptimizerConfig, TrainConfig

WORDS = ("a red blue green yellow small large circle square triangle cross on the left right "
         "top bottom center above below and two three").split()


def make_data(root: str | Path, num_train: int = 64, num_valid: int = 12, image_len: int = 16,
              num_codes: int = 32, text_len: int = 16, seed: int = 0) -> DataConfig:
    """Two train shards, one valid shard and a BPE tokenizer (vocab <= 300) under `root`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for sub in ("train", "valid"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def captions(n):
        return [" ".join(rng.choice(WORDS, size=rng.integers(1, 4))) for _ in range(n)]

    train_caps = captions(num_train)
    half = num_train // 2
    for i, sl in enumerate((slice(0, half), slice(half, num_train))):
        write_encoded(root / "train" / f"{i:03d}.parquet", train_caps[sl],
                      rng.integers(0, num_codes, size=(len(train_caps[sl]), image_len)))
    write_encoded(root / "valid" / "000.parquet", captions(num_valid),
                  rng.integers(0, num_codes, size=(num_valid, image_len)))
    train_bpe(train_caps, vocab_size=300, out_dir=root / "tokenizer", min_frequency=1, text_len=text_len)
    return DataConfig(train=str(root / "train" / "*.parquet"), valid=str(root / "valid" / "*.parquet"),
                      tokenizer=str(root / "tokenizer"))


def tiny_run(data: DataConfig, **changes) -> TrainConfig:
    """The tiny preset (32 codes: the tiny VQGAN's) on `data`, float32, a few steps."""
    cfg = TrainConfig(
        model=transformer_preset("tiny").replace(image_vocab_size=32), steps=6, batch_size=8, data=data,
        optimizer=OptimizerConfig(lr=1e-2, warmup_steps=2), log_every=2, checkpoint_every=2,
        progress=False,
    )
    return cfg.replace(**changes)


def _random_tree(shapes: dict[str, tuple[int, ...]], rng: np.random.Generator, std: float) -> dict:
    """Norm scales 1, biases 0, everything else normal(std): a plausible untrained model."""
    out = {}
    for name, shape in shapes.items():
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "scale":
            out[name] = np.ones(shape, np.float32)
        elif leaf == "bias":
            out[name] = np.zeros(shape, np.float32)
        else:
            out[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    return out


def make_model_dir(path: str | Path, model_cfg, tokenizer_dir: str | Path, seed: int = 0) -> Path:
    """A model directory (transformer + tokenizer + tiny VQGAN in ./vqgan) from numpy random
    weights: nothing is compiled, so tests that start from it skip the init compile."""
    import shutil

    from flax import nnx

    from dalle_mini_jax import checkpoint as ckpt
    from dalle_mini_jax.config import VQGAN_PRESETS
    from dalle_mini_jax.transformer import DalleBart, released_names
    from dalle_mini_jax.vqgan import released_param_shapes

    path = Path(path)
    rng = np.random.default_rng(seed)
    model_cfg = model_cfg.replace(vqgan_path="vqgan")
    abstract = nnx.eval_shape(lambda: DalleBart(model_cfg, rngs=nnx.Rngs(0)))
    ours = ckpt.flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    names = released_names(model_cfg)
    shapes = {names[k]: tuple(v.shape) for k, v in ours.items()}
    path.mkdir(parents=True, exist_ok=True)
    ckpt.write_msgpack(path / ckpt.MSGPACK_NAME, _random_tree(shapes, rng, model_cfg.init_std))
    model_cfg.save(path / ckpt.CONFIG_NAME)
    for f in Path(tokenizer_dir).iterdir():
        shutil.copyfile(f, path / f.name)
    vq_cfg = VQGAN_PRESETS["tiny"]
    (path / "vqgan").mkdir(exist_ok=True)
    ckpt.write_msgpack(path / "vqgan" / ckpt.MSGPACK_NAME,
                       _random_tree(released_param_shapes(vq_cfg), rng, 0.05))
    vq_cfg.save(path / "vqgan" / ckpt.CONFIG_NAME)
    return path
