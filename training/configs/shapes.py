# python training/train.py --config training/configs/shapes.py --workdir runs/shapes
# tiny variant: python training/train.py --config training/configs/shapes.py:tiny --workdir runs/shapes_tiny
"""The bundled shapes model: `shapes` transformer preset on 64x64 shapes images.

A shapes set of 50k images is generated, a shapes VQGAN (8x8 tokens, 256 codes) and a
1024-token BPE are trained on it, and the transformer is trained with AdamW, 10% blank
captions for guidance, and sample grids every 2000 steps.
"""

import dataclasses

from dalle_mini_jax.train_config import TrainConfig, shapes_config


def get_config(variant: str | None = None) -> TrainConfig:
    cfg = shapes_config()
    if variant == "tiny":  # same pipeline, seconds per stage
        cfg = cfg.replace(
            steps=50, batch_size=16, log_every=10, eval_every=25, checkpoint_every=25,
            data=dataclasses.replace(cfg.data, prepare_images=256, prepare_vqgan_steps=50),
            sample=dataclasses.replace(cfg.sample, every=0),
        )
    return cfg
