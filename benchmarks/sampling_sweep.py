"""Pick a shapes model's sampling settings: the quality benchmark over a grid of settings.

    python benchmarks/sampling_sweep.py --model runs/bundled/model --prompts 90 --images-per-prompt 2

Each setting runs `quality.run_shapes` on the same fresh captions (caption seed `--seed`,
default 1: the final `dalle-mini-jax eval shapes` uses seed 0, so the settings are not
tuned on the captions they are reported on) and prints one row: overall accuracy, the
worst task, and the time. The best row is printed last; write it into the model
directory with `dalle-mini-jax eval shapes --model DIR <its flags> --save-defaults`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _list_of(parse):
    """A comma-separated list, each item parsed as the CLI's matching flag parses it."""
    return lambda text: [parse(x) for x in text.split(",")]


def main(argv=None) -> int:
    from dalle_mini_jax.cli import positive_float, top_k_arg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (with vqgan/)")
    p.add_argument("--prompts", type=int, default=90)
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--guidance", type=_list_of(float), default=[1.0, 2.0, 3.0, 5.0, 10.0])
    p.add_argument("--top-k", type=_list_of(top_k_arg), default=[50], help="comma list; 0 = all codes")
    p.add_argument("--temperature", type=_list_of(positive_float), default=[1.0])
    p.add_argument("--json", action="store_true", help="last line: one JSON list of rows")
    args = p.parse_args(argv)

    from dalle_mini_jax import quality
    from dalle_mini_jax.pipeline import DalleMini

    pipe = DalleMini.from_pretrained(args.model)
    rows = []
    for guidance, top_k, temperature in itertools.product(args.guidance, args.top_k, args.temperature):
        start = time.perf_counter()
        report = quality.run_shapes(pipe, num_prompts=args.prompts,
                                    images_per_prompt=args.images_per_prompt, seed=args.seed,
                                    guidance=guidance, top_k=top_k, temperature=temperature,
                                    top_p=None)
        tasks = {k: v for k, v in report.scores.items() if k != "overall"}
        worst_task = min(tasks, key=tasks.get)
        row = dict(guidance=guidance, top_k=top_k, temperature=temperature,
                   overall=report.overall, worst_task=worst_task, worst=tasks[worst_task],
                   scores=report.scores, seconds=time.perf_counter() - start)
        rows.append(row)
        print(f"guidance {guidance:<5g} top_k {str(top_k):<5} temperature {temperature:<4g} "
              f"overall {report.overall:.3f}  worst {worst_task} {tasks[worst_task]:.3f}  "
              f"{row['seconds']:.1f} s", flush=True)
    best = max(rows, key=lambda r: r["overall"])
    print(f"best: guidance {best['guidance']:g}, top_k {best['top_k']}, "
          f"temperature {best['temperature']:g}: overall {best['overall']:.3f}")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
