"""Encode a captioned image set once into VQGAN codes: parquet shards of (caption, encoding).

    dalle-mini-jax encode --data SRC --vqgan DIR --out DIR [--batch-size 64] [--shard-size 10000]

SRC is anything `data.open_dataset` reads (a folder of image + .txt pairs, an image folder
with metadata, parquet/jsonl/csv files, a `save_to_disk` directory), or the built-in shapes
set written `shapes:N:SEED` (images 0 .. N-1 of the set with that seed, generated on the
fly; `shapes:N` means seed 0; `shapes:N:SEED:reading` the same captions with the objects
that state no position laid out in reading order (`:centred`: no jitter;
`:reading_centred`: both), `shapes.sample_scene`'s `layout`;
`shapes:N:SEED:LAYOUT:MIX` draws the tasks with `shapes.TASK_MIXES[MIX]`, e.g. `multi`;
MIX `grid` draws filled grids for a cell VQGAN, `shapes.GRID_MIX`).

Output: `OUT/{k:05d}.parquet` with columns `caption` (str) and `encoding` (list of S
int64 codes, raster order), the released training format (`data.write_encoded`), plus
`OUT/encode_info.json` (counts, the VQGAN used). Shard k holds the usable examples whose
stable index lies in [k * shard_size, (k + 1) * shard_size): the source's deterministic
order counts skipped (corrupt, missing-caption, ...) examples too, so a shard's range never
depends on what was skipped before it. Each shard is written under a temporary name and
renamed, so a rerun after an interruption skips every shard that exists and encodes only
the missing ones.

Encoding is one jitted call per batch of a fixed shape (the last batch is padded), so it
compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_mini_jax import data as data_lib
from dalle_mini_jax.vqgan import VQModel

logger = logging.getLogger(__name__)

SHAPES_PREFIX = "shapes"
INFO_NAME = "encode_info.json"


# --------------------------------------------------------------------------------------
# Sources: the built-in shapes set or data.open_dataset, behind one small interface
# --------------------------------------------------------------------------------------


def parse_shapes_source(source: str) -> tuple[int | None, int, str, str] | None:
    """Parse `shapes[:N[:SEED[:LAYOUT[:MIX]]]]`.

    Returns:
      None if `source` does not name the shapes set, else (N, seed, layout, mix): N None
      for `shapes` alone or `shapes:inf[:SEED]` (an endless stream, for training), seed 0
      if omitted, layout one of `shapes.LAYOUTS` ("free", the spec's set, if omitted), mix
      one of `shapes.MIXES` ("spec" if omitted).
    """
    from dalle_mini_jax.shapes import LAYOUTS, MIXES

    if source != SHAPES_PREFIX and not source.startswith(SHAPES_PREFIX + ":"):
        return None
    parts = source.split(":")[1:]
    if len(parts) > 4:
        raise ValueError(f"{source!r}: expected shapes, shapes:N, shapes:N:SEED, "
                         "shapes:N:SEED:LAYOUT or shapes:N:SEED:LAYOUT:MIX")
    try:
        num = None if not parts or parts[0] in ("", "inf") else int(parts[0])
        seed = int(parts[1]) if len(parts) >= 2 else 0
    except ValueError:
        raise ValueError(f"{source!r}: N and SEED of shapes:N:SEED must be integers") from None
    if num is not None and num <= 0:
        raise ValueError(f"{source!r}: N must be positive")
    layout = parts[2] if len(parts) >= 3 else "free"
    if layout not in LAYOUTS:
        raise ValueError(f"{source!r}: LAYOUT must be one of {', '.join(LAYOUTS)}")
    mix = parts[3] if len(parts) == 4 else "spec"
    if mix not in MIXES:
        raise ValueError(f"{source!r}: MIX must be one of {', '.join(MIXES)}")
    return num, seed, layout, mix


class ShapesSource:
    """The built-in shapes set as a source of `data.Example`s (nothing is ever skipped).

    Example i is `shapes.sample(seed, i, layout, mix)` (for mix `grid`: `shapes.grid_scene`,
    captioned with every object's phrase), so any range is generated directly: resuming at
    `start_index` costs nothing.

    Args:
      num: number of images, or None for an endless stream.
      seed: the set's seed.
      resolution: side of the images yielded; the set is drawn at 64, enlarged by
        nearest neighbour (`shapes.from_canvas`) or shrunk with `data.load_image`
        (Lanczos) when this differs.
      layout: `shapes.sample_scene`'s layout ("free": the spec's set).
      mix: `shapes.sample_caption`'s task mix ("spec": the spec's set), or
        `shapes.GRID_MIX` for filled grids (a cell VQGAN's training images only).
    """

    def __init__(self, num: int | None, seed: int, resolution: int, layout: str = "free",
                 mix: str = "spec"):
        self.num = num
        self.seed = seed
        self.resolution = resolution
        self.layout = layout
        self.mix = mix
        self.skipped: dict[str, int] = {}
        self.description = (f"shapes:{'inf' if num is None else num}:{seed}"
                            + ("" if layout == "free" and mix == "spec" else f":{layout}")
                            + ("" if mix == "spec" else f":{mix}"))

    def __len__(self) -> int:
        if self.num is None:
            raise TypeError("an endless shapes stream has no length")
        return self.num

    def iterate(self, start_index: int = 0) -> Iterator[data_lib.Example]:
        from dalle_mini_jax import shapes  # generator only needed for this source

        index = start_index
        while self.num is None or index < self.num:
            image, caption = next(shapes.generate(1, self.seed, index, self.layout, self.mix))
            if image.shape[0] < self.resolution:  # flat colours stay flat; exactly undone
                image = shapes.from_canvas(image, self.resolution)
            elif image.shape[0] > self.resolution:  # antialiased shrinking
                from PIL import Image

                image = data_lib.load_image(Image.fromarray(image), self.resolution)
            yield data_lib.Example(index, str(index), image, caption)
            index += 1

    def __iter__(self) -> Iterator[data_lib.Example]:
        return self.iterate()

    def summary(self) -> str:
        return f"{self.description}: generated, nothing skipped"


def open_source(source: str, resolution: int, *, num_workers: int = 2):
    """A source of `data.Example`s with `iterate(start_index)`, `skipped` and `summary()`.

    Args:
      source: `shapes[:N[:SEED]]` or anything `data.open_dataset` reads.
      resolution: side of the square images yielded.
      num_workers: image-decoding threads for `data.open_dataset` sources.
    """
    parsed = parse_shapes_source(source)
    if parsed is not None:
        return ShapesSource(*parsed[:2], resolution, layout=parsed[2], mix=parsed[3])
    return data_lib.open_dataset(source, resolution, num_workers=num_workers)


def source_length(src) -> int | None:
    """Number of examples (skipped ones included) for the shapes set; None for datasets,
    whose readers stream without counting first."""
    return src.num if isinstance(src, ShapesSource) else None


# --------------------------------------------------------------------------------------
# The jitted encoder
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="graphdef")
def encode_batch(params: nnx.State, images: jax.Array, *, graphdef) -> jax.Array:
    """`VQModel.encode` of uint8 images: [B, R, R, 3] -> int32 codes [B, S].

    Module-level and keyed on the (hashable) graphdef, so every call with one model shape
    and batch shape shares a compile, across `encode_dataset` calls too.
    """
    model = nnx.merge(graphdef, params)
    return model.encode(images.astype(jnp.float32) / 255.0)


# --------------------------------------------------------------------------------------
# Sharded encoding with resume
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class EncodeReport:
    """What one `encode_dataset` call did."""

    shards_written: list[int]  # shard numbers written by this call
    shards_skipped: list[int]  # shard numbers found already written
    examples_encoded: int  # examples encoded by this call
    skipped: dict[str, int]  # unusable examples met by this call, by data.SKIP_REASONS
    seconds: float  # wall time of this call


def shard_path(out_dir: str | Path, shard: int) -> Path:
    """`OUT/{shard:05d}.parquet`."""
    return Path(out_dir) / f"{shard:05d}.parquet"


def encode_dataset(
    source: str,
    vqgan_dir: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = 64,
    shard_size: int = 10_000,
    num_workers: int = 2,
    progress: bool = True,
) -> EncodeReport:
    """Encodes every usable example of `source` once into parquet shards (module docstring).

    Args:
      source: `shapes:N[:SEED]` or a `data.open_dataset` source.
      vqgan_dir: a VQGAN model directory (`VQModel.from_pretrained`).
      out_dir: where the shards go (created).
      batch_size: images per jitted encode call (a fixed shape; the last batch is padded).
      shard_size: stable example indices per shard.
      num_workers: image-decoding threads for dataset sources.
      progress: show a tqdm bar.

    Returns:
      An `EncodeReport`; the same facts are logged and merged into `OUT/encode_info.json`.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size}, {shard_size}")
    start_time = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = VQModel.from_pretrained(vqgan_dir)
    resolution = model.config.resolution
    src = open_source(source, resolution, num_workers=num_workers)
    if isinstance(src, ShapesSource) and src.num is None:
        raise ValueError(f"{source!r} is endless; encode needs shapes:N[:SEED]")
    total = source_length(src)
    num_shards = None if total is None else math.ceil(total / shard_size)
    done = {int(p.stem) for p in out_dir.glob("[0-9]*.parquet") if p.stem.isdigit()}
    if done:
        _check_same_run(out_dir, source, vqgan_dir, shard_size)
    if num_shards is not None and all(k in done for k in range(num_shards)):
        report = EncodeReport([], sorted(done), 0, {}, time.time() - start_time)
        logger.info("%s: all %d shards already written", out_dir, num_shards)
        return report
    # Start at the first shard not yet written; unread examples before it cost nothing.
    first = min(k for k in range(len(done) + 1) if k not in done)
    graphdef, params = nnx.split(model)
    written: list[int] = []
    encoded = 0

    # One shard's rows in memory at a time; `batch` gathers examples for the encoder.
    current, rows_caps, rows_codes = None, [], []
    batch: list[data_lib.Example] = []

    def flush_batch():
        nonlocal encoded
        if not batch:
            return
        images = np.zeros((batch_size, resolution, resolution, 3), np.uint8)
        for i, ex in enumerate(batch):
            images[i] = ex.image
        codes = np.asarray(encode_batch(params, images, graphdef=graphdef))[: len(batch)]
        rows_caps.extend(ex.caption for ex in batch)
        rows_codes.append(codes)
        encoded += len(batch)
        bar.update(len(batch))
        batch.clear()

    def flush_shard():
        flush_batch()
        if current is not None and current not in done:
            codes = (np.concatenate(rows_codes) if rows_codes
                     else np.zeros((0, model.config.num_tokens), np.int32))
            data_lib.write_encoded(shard_path(out_dir, current), rows_caps, codes)
            written.append(current)
        rows_caps.clear()
        rows_codes.clear()

    remaining = None if total is None else total - first * shard_size
    bar = tqdm(total=remaining, desc=f"encode {source}", unit="img", disable=not progress)
    try:
        for ex in src.iterate(start_index=first * shard_size):
            shard = ex.index // shard_size
            if shard != current:
                flush_shard()
                current = shard
            if shard in done:  # a later shard already written (an earlier one was missing)
                bar.update(1)
                continue
            batch.append(ex)
            if len(batch) == batch_size:
                flush_batch()
        flush_shard()
    finally:
        bar.close()
    skipped = {k: int(v) for k, v in dict(src.skipped).items() if v}
    report = EncodeReport(written, sorted(done), encoded, skipped, time.time() - start_time)
    _write_info(out_dir, source, vqgan_dir, model, shard_size, report)
    logger.info("%s", src.summary())
    return report


def _check_same_run(out_dir: Path, source: str, vqgan_dir, shard_size: int) -> None:
    """Refuse to resume into shards made from another source, VQGAN or shard size."""
    path = out_dir / INFO_NAME
    if not path.exists():
        return
    info = json.loads(path.read_text())
    now = {"source": source, "vqgan": str(Path(vqgan_dir).resolve()), "shard_size": shard_size}
    differ = [f"{k} {info[k]!r} (now {v!r})" for k, v in now.items() if k in info and info[k] != v]
    if differ:
        raise ValueError(f"{out_dir} holds shards encoded with another {', '.join(differ)}; "
                         "use a new --out folder, or delete the old shards")


def _write_info(out_dir: Path, source: str, vqgan_dir, model: VQModel, shard_size: int,
                report: EncodeReport) -> None:
    """Merge this call's counts into OUT/encode_info.json (readable, not needed to train)."""
    path = out_dir / INFO_NAME
    info: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    skipped = dict(info.get("skipped", {}))
    for k, v in report.skipped.items():
        skipped[k] = skipped.get(k, 0) + v
    info.update(
        source=source,
        vqgan=str(Path(vqgan_dir).resolve()),
        codebook_size=model.config.codebook_size,
        num_tokens=model.config.num_tokens,
        shard_size=shard_size,
        examples_encoded=info.get("examples_encoded", 0) + report.examples_encoded,
        skipped=skipped,
        shards=sorted({*info.get("shards", []), *report.shards_written, *report.shards_skipped}),
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)


# --------------------------------------------------------------------------------------
# Command line (also `dalle-mini-jax encode`)
# --------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    """The `encode` flags, for `cli.py` and `python -m dalle_mini_jax.encode`."""
    parser.add_argument("--data", required=True,
                        help="source: shapes:N[:SEED[:LAYOUT[:MIX]]] (LAYOUT one of shapes.LAYOUTS: free, reading, centred, reading_centred; MIX one of shapes.MIXES: a task mix, or grid for a cell VQGAN), or a folder / file / glob data.open_dataset reads")
    parser.add_argument("--vqgan", required=True, help="VQGAN model directory")
    parser.add_argument("--out", required=True, help="output folder of parquet shards")
    parser.add_argument("--batch-size", type=int, default=64, help="images per jitted encode call")
    parser.add_argument("--shard-size", type=int, default=10_000,
                        help="example indices per parquet shard")
    parser.add_argument("--workers", type=int, default=2, help="image-decoding threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> None:
    """Run `encode` from parsed `add_arguments` flags and print the report (the
    `cli.register` signature)."""
    report = encode_dataset(args.data, args.vqgan, args.out, batch_size=args.batch_size,
                            shard_size=args.shard_size, num_workers=args.workers,
                            progress=not args.no_progress)
    skipped = sum(report.skipped.values())
    print(f"encoded {report.examples_encoded} images into {len(report.shards_written)} new "
          f"shard(s) in {report.seconds:.1f}s; {len(report.shards_skipped)} shard(s) already "
          f"there; {skipped} unusable example(s) skipped"
          + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(report.skipped.items()))})"
             if skipped else ""))


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
