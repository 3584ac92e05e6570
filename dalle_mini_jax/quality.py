"""The shapes quality benchmark: `dalle-mini-jax eval shapes`.

    dalle-mini-jax eval shapes                       # the bundled model, 400 captions x 4
    dalle-mini-jax eval shapes --model runs/bundled/model --prompts 90 --images-per-prompt 2
    dalle-mini-jax eval shapes --model DIR --guidance 3 --top-k 50 --save-defaults

Captions are drawn fresh from the shapes grammar (specs/shapes-v1.md), the same number of
each task (GenEval-style: one object, two objects, three objects, colour, size,
position, relation, counting, attribute binding), K images are generated for each with
the model, and every image is judged by the exact judge (`evaluate.judge_batch`). The
report is the share of images that satisfy their caption per task, and overall (the
mean over tasks, so every task weighs the same whatever its number of captions), plus
the time it took. With `--save-defaults` the sampling settings just evaluated become the
model directory's defaults (its generation_config.json), which `generate` then uses.

Caption k of the benchmark has task `TASKS[k % 9]` and is drawn from
`default_rng((seed, task index, k // 9))` (`evaluate.benchmark_prompts`), so the first N
captions of a seed are the same whatever N is, and no training set of the shapes
generator (which draws sample i from `default_rng((seed, i))`) ever shares a random
stream with it. The grammar is small (a one-object caption has 32 possible texts), so a
benchmark caption may well also be a training caption: "fresh" means drawn
independently, not unseen.

Generation is batched: all prompts go into one `generate` call, `batch_size` images
decoded together, so the jitted decode loop is compiled once and runs on full batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import evaluate, shapes

DEFAULT_PROMPTS = 400
DEFAULT_IMAGES_PER_PROMPT = 4
DEFAULT_BATCH_SIZE = 256  # images decoded together: big batches amortise the weight reads


@dataclasses.dataclass
class QualityReport:
    """What `run_shapes` measured.

    Attributes:
      scores: {task: accuracy} for each task in `shapes.TASKS` order, then 'overall'
        (the mean over tasks).
      counts: {task: images judged} (and 'overall': all images).
      num_prompts: captions generated for.
      images_per_prompt: K.
      seed: caption seed (images use the same seed).
      settings: the sampling settings used (all four: flags, else the model's defaults).
      model: the model's name or directory.
      generate_seconds: wall time of the generation (compilation included).
      judge_seconds: wall time of the judging.
      failures: a few (caption, reason) examples of failed images, for reading.
      ceiling: {task: accuracy} of the VQGAN's own reconstructions of true images for
        the same captions (`vqgan_ceiling`), or None when not measured.
    """

    scores: dict[str, float]
    counts: dict[str, int]
    num_prompts: int
    images_per_prompt: int
    seed: int
    settings: dict[str, Any]
    model: str
    generate_seconds: float
    judge_seconds: float
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    ceiling: dict[str, float] | None = None

    @property
    def overall(self) -> float:
        return self.scores["overall"]

    @property
    def seconds(self) -> float:
        return self.generate_seconds + self.judge_seconds

    def table(self) -> str:
        """The report as a Markdown table (one row per task, then overall, then timing)."""
        ceil = self.ceiling
        lines = ["| task | accuracy | images |" + (" VQGAN ceiling |" if ceil else ""),
                 "|---|---:|---:|" + ("---:|" if ceil else "")]
        for task, score in self.scores.items():
            name = "**overall**" if task == "overall" else task
            extra = f" {ceil[task]:.3f} |" if ceil and task in ceil else (" |" if ceil else "")
            lines.append(f"| {name} | {score:.3f} | {self.counts[task]} |{extra}")
        n = self.counts["overall"]
        lines.append("")
        lines.append(
            f"{self.num_prompts} captions x {self.images_per_prompt} images = {n} images, "
            f"seed {self.seed}, model {self.model}, settings used {json.dumps(self.settings)}; "
            f"generation {self.generate_seconds:.1f} s ({n / max(self.generate_seconds, 1e-9):.1f} "
            f"images/s, compilation included), judging {self.judge_seconds:.1f} s, "
            f"total {self.seconds:.1f} s."
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def shapes_prompts(num_prompts: int, seed: int = 0) -> list[tuple[str, str]]:
    """`num_prompts` fresh benchmark captions, tasks taken in turn.

    Returns:
      [(caption, task)]: caption k has task `shapes.TASKS[k % 9]`, so every task gets
      `num_prompts // 9` or one more; a prefix of a longer list for the same seed.
    """
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    per_task = math.ceil(num_prompts / len(shapes.TASKS))
    by_task = evaluate.benchmark_prompts(per_task, seed)  # task-major order
    # Interleave: task-major index t * per_task + k -> k * 9 + t.
    interleaved = [by_task[t * per_task + k]
                   for k in range(per_task) for t in range(len(shapes.TASKS))]
    return interleaved[:num_prompts]


def score_images(images: np.ndarray, captions: Sequence[str], tasks: Sequence[str]
                 ) -> tuple[dict[str, float], dict[str, int], np.ndarray]:
    """Per-task accuracy of judged images.

    Args:
      images: uint8 [N, 64, 64, 3].
      captions: N captions.
      tasks: N task names (the task each caption was drawn for).

    Returns:
      (scores, counts, ok): scores {task: accuracy} in `shapes.TASKS` order for the
      tasks present, then 'overall' = the mean over those tasks; counts {task: images},
      'overall' = N; ok bool [N].
    """
    ok = evaluate.judge_batch(images, captions)
    tasks = np.asarray(tasks)
    scores, counts = {}, {}
    for task in shapes.TASKS:
        mask = tasks == task
        if mask.any():
            scores[task] = float(ok[mask].mean())
            counts[task] = int(mask.sum())
    scores["overall"] = float(np.mean(list(scores.values())))
    counts["overall"] = len(ok)
    return scores, counts, ok


def run_shapes(pipe, num_prompts: int = DEFAULT_PROMPTS,
               images_per_prompt: int = DEFAULT_IMAGES_PER_PROMPT, seed: int = 0,
               batch_size: int | None = DEFAULT_BATCH_SIZE, progress: bool = False,
               max_failures: int = 20, **sampling: Any) -> QualityReport:
    """Runs the shapes benchmark on a loaded pipeline.

    Args:
      pipe: a `pipeline.DalleMini` whose VQGAN makes 64 x 64 images (or larger: judged
        after `shapes.to_canvas`).
      num_prompts: fresh captions (`shapes_prompts`).
      images_per_prompt: K images per caption.
      seed: caption seed, also the generation seed.
      batch_size: images decoded together (None: all at once).
      progress: a progress bar over decode steps.
      max_failures: failed (caption, reason) examples kept in the report.
      **sampling: temperature, top_k, top_p, guidance for `DalleMini.generate`; the
        ones not given are the pipeline's defaults (`pipe.defaults`).

    Returns:
      A `QualityReport`.
    """
    side = pipe.vqgan.config.resolution
    if side < shapes.CANVAS_SIZE:
        raise ValueError(f"the model makes {side}x{side} images; the shapes judge needs "
                         f"{shapes.CANVAS_SIZE}x{shapes.CANVAS_SIZE} or larger (is this a shapes "
                         "model?)")
    prompts = shapes_prompts(num_prompts, seed)
    texts = [c for c, _ in prompts]
    start = time.perf_counter()
    pil = pipe.generate(texts, num_images=images_per_prompt, seed=seed, batch_size=batch_size,
                        progress=progress, **sampling)
    generate_seconds = time.perf_counter() - start
    settings = json.loads(pil[0].info.get("settings", "{}")) if pil else dict(sampling)

    start = time.perf_counter()
    # A model drawing at a larger side (the cell VQGAN's 96) is judged on the canvas its
    # training images were enlarged from (`shapes.from_canvas`, undone exactly).
    images = shapes.to_canvas(np.stack([np.asarray(p.convert("RGB")) for p in pil]))
    captions = [c for c, _ in prompts for _ in range(images_per_prompt)]
    tasks = [t for _, t in prompts for _ in range(images_per_prompt)]
    scores, counts, ok = score_images(images, captions, tasks)
    failures = []
    for i in np.flatnonzero(~ok)[:max_failures]:
        _, _, reason = evaluate.judge_detailed(images[i], captions[i])
        failures.append((captions[i], reason))
    judge_seconds = time.perf_counter() - start
    return QualityReport(scores=scores, counts=counts, num_prompts=len(prompts),
                         images_per_prompt=images_per_prompt, seed=seed, settings=settings,
                         model=str(getattr(pipe, "name", "model")),
                         generate_seconds=generate_seconds, judge_seconds=judge_seconds,
                         failures=failures)


def vqgan_ceiling(vqgan_dir: str | Path, num_prompts: int = DEFAULT_PROMPTS,
                  images_per_prompt: int = 1, seed: int = 0, batch_size: int = 64,
                  layout: str = "free") -> dict[str, float]:
    """Judged accuracy of a VQGAN's reconstructions of true images of the benchmark captions.

    No transformer over this VQGAN can score more than this (it can only pick codes,
    and the best codes for a true image are about what the encoder picks), so the
    ceiling tells VQGAN failures from transformer failures.

    Args:
      vqgan_dir: a full VQGAN directory (the encoder is needed).
      num_prompts, seed: the captions (`shapes_prompts`).
      images_per_prompt: true images drawn per caption (`shapes.sample_scene`).
      batch_size: images per jitted encode-decode call.
      layout: `shapes.sample_scene`'s layout of the true images ("free": the spec's;
        "centred": no jitter, for a VQGAN trained and used on centred images).

    Returns:
      {task: accuracy}, then 'overall' (the mean over tasks).
    """
    from .vqgan import VQModel
    from .vqgan_train import reconstruct

    model = VQModel.from_pretrained(vqgan_dir)
    prompts = shapes_prompts(num_prompts, seed)
    images, captions, tasks = [], [], []
    for k, (caption, task) in enumerate(prompts):
        spec = shapes.parse_caption(caption)
        for j in range(images_per_prompt):
            # Its own stream: (seed, k, j) with a tag the benchmark captions never use.
            rng = np.random.default_rng((seed, 7_777, k, j))
            images.append(shapes.render(shapes.sample_scene(rng, spec, layout)))
            captions.append(caption)
            tasks.append(task)
    images = np.stack(images)
    side = model.config.resolution
    if side > shapes.CANVAS_SIZE:  # a VQGAN drawing larger reads and is judged as run_shapes
        images = shapes.from_canvas(images, side)
    recon, _ = reconstruct(model, images, batch_size)
    scores, _, _ = score_images(shapes.to_canvas(recon), captions, tasks)
    return scores


# --------------------------------------------------------------------------------------
# Command line: `dalle-mini-jax eval shapes ...`
# --------------------------------------------------------------------------------------

BENCHMARKS = ("shapes",)


def add_arguments(parser) -> None:
    """The `eval` flags (for `cli.register` and `python -m dalle_mini_jax.quality`)."""
    from .cli import add_sampling_args, positive_int

    parser.add_argument("benchmark", choices=BENCHMARKS, help="which benchmark (shapes)")
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory; default: the model bundled with the package")
    parser.add_argument("--vqgan", type=Path, default=None,
                        help="VQGAN directory; default: the model config's vqgan_path or MODEL/vqgan")
    parser.add_argument("--prompts", type=positive_int, default=DEFAULT_PROMPTS,
                        help=f"fresh captions, tasks in turn (default {DEFAULT_PROMPTS})")
    parser.add_argument("--images-per-prompt", "-k", type=positive_int,
                        default=DEFAULT_IMAGES_PER_PROMPT,
                        help=f"images per caption (default {DEFAULT_IMAGES_PER_PROMPT})")
    parser.add_argument("--seed", type=int, default=0, help="caption and image seed")
    add_sampling_args(parser)
    parser.add_argument("--save-defaults", action="store_true",
                        help="after the run, write the sampling settings used into "
                             "MODEL/generation_config.json (the bundled model's when no "
                             "--model): the defaults generate then uses")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                        help=f"images decoded together (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--failures", type=int, default=0, metavar="N",
                        help="print N failed captions with the judge's reason")
    parser.add_argument("--ceiling", action="store_true",
                        help="also judge the VQGAN's reconstructions of true images for the "
                             "same captions: the most any transformer over it can score")
    parser.add_argument("--ceiling-layout", default="free", choices=["free", "centred"],
                        help="the true images of --ceiling: as the spec draws them, or "
                             "without jitter (a VQGAN trained on centred images, e.g. the "
                             "cell VQGAN, whose transformer learnt centred codes)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def sampling_from_args(args) -> dict[str, Any]:
    """The sampling keywords the user set (the rest stay the pipeline's defaults)."""
    from .sampling import MODEL_DEFAULT

    names = ("guidance", "top_k", "top_p", "temperature")
    return {k: getattr(args, k) for k in names if getattr(args, k) is not MODEL_DEFAULT}


def run(args) -> int:
    """`dalle-mini-jax eval` (the `cli.register` signature): prints the table."""
    from .pipeline import GENERATION_CONFIG_NAME, DalleMini, resolve_model_dir, write_generation_config

    model_dir = resolve_model_dir(args.model)  # a missing directory: FileNotFoundError, now
    if args.save_defaults and not os.access(model_dir, os.W_OK):
        from .cli import CliError

        # Now, not after a run of many minutes.
        raise CliError(f"--save-defaults: cannot write to {model_dir}")
    start = time.perf_counter()
    pipe = DalleMini.from_pretrained(args.model, args.vqgan, dtype=args.dtype)
    load_seconds = time.perf_counter() - start
    flags = sampling_from_args(args)
    report = run_shapes(pipe, args.prompts, args.images_per_prompt, args.seed,
                        batch_size=args.batch_size, progress=not args.quiet,
                        max_failures=max(args.failures, 20), **flags)
    if args.model is not None:
        report.model = str(args.model)
    if args.ceiling:
        from .pipeline import resolve_vqgan_dir

        vq_dir = resolve_vqgan_dir(model_dir, pipe.config, args.vqgan)
        report.ceiling = vqgan_ceiling(vq_dir, args.prompts, args.images_per_prompt, args.seed,
                                       layout=args.ceiling_layout)
    print(report.table())
    print(f"(model loaded in {load_seconds:.1f} s)")
    defaults_file = model_dir / GENERATION_CONFIG_NAME
    source = (f"the model's defaults ({defaults_file})" if defaults_file.is_file()
              else f"the released defaults (no {GENERATION_CONFIG_NAME} in the model directory)")
    used = ", ".join(f"{k}={v}" for k, v in report.settings.items())
    print(f"(sampling settings used: {used}; from flags: {', '.join(flags) or 'none'}; "
          f"the others: {source})")
    for caption, reason in report.failures[:args.failures]:
        print(f"FAIL {caption!r}: {reason}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(report.to_dict(), load_seconds=load_seconds),
                                        indent=2) + "\n")
    if args.save_defaults:
        written = write_generation_config(model_dir, **report.settings)
        print(f"wrote these sampling settings to {written}: generate's defaults for this model")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dalle_mini_jax.quality shapes ...` (the same as `dalle-mini-jax eval`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="dalle-mini-jax eval",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["QualityReport", "shapes_prompts", "score_images", "run_shapes", "vqgan_ceiling",
           "add_arguments",
           "run", "main", "DEFAULT_PROMPTS", "DEFAULT_IMAGES_PER_PROMPT"]

if __name__ == "__main__":
    import sys

    sys.exit(main())
