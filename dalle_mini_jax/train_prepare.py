"""Built-in data preparation for the `tiny` and `shapes` training configs.

`dalle-mini-jax train --config tiny --workdir DIR` needs nothing but the package: before
the transformer trains, this makes, under DIR/data,

    vqgan_run/model/   a VQGAN trained on the shapes set (`vqgan_train.train_vqgan`)
    train/, valid/     the shapes set encoded with it (`encode.encode_dataset`)
    tokenizer/         a BPE trained on the training captions (`text.train_bpe`)
    prepared.json      the paths above, read by `train.prepare_data`

Each stage resumes or skips itself when its output exists, so an interrupted
preparation continues where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import VQGAN_PRESETS, DalleBartConfig, VQGANConfig
from .train_config import TrainConfig


def vqgan_for(model: DalleBartConfig) -> tuple[str, VQGANConfig]:
    """The VQGAN preset whose token grid and codebook fit the transformer's image side."""
    for name, vq in VQGAN_PRESETS.items():
        if vq.num_tokens == model.image_len and vq.codebook_size == model.num_image_codes:
            return name, vq
    raise ValueError(
        f"no VQGAN preset makes {model.image_len} tokens from {model.num_image_codes} codes; "
        "prepare the data yourself (train-vqgan + encode) and set data.train / data.vqgan"
    )


def prepare_shapes(cfg: TrainConfig, data_dir: str | Path) -> dict[str, str]:
    """Shapes set -> VQGAN -> encoded shards + BPE tokenizer, under `data_dir`.

    Args:
      cfg: the training run; uses cfg.model (image side, text_len), cfg.seed and the
        data.prepare_* fields.
      data_dir: where everything goes.

    Returns:
      The `data` fields to set: train, valid, tokenizer, vqgan (also in prepared.json).
    """
    from . import vqgan_train  # noqa: PLC0415
    from .data import read_encoded  # noqa: PLC0415
    from .encode import encode_dataset  # noqa: PLC0415
    from .text import TextNormalizer, train_bpe  # noqa: PLC0415

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    d = cfg.data
    preset, vq_model = vqgan_for(cfg.model)
    vq_run = data_dir / "vqgan_run"
    vq_dir = vq_run / vqgan_train.MODEL_DIR
    if not (vq_dir / "flax_model.msgpack").exists():
        base = vqgan_train.tiny_config() if preset == "tiny" else vqgan_train.shapes_config()
        vq_cfg = base.replace(
            model=vq_model, data=f"shapes:inf:{cfg.seed + 2}", eval_data=f"shapes:64:{cfg.seed + 3}",
            eval_size=64, num_steps=d.prepare_vqgan_steps, seed=cfg.seed, progress=cfg.progress,
            warmup_steps=min(base.warmup_steps, max(d.prepare_vqgan_steps // 10, 1)),
            log_every=min(base.log_every, d.prepare_vqgan_steps), eval_every=0,
            checkpoint_every=max(d.prepare_vqgan_steps // 2, 1),
        )
        vqgan_train.train_vqgan(vq_cfg, vq_run)

    num_valid = max(d.prepare_images // 10, 1)
    for split, num, seed in (("train", d.prepare_images, cfg.seed), ("valid", num_valid, cfg.seed + 1)):
        encode_dataset(f"shapes:{num}:{seed}", vq_dir, data_dir / split, progress=cfg.progress)

    tok_dir = data_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        captions, _ = read_encoded(data_dir / "train")
        if cfg.model.normalize_text:  # the tokenizer sees normalized prompts at run time
            normalize = TextNormalizer()
            captions = [normalize(c) for c in captions]
        train_bpe(captions, d.prepare_vocab_size, out_dir=tok_dir, text_len=cfg.model.text_len)

    paths = {"train": str(data_dir / "train"), "valid": str(data_dir / "valid"),
             "tokenizer": str(tok_dir), "vqgan": str(vq_dir)}
    (data_dir / "prepared.json").write_text(json.dumps(paths, indent=2) + "\n")
    return paths
