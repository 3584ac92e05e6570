"""What the judge rejects in a model's shapes images, per task and kind of miss.

    python benchmarks/shapes_failures.py [--model DIR] [--prompts 90] [--images-per-prompt 2]
        [--seed 7] [--guidance G --top-k K --temperature T]

Generates K images for each of N fresh captions (the tasks in turn, as `eval shapes`),
with the model's saved sampling settings unless flags override them, judges each one
and prints, per task, the accuracy and the kinds of miss among the rejected images
(`evaluate.miss_kinds`: 'object count' for too many or too few objects, else the missed
attributes 'colour', 'shape', 'size', 'cell', and 'relation'), then a few rejections.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

import numpy as np

from dalle_mini_jax import evaluate, quality
from dalle_mini_jax.cli import add_sampling_args
from dalle_mini_jax.pipeline import DalleMini


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--prompts", type=int, default=90, help="captions (the tasks in turn)")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7, help="caption and sampling seed")
    parser.add_argument("--examples", type=int, default=12, help="rejections to print")
    add_sampling_args(parser)
    args = parser.parse_args(argv)
    pipe = DalleMini.from_pretrained(args.model)
    prompts = quality.shapes_prompts(args.prompts, seed=args.seed)
    captions = [c for c, _ in prompts]
    k = args.images_per_prompt
    images = pipe.generate(captions, num_images=k, seed=args.seed, **quality.sampling_from_args(args))
    judged: dict[str, list[bool]] = defaultdict(list)
    kinds: dict[str, Counter] = defaultdict(Counter)
    examples = []
    for i, image in enumerate(images):
        caption, task = prompts[i // k]
        ok, _, reason = evaluate.judge_detailed(np.asarray(image), caption)
        judged[task].append(ok)
        if not ok:
            kinds[task].update(evaluate.miss_kinds(reason))
            if len(examples) < args.examples:
                examples.append(f"  {task}: {caption} | {reason[:150]}")
    print(f"{len(images)} images, seed {args.seed}, sampling {pipe.defaults.override(**quality.sampling_from_args(args)).to_dict()}")
    for task, oks in judged.items():
        misses = ", ".join(f"{name} {n}" for name, n in kinds[task].most_common())
        print(f"{task:<18} {np.mean(oks):.3f} of {len(oks)}; misses: {misses or '-'}")
    print("first rejections:")
    print("\n".join(examples))


if __name__ == "__main__":
    main()
