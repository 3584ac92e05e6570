# python training/train.py --config training/configs/tiny.py --workdir runs/tiny
# (the same as `dalle-mini-jax train --config tiny --workdir runs/tiny`)
"""End-to-end smoke run: a small shapes set, a small VQGAN and the tiny transformer.

The data preparation (shapes images -> VQGAN -> encoded shards + BPE) runs first, in
WORKDIR/data, and is reused when the run is resumed. Minutes on a laptop CPU.
"""

from dalle_mini_jax.train_config import TrainConfig, tiny_config


def get_config(variant: str | None = None) -> TrainConfig:
    cfg = tiny_config()
    if variant == "tiny":  # the smallest thing that still runs every stage
        cfg = cfg.replace(steps=20, log_every=5, eval_every=10, checkpoint_every=10)
    return cfg
