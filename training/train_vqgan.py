"""Train or fine-tune a VQGAN (the same as `dalle-mini-jax train-vqgan`).

    python training/train_vqgan.py --config training/configs/vqgan_shapes.py --workdir runs/vqgan_shapes
    python training/train_vqgan.py --workdir runs/my_vqgan --init path/to/vqgan --data my_images/ num_steps=2000

Rerunning the same command resumes from WORKDIR/checkpoints. Everything else is in
`dalle_mini_jax.vqgan_train`.
"""

from dalle_mini_jax.vqgan_train import main

if __name__ == "__main__":
    main()
