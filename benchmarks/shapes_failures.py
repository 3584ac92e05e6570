"""What the judge rejects in a model's shapes images, per task and kind of miss.

    python benchmarks/shapes_failures.py [--model DIR] [--prompts 90] [--images-per-prompt 2]
        [--seed 7] [--guidance G --top-k K --temperature T]

Runs `eval shapes`' own benchmark (`quality.run_shapes`: K images for each of N fresh
captions, the tasks in turn, with the model's saved sampling settings unless flags
override them) keeping every rejection, and prints, per task, the accuracy and the
kinds of miss among the rejected images
(`evaluate.miss_kinds`: 'object count' for too many or too few objects, else the missed
attributes 'colour', 'shape', 'size', 'cell', and 'relation'), then the accuracy of the
`and` captions split by how many of their phrases state a position (binding by cell vs
binding with the placement left to the model), then a few rejections.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

from dalle_mini_jax import evaluate, quality, shapes
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
    k = args.images_per_prompt
    # `eval shapes`' own run, keeping every rejection (caption, reason).
    report = quality.run_shapes(pipe, args.prompts, k, seed=args.seed,
                                max_failures=args.prompts * k, **quality.sampling_from_args(args))
    task_of = dict(quality.shapes_prompts(args.prompts, seed=args.seed))  # caption -> task
    kinds: dict[str, Counter] = defaultdict(Counter)
    for caption, reason in report.failures:
        kinds[task_of[caption]].update(evaluate.miss_kinds(reason))
    print(f"{report.counts['overall']} images, seed {args.seed}, sampling {report.settings}")
    for task, score in report.scores.items():
        if task == "overall":
            continue
        misses = ", ".join(f"{name} {n}" for name, n in kinds[task].most_common())
        print(f"{task:<18} {score:.3f} of {report.counts[task]}; misses: {misses or '-'}")
    # `and` captions by positions stated: does the model bind when it also has to place?
    failed = Counter(caption for caption, _ in report.failures)
    groups: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])  # -> [ok, images]
    for caption in task_of:
        spec = shapes.parse_caption(caption)
        if spec.form != "and":
            continue
        key = (len(spec.objects), sum(p.cell is not None for p in spec.objects))
        groups[key][0] += k - failed[caption]
        groups[key][1] += k
    print("`and` captions by positions stated (objects, positions): accuracy of images")
    for (n, stated), (ok, total) in sorted(groups.items()):
        print(f"  {n} objects, {stated} positioned: {ok / total:.3f} of {total}")
    print("first rejections:")
    for caption, reason in report.failures[:args.examples]:
        print(f"  {task_of[caption]}: {caption} | {reason[:150]}")


if __name__ == "__main__":
    main()
