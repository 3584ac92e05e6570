"""Where the decoder looks in the caption while it draws each object (cross-attention probe).

    python benchmarks/cross_attention_probe.py [--model DIR] [--caption "..."]... [--seed S]

For each caption: draws a true image for it (`shapes.sample_scene`, seed S), encodes it
with the model directory's VQGAN, feeds the codes teacher-forced through
`DalleBart.decode_step` one position at a time (eagerly, so the weights are concrete),
records each decoder layer's cross-attention weights over the caption tokens (mean over
heads), and prints, for the token positions that cover each object, the caption tokens
that take the most attention in each layer, plus the share of attention on the object's
own phrase. A model that binds attributes to objects puts most of its attention on the
phrase of the object it is drawing; one that leaks attributes spreads it over both.

Without --caption, three two-object captions: both positioned, one positioned, none.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from unittest import mock

import jax.numpy as jnp
import numpy as np

from dalle_mini_jax import shapes, transformer
from dalle_mini_jax.attention import attend_one_weights
from dalle_mini_jax.pipeline import BUNDLED_MODEL_DIR, DalleMini
from dalle_mini_jax.vqgan import VQModel

CAPTIONS = (
    "a red circle in the top left and a blue square in the bottom right",
    "a yellow triangle and a small green cross in the center",
    "a white cross and a purple circle",
)


def object_tokens(obj: shapes.SceneObject, grid: int) -> list[int]:
    """Row-major token indices of the patches an object's bounding box touches."""
    patch = shapes.CANVAS_SIZE // grid
    x0 = shapes.box_origin(obj.centre[0], obj.extent)
    y0 = shapes.box_origin(obj.centre[1], obj.extent)
    x1, y1 = x0 + obj.extent - 1, y0 + obj.extent - 1
    return [r * grid + c for r in range(y0 // patch, y1 // patch + 1)
            for c in range(x0 // patch, x1 // patch + 1)]


def cross_attention(pipe: DalleMini, caption: str, codes: np.ndarray) -> np.ndarray:
    """Teacher-forced cross-attention weights: float [S, L, T] (step, layer, text token)."""
    model, cfg = pipe.model, pipe.config
    tok = pipe.tokenizer([caption])
    ids, mask = jnp.asarray(tok["input_ids"]), jnp.asarray(tok["attention_mask"])
    enc = model.encode(ids, mask, layers=pipe.sampler._enc_layers,
                       token_rows=pipe.sampler.token_rows(tok["input_ids"]))
    cache = model.init_cache(enc, mask)  # stacked [L, ...] self-attention cache: fine eagerly
    recorded: list[np.ndarray] = []
    plain = transformer.attend_one

    def recording(q, k, v, valid):  # a decode step's cross-attention (self: attend_cache)
        recorded.append(np.asarray(attend_one_weights(q, k, valid))[0].mean(0))
        return plain(q, k, v, valid)

    fed = np.concatenate([[cfg.bos_token_id], codes[:-1]])  # step p feeds token p-1
    with mock.patch.object(transformer, "attend_one", recording):
        for p, token in enumerate(fed):
            _, cache = pipe.sampler.decode_step(model, jnp.asarray([token], jnp.int32), jnp.int32(p),
                                                cache)
    return np.stack(recorded).reshape(len(fed), cfg.num_decoder_layers, -1)


def phrase_spans(pipe: DalleMini, caption: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Caption tokens (text) and, per object phrase, its [start, end) token span."""
    ids = pipe.tokenizer([caption])["input_ids"][0]
    words = [pipe.tokenizer.backend.id_to_token(int(i)).lstrip("\u0120") for i in ids]
    spans, start = [], 1  # after <s>
    for k, w in enumerate(words):
        relation_of = w in ("left", "right") and k + 1 < len(words) and words[k + 1] == "of"
        if w in ("and", "above", "below", "</s>") or relation_of:
            spans.append((start, k))
            start = k + (2 if relation_of else 1)
        if w == "</s>":
            break
    return words, spans


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--caption", action="append", help="caption(s) to probe (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the true image drawn")
    parser.add_argument("--top", type=int, default=4, help="caption tokens listed per layer")
    args = parser.parse_args(argv)
    pipe = DalleMini.from_pretrained(args.model)
    # The pipeline keeps only the VQGAN's decoder half; the probe needs its encoder.
    vq = VQModel.from_pretrained(Path(args.model or BUNDLED_MODEL_DIR) / "vqgan")
    grid = pipe.vqgan.config.grid_size
    for caption in args.caption or CAPTIONS:
        spec = shapes.parse_caption(caption)
        scene = shapes.sample_scene(np.random.default_rng(args.seed), spec)
        image = shapes.render(scene)[None].astype(np.float32) / 255.0
        codes = np.asarray(vq.encode(jnp.asarray(image)))[0]
        weights = cross_attention(pipe, caption, codes)  # [S, L, T]
        words, spans = phrase_spans(pipe, caption)
        print(f"\n{caption!r}")
        for k, obj in enumerate(scene.objects):
            steps = object_tokens(obj, grid)
            w = weights[steps].mean(0)  # [L, T]
            own = spans[k] if k < len(spans) else None
            print(f"  object {k + 1} ({obj.size} {obj.colour} {obj.shape} in cell {obj.cell}),"
                  f" {len(steps)} tokens:")
            for layer, row in enumerate(w):
                top = np.argsort(-row)[:args.top]
                listed = ", ".join(f"{words[t]} {row[t]:.2f}" for t in top)
                share = "" if own is None else f"; own phrase {row[own[0]:own[1]].sum():.2f}"
                others = [s for j, s in enumerate(spans) if j != k]
                other = sum(row[a:b].sum() for a, b in others)
                print(f"    layer {layer}: {listed}{share}, other phrases {other:.2f}")


if __name__ == "__main__":
    main()
