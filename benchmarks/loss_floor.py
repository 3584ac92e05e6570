"""The lowest mean cross-entropy a transformer can reach on an encoded shapes set.

    python benchmarks/loss_floor.py [--num 2000 --seed 1 --layout reading_centred --mix spec]

With a VQGAN whose codes are a function of the cell's content (the cell VQGAN on centred
images: code consistency 1.0), an image is fixed by its scene, and `shapes.sample_scene`
draws a caption's scene uniformly among the scenes it allows: 2 sizes for every object
whose size is unstated, and for the cells either the subsets of free cells for the
unplaced phrases (a "reading" layout hands them out in order, so a subset is one scene;
"free" counts the orderings too) or, for a relation, the cell pairs that satisfy it. The
entropy of that choice, log(#scenes), divided by the codes an image (9), is the floor of
the validation loss per code that the trainer reports (BUNDLED.md compares against it).
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import numpy as np

from dalle_mini_jax import shapes


def scenes_allowed(spec: shapes.CaptionSpec, layout: str) -> int:
    """How many scenes `shapes.sample_scene` draws uniformly from for this caption."""
    objects = spec.objects
    n = 2 ** sum(p.size is None for p in objects)
    if spec.form == "relation":
        return n * sum(1 for a in shapes.CELLS for b in shapes.CELLS
                       if a != b and shapes.relation_holds(spec.relation, a, b))
    free = len(shapes.CELLS) - sum(p.cell is not None for p in objects)
    unplaced = sum(p.cell is None for p in objects)
    ordered = layout in ("free", "centred") and spec.form != "count"  # a count's objects are alike
    return n * (math.perm(free, unplaced) if ordered else math.comb(free, unplaced))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--layout", default="reading_centred", choices=shapes.LAYOUTS)
    p.add_argument("--mix", default="spec", choices=list(shapes.TASK_MIXES))
    p.add_argument("--codes", type=int, default=9, help="codes an image (the cell VQGAN: 9)")
    args = p.parse_args(argv)
    by_task = defaultdict(list)
    for i in range(args.num):
        _, spec = shapes.sample(args.seed, i, args.layout, args.mix)
        by_task[spec.task].append(math.log(scenes_allowed(spec, args.layout)))
    everything = [h for hs in by_task.values() for h in hs]
    print(f"floor {np.mean(everything) / args.codes:.3f} nats a code over {args.num} captions "
          f"(shapes:{args.num}:{args.seed}:{args.layout}:{args.mix})")
    for task in shapes.TASKS:
        print(f"  {task:<18} {np.mean(by_task[task]) / args.codes:.3f} ({len(by_task[task])})")


if __name__ == "__main__":
    main()
