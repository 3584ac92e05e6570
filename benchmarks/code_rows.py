"""What `code_init`'s starting rows share, for a shapes VQGAN (the numbers code_init.py cites).

    python benchmarks/code_rows.py --vqgan runs/vqgan_cells/model

Encodes the 64 single centred objects (8 colours x 4 shapes x 2 sizes, in the centre
cell), takes each one's code and prints, for the rows `code_init.image_rows` gives those
codes and for the VQGAN's own (centred) codebook vectors, the mean cosine between two
codes that share a colour / shape / size and between two that do not. Then the mean
number of objects in a scene of the spec's set and of `shapes.GRID_MIX`'s filled grids
(the "1.8" and "6.75" of shapes.py's GRID_MIX comment).
"""

from __future__ import annotations

import argparse

import numpy as np

from dalle_mini_jax import code_init, shapes
from dalle_mini_jax.vqgan import VQModel
from dalle_mini_jax.vqgan_train import reconstruct


def attribute_cosines(vectors: np.ndarray, keys: list[tuple[str, str, str]]) -> dict[str, tuple[float, float]]:
    """{attribute: (mean cosine of pairs sharing it, of pairs not)} over distinct pairs."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cos = unit @ unit.T
    off = ~np.eye(len(keys), dtype=bool)
    out = {}
    for i, name in enumerate(("colour", "shape", "size")):
        same = np.array([[a[i] == b[i] for b in keys] for a in keys])
        out[name] = (float(cos[same & off].mean()), float(cos[~same & off].mean()))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vqgan", required=True, help="a shapes VQGAN directory (side >= 64)")
    p.add_argument("--scenes", type=int, default=3000, help="scenes counted for the object means")
    args = p.parse_args(argv)
    model = VQModel.from_pretrained(args.vqgan)
    keys = [(c, s, z) for c in shapes.COLOUR_NAMES for s in shapes.SHAPES for z in shapes.SIZE_NAMES]
    scenes = [shapes.Scene((shapes.SceneObject(c, s, z, (1, 1), (0, 0)),)) for c, s, z in keys]
    images = shapes.from_canvas(np.stack([shapes.render(sc) for sc in scenes]), model.config.resolution)
    _, codes = reconstruct(model, images)
    centre = codes[:, codes.shape[1] // 2]  # the centre cell's code (the token grid's middle)
    print(f"{len(set(centre.tolist()))} distinct codes for {len(keys)} single objects")
    rows = code_init.image_rows(model, 128, 0.02, seed=0)
    book = np.asarray(model.quantize.codebook, np.float32)
    for name, table in (("code_init rows", rows), ("codebook vectors", book - book.mean(0))):
        stats = attribute_cosines(table[centre], keys)
        print(name + ": " + ", ".join(f"{a} same {s:.3f} / other {o:.3f}" for a, (s, o) in stats.items()))
    spec = np.mean([len(shapes.sample(0, i, "centred")[0].objects) for i in range(args.scenes)])
    grid = np.mean([len(shapes.grid_scene(0, i).objects) for i in range(args.scenes)])
    print(f"objects a scene: spec {spec:.2f} ({1 - spec / 9:.0%} of cells empty), grid {grid:.2f} "
          f"({grid / spec:.1f}x)")


if __name__ == "__main__":
    main()
