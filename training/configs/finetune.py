# python training/train.py --config training/configs/finetune.py --workdir runs/ft \
#     --init path/to/dalle-mini --set data.train='data/encoded/*.parquet'
# tiny variant (no download, from scratch on your shards):
#   python training/train.py --config training/configs/finetune.py:tiny --workdir runs/ft_tiny \
#     --set data.train='data/encoded/*.parquet' data.tokenizer=path/to/tokenizer
"""Fine-tune a model directory (a released DALL·E Mini / Mega, or one of ours) on encoded shards.

The shards must be encoded with the model's VQGAN (`dalle-mini-jax encode`); the
tokenizer and VQGAN come from the --init directory. Settings follow the original
fine-tuning recipe: a low learning rate with warmup, bf16 compute on fp32 master
weights, rematerialised layers, gradient accumulation, 10% blank captions.
"""

from dalle_mini_jax.config import transformer_preset
from dalle_mini_jax.train_config import DataConfig, OptimizerConfig, TrainConfig


def get_config(variant: str | None = None) -> TrainConfig:
    cfg = TrainConfig(
        steps=5000,
        batch_size=64,
        grad_accum=4,
        compute_dtype="bfloat16",
        param_dtype="float32",
        remat=True,
        optimizer=OptimizerConfig(name="adamw", lr=5e-5, warmup_steps=200, schedule="constant",
                                  weight_decay=0.0, clip_norm=1.0),
        data=DataConfig(blank_caption_prob=0.1),
        log_every=20,
        eval_every=500,
        checkpoint_every=500,
    )
    if variant == "tiny":  # the tiny transformer from scratch: checks the data and the loop
        cfg = cfg.replace(model=transformer_preset("tiny"), steps=20, batch_size=8, grad_accum=2,
                          compute_dtype="float32", remat=False, log_every=5, checkpoint_every=10,
                          optimizer=OptimizerConfig(lr=1e-3, warmup_steps=5))
    return cfg
