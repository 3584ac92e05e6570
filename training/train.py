"""Train (or fine-tune) the DalleBart transformer; resumes from WORKDIR by itself.

    python training/train.py --config tiny --workdir runs/tiny
    python training/train.py --config training/configs/shapes.py[:tiny] --workdir runs/shapes \
        [--init MODEL_DIR] [--steps N] [--set optimizer.lr=1e-3 ...] [key=value ...]
    python training/train.py export --workdir runs/shapes [--step N] [--out DIR]

The same as `dalle-mini-jax train ...` / `dalle-mini-jax export ...`; everything lives
in `dalle_mini_jax.train`.
"""

from dalle_mini_jax.train import main

if __name__ == "__main__":
    main()
