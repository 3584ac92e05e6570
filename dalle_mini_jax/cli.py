"""The `dalle-mini-jax` console command: one entry point, one subcommand per job.

    dalle-mini-jax generate "a red square" "a blue circle" -n 4 --grid --out outputs/

Each subcommand is a thin call into the package. Adding one takes a few lines: write
`add_arguments(parser)` and `run(args) -> int | None` and call `register`, e.g.

    def _train_args(p):
        p.add_argument("config")

    def _train(args):
        from . import train
        train.main(args.config)

    register("train", "train the transformer", _train_args, _train)

Errors a user can cause (bad arguments, missing or damaged model directories) end with
a one-line message and exit status 2, never a traceback. `CliError` is the exception a
subcommand raises for them; the known library errors (FileNotFoundError, ValueError,
CheckpointError, ConfigError) are reported the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


class CliError(Exception):
    """A user error: printed as `dalle-mini-jax <cmd>: error: <message>`, exit status 2."""


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def register(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
             run: Callable[[argparse.Namespace], int | None]) -> None:
    """Add a subcommand `dalle-mini-jax NAME` (see the module docstring)."""
    if name in COMMANDS:
        raise ValueError(f"subcommand {name!r} is already registered")
    COMMANDS[name] = Command(name, help, add_arguments, run)


# --------------------------------------------------------------------------------------
# Argument types: each gives argparse a clear message instead of a traceback
# --------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def top_k_arg(text: str) -> int | None:
    """A positive int, or 0 / 'none' for no top-k filter."""
    if text.lower() in ("none", "0", "off"):
        return None
    return positive_int(text)


def top_p_arg(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value}")
    return value


def positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


# --------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------


def _generate_args(p: argparse.ArgumentParser) -> None:
    from .pipeline import DTYPES

    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="text prompt(s); quote each one")
    p.add_argument("--model", type=Path, default=None,
                   help="model directory (config.json, flax_model.msgpack, tokenizer files); "
                        "default: the model bundled with the package")
    p.add_argument("--vqgan", type=Path, default=None,
                   help="VQGAN directory; default: the model config's vqgan_path or MODEL/vqgan")
    p.add_argument("-n", "--num-images", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0,
                   help="image k of a prompt is the same for a given seed whatever else is generated")
    p.add_argument("--out", type=Path, default=Path("outputs"),
                   help="output directory, or a file name ending in .png (several images get "
                        "_<i> suffixes); default: ./outputs")
    p.add_argument("--grid", action="store_true", help="also write all images tiled into one grid PNG")
    add_sampling_args(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="weights are loaded directly in this dtype and computed in it")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images decoded together")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _float_arg(text: str) -> float:
    return _finite_float(text)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """--guidance, --top-k, --top-p, --temperature (for `generate` and `eval`).

    Each defaults to `sampling.MODEL_DEFAULT`, which `DalleMini.generate` replaces by the
    model directory's generation_config.json value, else the released DALL·E Mini's.
    """
    from .sampling import DEFAULT_GUIDANCE, DEFAULT_TOP_K, MODEL_DEFAULT

    model = "default: the model's generation_config.json, else"
    p.add_argument("--guidance", type=_float_arg, default=MODEL_DEFAULT,
                   help=f"super-conditioning scale, 1 = off ({model} {DEFAULT_GUIDANCE:g})")
    p.add_argument("--top-k", type=top_k_arg, default=MODEL_DEFAULT,
                   help=f"keep the K most likely codes; 0 = all ({model} {DEFAULT_TOP_K})")
    p.add_argument("--top-p", type=top_p_arg, default=MODEL_DEFAULT,
                   help=f"nucleus sampling mass in (0, 1]; 'none' = off ({model} off)")
    p.add_argument("--temperature", type=positive_float, default=MODEL_DEFAULT,
                   help=f"sampling temperature > 0 ({model} 1)")


def _slug(text: str, width: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:width].rstrip("-") or "prompt"


def _output_paths(out: Path, prompts: Sequence[str], num_images: int, seed: int) -> tuple[list[Path], Path]:
    """File names for the N images and for the grid."""
    n = len(prompts) * num_images
    if out.suffix.lower() == ".png":
        if n == 1:
            files = [out]
        else:
            files = [out.with_name(f"{out.stem}_{i}.png") for i in range(n)]
        return files, out.with_name(f"{out.stem}_grid.png")
    files = [out / f"{p:02d}-{_slug(text)}-seed{seed}-{k}.png"
             for p, text in enumerate(prompts) for k in range(num_images)]
    return files, out / f"grid-seed{seed}.png"


def _png_info(meta: dict[str, str]):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in meta.items():
        info.add_itxt(key, str(value))  # iTXt: UTF-8, so any prompt round-trips
    return info


def _generate(args: argparse.Namespace) -> int:
    for i, prompt in enumerate(args.prompts):
        if not prompt.strip():
            raise CliError(f"prompt {i + 1} is empty; give a non-empty text")
    if args.model is not None and not args.model.is_dir():
        raise CliError(f"model directory {args.model} does not exist")
    if args.vqgan is not None and not args.vqgan.is_dir():
        raise CliError(f"VQGAN directory {args.vqgan} does not exist")

    from .pipeline import DalleMini, image_grid

    pipe = DalleMini.from_pretrained(args.model, args.vqgan, dtype=args.dtype, compile_ahead=False)
    # Compiled before generating, for these arguments: see DalleMini.compile_for.
    pipe.compile_for(len(args.prompts), args.num_images, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p, guidance=args.guidance, batch_size=args.batch_size, prompts=args.prompts)
    images = pipe.generate(
        args.prompts, num_images=args.num_images, seed=args.seed, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, guidance=args.guidance, progress=not args.quiet,
        batch_size=args.batch_size,
    )
    files, grid_file = _output_paths(args.out, args.prompts, args.num_images, args.seed)
    files[0].parent.mkdir(parents=True, exist_ok=True)
    for img, path in zip(images, files):
        meta = dict(img.info, dtype=args.dtype)
        img.save(path, pnginfo=_png_info(meta))
        print(path)
    if args.grid:
        meta = dict(images[0].info, dtype=args.dtype, prompts=json.dumps(args.prompts),
                    num_images=str(args.num_images))
        meta.pop("prompt", None)
        meta.pop("index", None)
        image_grid(images, cols=args.num_images if len(args.prompts) > 1 else None).save(
            grid_file, pnginfo=_png_info(meta))
        print(grid_file)
    return 0


register("generate", "generate images from text prompts", _generate_args, _generate)


# --------------------------------------------------------------------------------------
# train-vqgan, encode (flags and work live in vqgan_train.py / encode.py)
# --------------------------------------------------------------------------------------


def _lazy(module: str, attr: str):
    """`module.attr(args)`, imported only when the subcommand runs or builds its parser."""
    return lambda x: getattr(__import__(f"dalle_mini_jax.{module}", fromlist=[attr]), attr)(x)


def _data_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="dataset", metavar="DATASET")
    sub.required = True
    s = sub.add_parser("shapes", help="write the built-in shapes set as DIR/<i>.png + DIR/<i>.txt")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--num", type=positive_int, required=True, help="number of image/caption pairs")
    s.add_argument("--seed", type=int, default=0, help="sample i depends only on (seed, i)")
    s.add_argument("--start", type=int, default=0, help="first sample index (to write in pieces)")


def _data(args: argparse.Namespace) -> int:
    from . import shapes

    if args.start < 0:
        raise CliError(f"--start must be >= 0, got {args.start}")
    shapes.write_folder(args.out, args.num, args.seed, start=args.start)
    print(f"wrote {args.num} shapes image/caption pairs to {args.out}")
    return 0


register("data", "write a built-in data set to a folder (data shapes)", _data_args, _data)
register("train-vqgan", "train or fine-tune a VQGAN (resumes from WORKDIR)",
         _lazy("vqgan_train", "add_arguments"), _lazy("vqgan_train", "run"))
register("encode", "encode a captioned image set to VQGAN codes (parquet shards)",
         _lazy("encode", "add_arguments"), _lazy("encode", "run"))
register("eval", "quality benchmark: judged accuracy per task (eval shapes)",
         _lazy("quality", "add_arguments"), _lazy("quality", "run"))
register("train", "train or fine-tune the transformer (resumes from WORKDIR)",
         _lazy("train", "add_train_args"), _lazy("train", "run_train"))
register("export", "export a training checkpoint to a model directory",
         _lazy("train", "add_export_args"), _lazy("train", "run_export"))


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's arguments are built.

    Building a subcommand's arguments may import its module (training, data, ...), so
    `dalle-mini-jax generate` never imports the trainer, and a problem in one module
    cannot break the others. With `argv=None` every subcommand is built.
    """
    parser = argparse.ArgumentParser(
        prog="dalle-mini-jax", description="DALL·E Mini style text-to-image in JAX / Flax NNX."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), None)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if chosen is None and argv is None or chosen == cmd.name:
            cmd.add_arguments(p)
        p.set_defaults(_command=cmd, _parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (also raised as SystemExit by argparse)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    cmd: Command = args._command
    sub_parser: argparse.ArgumentParser = args._parser
    from .checkpoint import CheckpointError
    from .config import ConfigError

    try:
        status = cmd.run(args)
    except (CliError, FileNotFoundError, NotADirectoryError, CheckpointError, ConfigError,
            ValueError, TypeError) as e:
        sub_parser.error(str(e))  # prints usage + message, exits with status 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
