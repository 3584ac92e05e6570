# The bundled model, end to end, from the repository root (BUNDLED.md has times and results):
#
#   # 1. the shapes VQGAN (64x64 -> 8x8 codes), or reuse runs/vqgan_shapes/model if it exists
#   dalle-mini-jax train-vqgan --config training/configs/vqgan_shapes.py --workdir runs/vqgan_shapes model.codebook_size=1024
#   # 2. encode the training and validation sets with it (shapes seeds 0 and 1, objects
#   #    that state no position laid out in reading order: ":reading"; training captions
#   #    with more two- and three-object tasks: ":multi_position"; docstring below)
#   dalle-mini-jax encode --data shapes:60000:0:reading:multi_position --vqgan runs/vqgan_shapes/model --out runs/bundled_data/train
#   dalle-mini-jax encode --data shapes:2000:1:reading --vqgan runs/vqgan_shapes/model --out runs/bundled_data/valid
#   # 3. a small BPE on the (normalized) training captions
#   python training/configs/bundled_shapes.py tokenizer
#   # 4. train the transformer (exports runs/bundled/model with the tokenizer and the VQGAN)
#   dalle-mini-jax train --config training/configs/bundled_shapes.py --workdir runs/bundled
#   # 5. measure, then ship
#   dalle-mini-jax eval shapes --model runs/bundled/model --prompts 400 --images-per-prompt 4
#   python training/configs/bundled_shapes.py ship runs/bundled/model
#
# tiny variant (every stage in seconds, same paths under runs/bundled_tiny*):
#   --config training/configs/bundled_shapes.py:tiny
# cells variant: THE SHIPPED (SEVENTH) MODEL, 9 codes an image (BUNDLED.md "The cell VQGAN"
# and "Image-token rows from the VQGAN"):
#   dalle-mini-jax train-vqgan --config training/configs/vqgan_shapes.py:cells --workdir runs/vqgan_cells   # 35 min
#   dalle-mini-jax encode --data shapes:60000:0:reading_centred:multi_three --vqgan runs/vqgan_cells/model --out runs/bundled_cells_data/train
#   dalle-mini-jax encode --data shapes:2000:1:reading_centred --vqgan runs/vqgan_cells/model --out runs/bundled_cells_data/valid
#   # the starting model: image-token rows from what each code draws (code_init.py), and
#   # the fifth model's BPE (the same grammar; or: python training/configs/bundled_shapes.py tokenizer runs/bundled_cells_data)
#   python training/configs/bundled_shapes.py init runs/bundled_cells_init dalle_mini_jax/bundled/model
#   dalle-mini-jax train --config training/configs/bundled_shapes.py:cells --workdir runs/bundled_cells \
#     --init runs/bundled_cells_init data.tokenizer=dalle_mini_jax/bundled/model              # 7,000 steps of 64, 20 min
#   python benchmarks/sampling_sweep.py --model runs/bundled_cells/model --guidance 1,1.25,1.5 --top-k 4,16 --temperature 0.5,1.0 --prompts 180
#   dalle-mini-jax eval shapes --model runs/bundled_cells/model --prompts 400 --images-per-prompt 4 \
#     --guidance 1.25 --top-k 16 --temperature 0.5 --ceiling --ceiling-layout centred --save-defaults
#   python training/configs/bundled_shapes.py ship runs/bundled_cells/model
"""The model bundled with the package: a small DalleBart over the shapes VQGAN.

The shipped (seventh) model is the `cells` variant (commands above): the same transformer
over the cell VQGAN's 9 codes an image, trained on centred images with the `multi_three`
caption mix, 7,000 steps of 64 from a starting model whose image-token rows come from what
each code draws (`code_init.py`); overall 0.969, every task >= 0.82, in 56 min 40 s with
every stage (BUNDLED.md). What follows was written for the 8x8-code recipe (the fifth
model and before), and every point but the image grid, the caption mix and the batch
still holds for the variant.

Why this shape. It must train in under an hour on a 2-core CPU and ship in a few MB, and
the shapes grammar is tiny (about 40 words, 8x8 = 64 image codes), so width buys little
and examples seen buy a lot:
- D=128, 4 heads of 32, GLU width 384, 2 encoder + 4 decoder layers (1.9 M parameters
  with 1,024 image codes, 7.6 MB in float32): the encoder only has to bind colour/size/shape/position words
  (captions are at most 27 tokens), the decoder has to lay out 64 codes consistently;
- learned row and column tables for the image tokens on top of the 1-D position table
  (`image_pos_2d`): added when the first shipped model ignored position words (0.20,
  about chance). They did not fix that (second model: 0.19); the VQGAN's codes did: with
  token-local codes (vqgan_shapes.py) the third model scores 0.87 on position. The
  tables cost 2 x 8 x 128 parameters and stay;
- training images in the "reading" layout (`shapes.sample_scene`): the same captions,
  sizes and cells, but the objects whose phrase states no position take their cells in
  reading order, phrase by phrase. Every image still satisfies its caption; what it buys:
  with "free" placement the model, drawing in raster order, has to tell from what it has
  drawn which phrase is still missing, and the third model mostly copied the first
  object instead (two objects 0.12). With the layout the k-th unplaced object drawn is
  the k-th such phrase. The cost, to know: for "a red circle and a blue square" the
  model puts the red circle first in reading order (above, or left on the same row);
  where the caption leaves placement free, that is its choice. Fourth model (this
  layout + the lr 1.5e-3 VQGAN): overall 0.457, two objects 0.22, position 0.97;
- training captions drawn with `shapes.TASK_MIXES["multi_position"]` (the data spec's
  `:multi_position`): the two- and three-object, relation and counting tasks 80 % of the
  captions instead of 65 %, single objects 20 % (position kept at 12 %). The fifth
  model: overall 0.493 against 0.457 with the spec's mix; `multi` (single
  objects 12 %) scored 0.511 but position fell to 0.79 (BUNDLED.md);
- a BPE of at most 512 ids trained on the normalized captions (367 come out: the merges
  stop once every grammar word is one token), so the longest caption (27 tokens, BOS and
  EOS included) fits text_len=32;
- AdamW at 2e-3 with 200 warmup steps and cosine decay to 10 %, batch 32 (more updates
  per minute beat bigger batches at this budget on a CPU);
- 15 % blank captions, so the model also learns the unconditional distribution that
  guidance (super-conditioning) subtracts;
- the data are read once per epoch in a seeded order: 7,500 steps of 32 read the 60k
  encoded examples 4 times. Measured on the 2-core CPU: ~2.4 steps/s with the trainer's
  XLA:CPU option (xla_cpu.py; 2.2 before it on the previous machine), so 7,500 steps take
  ~51 minutes plus compilation and export; the fifth model was this run (BUNDLED.md:
  overall 0.493; 51 min 10 s in all, with niced unit tests beside it for ~35 of them). On
  a slower CPU pass --steps so that the run fits your budget (the rate is in metrics.jsonl).
"""

from __future__ import annotations

import sys
from pathlib import Path

from dalle_mini_jax.config import VQGAN_PRESETS, VQGANConfig, transformer_preset
from dalle_mini_jax.train_config import DataConfig, OptimizerConfig, SampleConfig, TrainConfig

VQGAN_DIR = "runs/vqgan_shapes/model"  # dalle-mini-jax train-vqgan --workdir runs/vqgan_shapes
DATA_DIR = "runs/bundled_data"  # encoded train/ and valid/ shards, tokenizer/
CELLS_VQGAN_DIR = "runs/vqgan_cells/model"  # ... --config training/configs/vqgan_shapes.py:cells
CELLS_DATA_DIR = "runs/bundled_cells_data"
VOCAB_SIZE = 512  # BPE ids (an upper bound): 5 specials + 256 bytes + merges (~106 used)
TEXT_LEN = 32  # longest shapes caption: 27 tokens with this BPE (BOS and EOS included)


def _vqgan_config(vqgan_dir: str) -> VQGANConfig:
    """The VQGAN the codes come from (its codebook and grid fix the image vocabulary)."""
    path = Path(vqgan_dir) / "config.json"
    return VQGANConfig.load(path) if path.is_file() else VQGAN_PRESETS["shapes"]


def get_config(variant: str | None = None) -> TrainConfig:
    data_dir, vqgan_dir = DATA_DIR, VQGAN_DIR
    if variant == "tiny":
        data_dir = DATA_DIR.replace("bundled_data", "bundled_tiny_data")
    elif variant == "cells":  # over the cell VQGAN (vqgan_shapes.py:cells): 9 codes an image
        data_dir, vqgan_dir = CELLS_DATA_DIR, CELLS_VQGAN_DIR
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r}: use none, 'tiny' or 'cells'")
    vq = _vqgan_config(vqgan_dir)
    model = transformer_preset("shapes").replace(
        embed_dim=128, num_heads=4, mlp_dim=384, num_encoder_layers=2, num_decoder_layers=4,
        text_vocab_size=VOCAB_SIZE, text_len=TEXT_LEN,
        image_vocab_size=vq.codebook_size, image_len=vq.num_tokens, image_pos_2d=True,
    )
    cfg = TrainConfig(
        model=model,
        seed=0,
        steps=7500,  # 240k examples: ~51 min in all at ~77 examples/s; --steps to fit your CPU
        batch_size=32,
        optimizer=OptimizerConfig(name="adamw", lr=2e-3, warmup_steps=200, schedule="cosine",
                                  end_lr_ratio=0.1, weight_decay=0.01, clip_norm=1.0),
        data=DataConfig(train=f"{data_dir}/train", valid=f"{data_dir}/valid",
                        tokenizer=f"{data_dir}/tokenizer", vqgan=vqgan_dir,
                        blank_caption_prob=0.15),
        log_every=50,
        eval_every=1000,
        eval_batches=20,
        checkpoint_every=500,
        sample=SampleConfig(every=0),
    )
    if variant == "tiny":
        cfg = cfg.replace(steps=20, log_every=5, eval_every=10, checkpoint_every=10)
    if variant == "cells":
        # 9 codes an image make a step ~4x cheaper. 7,000 steps of 64 from the `init`
        # starting model: 20 min 23 s on the 2-core CPU (~370 examples/s), which leaves
        # the 35-minute cell VQGAN inside the hour. From random rows the colours came late
        # or not at all (6,000 steps of 32: overall 0.03; 8,000 of 64: 0.60); from the
        # VQGAN's drawings 0.97 (BUNDLED.md).
        cfg = cfg.replace(steps=7000, batch_size=64)
    return cfg


# --------------------------------------------------------------------------------------
# The two steps that are not a `dalle-mini-jax` subcommand
# --------------------------------------------------------------------------------------


def train_tokenizer(data_dir: str = DATA_DIR) -> Path:
    """BPE on the normalized captions of DATA_DIR/train -> DATA_DIR/tokenizer."""
    from dalle_mini_jax.data import read_encoded
    from dalle_mini_jax.text import TextNormalizer, train_bpe

    captions, _ = read_encoded(f"{data_dir}/train")
    normalize = TextNormalizer()  # the model normalizes prompts, so the BPE sees them so
    out = Path(data_dir) / "tokenizer"
    texts = [normalize(c) for c in captions]
    # text_len only sets how the returned tokenizer pads (the files do not hold it): a long
    # one measures the untruncated length of every caption.
    tok = train_bpe(texts, VOCAB_SIZE, out_dir=out, text_len=4 * TEXT_LEN)
    longest = int(tok(texts)["attention_mask"].sum(1).max())
    print(f"tokenizer in {out}: longest caption {longest} of {TEXT_LEN} tokens")
    if longest > TEXT_LEN:
        raise SystemExit(f"captions of {longest} tokens do not fit text_len={TEXT_LEN}")
    return out


def init_from_vqgan(out: str, tokenizer: str | None = None, variant: str = "cells", seed: int = 0) -> Path:
    """The starting model for `train --init`: a fresh DalleBart of `variant`'s shape whose
    image-token rows come from what each code of its VQGAN draws (`code_init`: validation
    loss 0.62 at step 1,000 against 1.09 with random rows), written with the tokenizer."""
    from flax import nnx

    from dalle_mini_jax.code_init import init_from_vqgan as set_rows
    from dalle_mini_jax.text import TextTokenizer
    from dalle_mini_jax.transformer import DalleBart
    from dalle_mini_jax.vqgan import VQModel

    cfg = get_config(variant)
    model = DalleBart(cfg.model, rngs=nnx.Rngs(seed))
    set_rows(model, VQModel.from_pretrained(cfg.data.vqgan), seed)
    tok = TextTokenizer.from_pretrained(tokenizer or cfg.data.tokenizer, text_len=cfg.model.text_len)
    model.save_pretrained(out, tokenizer=tok)
    print(f"{out}: image-token rows from {cfg.data.vqgan}'s drawings")
    return Path(out)


def ship(model_dir: str, dest: str | None = None) -> Path:
    """Copy an exported model directory into the package (dalle_mini_jax/bundled/model).

    The whole directory (transformer + tokenizer + VQGAN in vqgan/) must stay under the
    25 MB the package allows; at this size float32 weights fit (7.6 MB + the 2.1 MB VQGAN).
    """
    import shutil

    here = Path(__file__).resolve().parents[2]
    dest = Path(dest) if dest else here / "dalle_mini_jax" / "bundled" / "model"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("*.tmp", ".*"))
    for path in dest.rglob("*"):
        # save_pretrained writes 0600 files: installed, they must be readable by everyone.
        path.chmod(0o755 if path.is_dir() else 0o644)
        if path.is_file():  # copytree keeps old mtimes, which lets a stale build/ win
            path.touch()
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"{dest}: {size / 2**20:.2f} MiB")
    if size > 25 * 2**20:
        raise SystemExit("over 25 MB: store the weights as float16 or make the model smaller")
    return dest


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "tokenizer":
        train_tokenizer(*sys.argv[2:3])
    elif what == "init":
        init_from_vqgan(*sys.argv[2:4])
    elif what == "ship":
        ship(*sys.argv[2:4])
    else:
        raise SystemExit("usage: python training/configs/bundled_shapes.py tokenizer [DATA_DIR]"
                         " | init OUT_DIR [TOKENIZER_DIR]"
                         " | ship MODEL_DIR [DEST]")
