"""Image + caption datasets for fine-tuning, and the encoded-token parquet format.

Readers, all behind one call, `open_dataset(source, resolution)`:

- a folder of `name.{jpg,jpeg,png,webp}` + `name.txt` pairs, nested folders too;
- an image folder with `metadata.jsonl` / `metadata.csv` (HF imagefolder convention:
  columns `file_name`, `text`; `file_name` is relative to the metadata file's folder, and
  metadata files may sit in sub-folders);
- `.parquet`, `.jsonl` or `.csv` files (a file, a glob, or a folder of them) whose image
  column holds HF Image dicts `{"bytes", "path"}`, raw bytes, or paths relative to the file;
- a `datasets.Dataset.save_to_disk` directory (or a `DatasetDict` one: pick `split`).

Every image goes through `load_image`: EXIF orientation applied, converted to RGB,
centre-cropped to a square and resized to `resolution`, giving uint8 [R, R, 3]. Broken
inputs never stop a run: each is skipped and counted under one of `SKIP_REASONS`, and the
counts are logged when an iteration ends (`ImageCaptionDataset.summary()`). What *is* fatal
is a source that cannot be a dataset at all (a missing path, an unknown format, a column
that is not there): that fails at `open_dataset`, with what to do about it.

Choices, so that they are made once:
- Transparency is composited on **white**: transparent-background PNGs (logos, clip art,
  product shots) are drawn to be seen on white, and on black their dark outlines vanish.
- Resizing is **Lanczos** (PIL's `resize` is antialiased when it shrinks), from the
  centred square of the image. Large JPEGs are first decoded at a reduced scale by libjpeg
  (`Image.draft`) to no less than 2·R, so the Lanczos step still shrinks by ≥ 2×: much
  faster and lighter on memory, at no visible cost.
- `min_size` (default R // 2) is the least shorter side accepted. Upscaling by up to 2×
  keeps a fine-tuning set of modest photos usable; beyond that the model would learn blur.
- 16-bit greyscale keeps its high byte (full range mapped to 0..255), not a clip at 255.

Examples carry a stable `index` (position in the source's deterministic order, counting
the skipped ones) and a `key` (a relative path or `file:row`), so an encoder can resume
(`iterate(start_index=...)` or `skip_keys=`) and each host of a multi-host job reads its own
share (`shard_index`, `num_shards`: index % num_shards == shard_index).

The encoded training format is the released one: parquet shards with columns `caption`
(str) and `encoding` (list of S ints, VQGAN codes in raster order); `read_encoded` and
`write_encoded` read and write it.

Why parquet/jsonl/csv are read with pyarrow / line by line rather than `datasets.load_dataset`:
non-streaming `load_dataset` first copies everything into an Arrow cache; streaming loses
which file a row came from (needed to resolve relative paths and for stable `file:row`
keys); and one malformed JSON line would abort the whole load instead of being counted.
`datasets` is used for `save_to_disk` directories, which are memory-mapped Arrow.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import io
import json
import logging
import os
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # matched case-insensitively
CAPTION_EXTENSION = ".txt"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
TABLE_EXTENSIONS = (".parquet", ".jsonl", ".csv")
# Auto-detected columns, first match wins (case-insensitive). "image" before the path-like
# names: HF datasets often carry both the bytes ("image") and the original "file_name".
IMAGE_COLUMNS = ("image", "img", "file_name", "image_path", "path", "filename")
CAPTION_COLUMNS = ("text", "caption", "prompt")
BACKGROUND = (255, 255, 255)  # behind transparent pixels; see the module docstring

# Skip reasons: the keys of `ImageCaptionDataset.skipped`. Checks run caption first (cheap),
# then image, and an example is counted under the first that fails.
MISSING_IMAGE = "missing_image"  # no such file, no image cell, or a .txt with no image
EMPTY_IMAGE = "empty_image"  # a 0-byte file or empty bytes
UNREADABLE_IMAGE = "unreadable_image"  # not an image, corrupt, truncated, undecodable
TOO_SMALL = "too_small"  # shorter side < min_size
TOO_LARGE = "too_large"  # over PIL's decompression-bomb limit (2 × Image.MAX_IMAGE_PIXELS)
MISSING_CAPTION = "missing_caption"  # no .txt, no metadata row, or a null caption cell
EMPTY_CAPTION = "empty_caption"  # caption is only whitespace
BAD_RECORD = "bad_record"  # a malformed metadata line, a cell of the wrong type
SKIP_REASONS = (MISSING_IMAGE, EMPTY_IMAGE, UNREADABLE_IMAGE, TOO_SMALL, TOO_LARGE,
                MISSING_CAPTION, EMPTY_CAPTION, BAD_RECORD)

_EXAMPLES_PER_REASON = 5  # offending keys kept per reason, to name them in the summary


class DatasetFormatError(ValueError):
    """The source cannot be read as a dataset (unknown format, missing column, ...)."""


class UnusableImageError(ValueError):
    """One image cannot be used; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Skip(Exception):
    """Internal: this example is skipped for `reason`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]


def load_image(
    source: ImageSource,
    resolution: int,
    *,
    min_size: int | None = None,
    background: tuple[int, int, int] = BACKGROUND,
) -> np.ndarray:
    """Reads one image as the model sees it: RGB, centre-cropped square, R × R.

    Args:
      source: a file path, the encoded file bytes, or an open PIL image.
      resolution: R, the side of the output.
      min_size: least accepted shorter side of the (unrotated) image in pixels; default
        R // 2, 0 accepts anything.
      background: RGB drawn behind transparent pixels.

    Returns:
      uint8 [R, R, 3].

    Raises:
      UnusableImageError: with `.reason` one of `SKIP_REASONS` (missing, empty, corrupt or
        truncated, too small, too large).
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if min_size is None:
        min_size = resolution // 2
    if isinstance(source, Image.Image):  # the caller's object: not drafted, not closed
        return _square_rgb(source, resolution, min_size, background, "<image>", draft=False)
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = "<bytes>"
        if len(source) == 0:
            raise UnusableImageError(EMPTY_IMAGE, f"{name}: empty")
        fp: Any = io.BytesIO(source)
    else:
        name = os.fspath(source)
        try:
            if os.stat(name).st_size == 0:
                raise UnusableImageError(EMPTY_IMAGE, f"{name}: empty file")
        except FileNotFoundError:
            raise UnusableImageError(MISSING_IMAGE, f"{name}: no such file") from None
        except OSError as e:
            raise UnusableImageError(UNREADABLE_IMAGE, f"{name}: {e}") from None
        fp = name
    try:
        with Image.open(fp) as img:
            return _square_rgb(img, resolution, min_size, background, name)
    except UnusableImageError:
        raise
    except Image.DecompressionBombError as e:
        raise UnusableImageError(TOO_LARGE, f"{name}: {e}") from None
    except Image.UnidentifiedImageError:
        raise UnusableImageError(UNREADABLE_IMAGE, f"{name}: not an image PIL can read") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001
        # PIL's decoders fail with OSError ("image file is truncated"), SyntaxError,
        # ValueError, struct.error, ... depending on the plugin: all mean "bad file".
        raise UnusableImageError(UNREADABLE_IMAGE, f"{name}: {type(e).__name__}: {e}") from None


def _square_rgb(img: Image.Image, resolution: int, min_size: int,
                background: tuple[int, int, int], name: str, draft: bool = True) -> np.ndarray:
    """PIL image → uint8 [R, R, 3]: size check, EXIF, RGB, centre crop, Lanczos.

    `draft`: the image is ours (freshly opened), so it may be decoded at reduced scale and
    rotated in place; a caller's image is left untouched.
    """
    w, h = img.size
    if min(w, h) < min_size:
        raise UnusableImageError(
            TOO_SMALL, f"{name}: {w}x{h} pixels, shorter side below min_size={min_size}")
    # JPEG only (a no-op elsewhere and on loaded images): let libjpeg decode at 1/2, 1/4 or
    # 1/8 scale while both sides stay >= 2R, before anything forces a full-size decode.
    if draft:  # our own file: may be changed in place
        img.draft(None, (2 * resolution, 2 * resolution))
        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is no rotation
    else:
        img = ImageOps.exif_transpose(img)
    img = _to_rgb(img, background)
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.resize((resolution, resolution), Image.Resampling.LANCZOS,
                     box=(left, top, left + side, top + side))
    return np.array(img, dtype=np.uint8)  # np.array copies: writable, owns its memory


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode → "RGB", compositing transparency onto `background`."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img)
        if mode == "F":  # float images: [0, 1] if they fit there, else 0..255
            a = a * 255.0 if a.size and a.max() <= 1.0 else a
        elif mode.startswith("I;16") or (a.size and a.max() > 255):
            # 16-bit data: keep the high byte (PIL's convert would clip at 255 instead).
            a = np.clip(a, 0, 65535).astype(np.uint32) >> 8
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))  # mode "L"
    elif mode in ("P", "PA"):
        img = img.convert("RGBA")  # the palette may carry transparency
    if "transparency" in img.info and img.mode in ("L", "RGB"):
        img = img.convert("RGBA")  # a tRNS colour key
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        img = canvas
    return img.convert("RGB")  # "1", "L", "CMYK", "YCbCr", ... and a no-op for "RGB"


# --------------------------------------------------------------------------------------
# Examples and the dataset object
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare arrays: ambiguous
class Example:
    """One usable image + caption pair.

    Attributes:
      index: position in the source's deterministic order, counting skipped examples;
        the same on every run, host and shard, so it can mark resume points.
      key: a readable id: the image's path relative to the folder, or "file:row".
      image: uint8 [R, R, 3].
      caption: the caption, stripped of surrounding whitespace.
    """

    index: int
    key: str
    image: np.ndarray
    caption: str


# A candidate example: its key, and a thunk giving (image ref, caption cell) or raising
# _Skip. The thunk is called only for the examples this shard keeps, in the main thread.
_ImageRef = Union[Path, bytes]
_Fetch = Callable[[], tuple[_ImageRef, Any]]


class ImageCaptionDataset:
    """Iterable of `Example`s read lazily from one source; see `open_dataset`.

    Counts are those of the latest iteration (each iteration starts them from zero):
    `skipped` (Counter of reason → count), `num_seen` (candidates of this shard looked at),
    `num_yielded`; `skipped_examples` keeps the first few (key, detail) per reason.
    """

    def __init__(self, source: "_Source", resolution: int, *, min_size: int | None = None,
                 shard_index: int = 0, num_shards: int = 1, num_workers: int = 0,
                 background: tuple[int, int, int] = BACKGROUND):
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ValueError(
                f"need 0 <= shard_index < num_shards, got shard_index={shard_index}, "
                f"num_shards={num_shards}")
        self._source = source
        self.resolution = resolution
        self.min_size = resolution // 2 if min_size is None else min_size
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.num_workers = num_workers
        self.background = background
        self._reset_counts()

    # ---- what was opened ------------------------------------------------------------
    @property
    def description(self) -> str:
        """Where the data comes from and in which format, in words."""
        return self._source.description

    @property
    def image_column(self) -> str | None:
        """The column read for images (None for a folder of image + .txt pairs)."""
        return self._source.image_column

    @property
    def caption_column(self) -> str | None:
        """The column read for captions (None for a folder of image + .txt pairs)."""
        return self._source.caption_column

    def __repr__(self) -> str:
        return (f"ImageCaptionDataset({self.description}, resolution={self.resolution}, "
                f"shard {self.shard_index}/{self.num_shards})")

    # ---- iteration ------------------------------------------------------------------
    def __iter__(self) -> Iterator[Example]:
        return self.iterate()

    def iterate(self, start_index: int = 0,
                skip_keys: Container[str] | None = None) -> Iterator[Example]:
        """Yields this shard's usable examples in source order.

        Args:
          start_index: examples with a smaller `index` are passed over unread (resume).
          skip_keys: examples whose `key` is in here are passed over unread (e.g. the keys
            already encoded).

        Yields:
          `Example`s with image uint8 [R, R, 3]. Skips are counted, and the summary is
          logged (warning level if anything was skipped) when the source is exhausted.
        """
        self._reset_counts()

        def wanted() -> Iterator[tuple[int, str, Any]]:
            for index, (key, fetch) in enumerate(self._source.candidates()):
                if index % self.num_shards != self.shard_index or index < start_index:
                    continue
                if skip_keys is not None and key in skip_keys:
                    continue
                try:
                    image_ref, caption = fetch()
                    caption = _clean_caption(caption)
                except _Skip as s:
                    yield index, key, s
                    continue
                yield index, key, (image_ref, caption)

        def decode(item: tuple[int, str, Any]) -> tuple[int, str, Any]:
            index, key, payload = item
            if isinstance(payload, _Skip):
                return item
            image_ref, caption = payload
            try:
                image = load_image(image_ref, self.resolution, min_size=self.min_size,
                                   background=self.background)
            except UnusableImageError as e:
                # The key names the example already; drop load_image's path prefix.
                name = os.fspath(image_ref) if isinstance(image_ref, Path) else "<bytes>"
                return index, key, _Skip(e.reason, str(e).removeprefix(f"{name}: "))
            return index, key, Example(index, key, image, caption)

        for index, key, result in _ordered_map(decode, wanted(), self.num_workers):
            self.num_seen += 1
            if isinstance(result, _Skip):
                self.skipped[result.reason] += 1
                kept = self.skipped_examples.setdefault(result.reason, [])
                if len(kept) < _EXAMPLES_PER_REASON:
                    kept.append((key, result.detail))
                continue
            self.num_yielded += 1
            yield result
        # Only after a full pass (not when the consumer stops early): a partial count
        # would read as the state of the whole dataset.
        logger.log(logging.WARNING if self.skipped else logging.INFO, "%s", self.summary())

    def _reset_counts(self) -> None:
        self.skipped: collections.Counter[str] = collections.Counter()
        self.skipped_examples: dict[str, list[tuple[str, str]]] = {}
        self.num_seen = 0
        self.num_yielded = 0

    def summary(self) -> str:
        """Counts of the latest iteration, one line per skip reason with examples."""
        shard = f", shard {self.shard_index}/{self.num_shards}" if self.num_shards > 1 else ""
        lines = [f"{self.description}{shard}: {self.num_seen} examples seen, "
                 f"{self.num_yielded} used, {sum(self.skipped.values())} skipped"]
        for reason in sorted(self.skipped, key=lambda r: (-self.skipped[r], r)):
            first_key, detail = self.skipped_examples[reason][0]
            lines.append(f"  {reason}: {self.skipped[reason]} (e.g. {first_key}: {detail})")
        return "\n".join(lines)


def _clean_caption(cell: Any) -> str:
    if cell is None:
        raise _Skip(MISSING_CAPTION, "no caption")
    if not isinstance(cell, str):
        raise _Skip(BAD_RECORD, f"caption is a {type(cell).__name__}, not text")
    caption = cell.strip()
    if not caption:
        raise _Skip(EMPTY_CAPTION, "caption is empty")
    try:  # text files are read with surrogateescape: a non-UTF-8 line must not end the run
        caption.encode("utf-8")
    except UnicodeEncodeError:
        raise _Skip(BAD_RECORD, "caption is not valid UTF-8") from None
    return caption


T = TypeVar("T")
U = TypeVar("U")


def _ordered_map(fn: Callable[[T], U], items: Iterable[T], num_workers: int) -> Iterator[U]:
    """`map(fn, items)`, on `num_workers` threads when > 0, in order, ≤ 2 × workers ahead.

    Threads suffice: PIL releases the GIL while decoding and resizing. The bounded
    look-ahead keeps memory flat, unlike `Executor.map`, which submits everything at once.
    """
    if num_workers <= 0:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(num_workers, thread_name_prefix="load_image")
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def batched(iterable: Iterable[T], batch_size: int, *,
            drop_last: bool = False) -> Iterator[list[T]]:
    """Groups items into lists of `batch_size`; the last one shorter unless `drop_last`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batch: list[T] = []
    for item in iterable:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch and not drop_last:
        yield batch


# --------------------------------------------------------------------------------------
# Opening a source
# --------------------------------------------------------------------------------------

_FORMATS_HELP = (
    "expected one of: a folder of images (.jpg/.jpeg/.png/.webp) each with a same-named "
    ".txt caption; an image folder with metadata.jsonl or metadata.csv (columns file_name, "
    "text); .parquet, .jsonl or .csv files (a file, a folder of them, or a glob); or a "
    "directory written by datasets' save_to_disk")


def open_dataset(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    resolution: int,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    min_size: int | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    split: str | None = None,
    num_workers: int = 0,
    background: tuple[int, int, int] = BACKGROUND,
) -> ImageCaptionDataset:
    """Opens image + caption data in any supported layout; nothing is decoded yet.

    The layout is told from `source`: a file by its extension; a glob or list by its
    files' extension; a folder, in this order, by a save_to_disk marker (`state.json`,
    `dataset_dict.json`), any `metadata.jsonl`/`metadata.csv`, any `.parquet`, any image,
    any `.jsonl`/`.csv`. Hidden files and folders (".name") are ignored. To pick another
    reading of a folder, pass a glob or the files themselves.

    Args:
      source: a folder, a file, a glob ("data/*.parquet", "**" allowed) or a list of files.
      resolution: R, the side of the square images yielded.
      image_column: column holding the image (HF Image dict, bytes, or a path relative to
        the file it is in); default the first of `IMAGE_COLUMNS` present.
      caption_column: column holding the caption; default the first of `CAPTION_COLUMNS`.
      min_size: least accepted shorter side in pixels; default R // 2, 0 accepts anything.
      shard_index: which share of the examples this reader yields, 0 ≤ shard_index <
        num_shards; a host of a multi-host job passes its process index.
      num_shards: number of shares; example `index` goes to share index % num_shards.
        Each share lists every candidate (and reads parquet row batches whole) but decodes
        only its own images.
      split: the split of a saved `DatasetDict`; default "train", or its only split.
      num_workers: threads decoding images ahead of the consumer; 0 decodes in the
        iterating thread.
      background: RGB drawn behind transparent pixels.

    Returns:
      An `ImageCaptionDataset`, iterable (repeatedly) over `Example`s.

    Raises:
      FileNotFoundError: `source` does not exist or the glob matches nothing.
      DatasetFormatError: the format cannot be told or read, or a column is missing.
    """
    src = _open_source(source, image_column, caption_column, split)
    return ImageCaptionDataset(src, resolution, min_size=min_size, shard_index=shard_index,
                               num_shards=num_shards, num_workers=num_workers,
                               background=background)


class _Source:
    """A deterministic sequence of candidate examples, `(key, fetch)`."""

    description: str
    image_column: str | None = None
    caption_column: str | None = None

    def candidates(self) -> Iterator[tuple[str, _Fetch]]:
        raise NotImplementedError


def _open_source(source, image_column, caption_column, split) -> _Source:
    if isinstance(source, (list, tuple)):
        files = [Path(f) for f in source]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: no such file (listed in source)")
        return _table_files(files, image_column, caption_column, f"{len(files)} files")
    text = os.fspath(source)
    if _is_glob(text):
        files = sorted(Path(f) for f in glob.glob(text, recursive=True) if Path(f).is_file())
        if not files:
            raise FileNotFoundError(f"no files match {text!r}; check the pattern")
        return _table_files(files, image_column, caption_column, text)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or folder; pass the folder holding the images, or a "
            f"data file ({_FORMATS_HELP})")
    if path.is_file():
        if path.name.lower() in METADATA_FILES:
            return _MetadataFolder(path.parent, [path.name], image_column, caption_column)
        return _table_files([path], image_column, caption_column, str(path))
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _SavedDataset(path, split, image_column, caption_column)
    files = _walk(path)
    metadata = [f for f in files if f.rsplit("/", 1)[-1].lower() in METADATA_FILES]
    if metadata:
        return _MetadataFolder(path, metadata, image_column, caption_column, files)
    parquet = [f for f in files if f.lower().endswith(".parquet")]
    if parquet:
        return _table_files([path / f for f in parquet], image_column, caption_column,
                            str(path))
    if any(_is_image(f) for f in files):
        if image_column or caption_column:
            raise DatasetFormatError(
                f"{path} is a folder of images with .txt captions, which has no columns; "
                "drop image_column/caption_column, or add a metadata.jsonl")
        return _PairsFolder(path, files)
    tables = [f for f in files if f.lower().endswith((".jsonl", ".csv"))]
    if tables:
        return _table_files([path / f for f in tables], image_column, caption_column,
                            str(path))
    raise DatasetFormatError(f"{path}: found no images or data files; {_FORMATS_HELP}")


def _walk(root: Path) -> list[str]:
    """Sorted relative POSIX paths of the non-hidden files under `root`.

    Symlinked folders are followed (datasets are often assembled from links), each real
    folder once, so a link loop ends. Hidden names are skipped: ".DS_Store", the "._x.jpg"
    AppleDouble files macOS leaves on shared drives (not images), ".ipynb_checkpoints".
    """
    out = []
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        # Sorted: when two links reach one folder, the same one wins on every machine.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        out.extend(prefix + f for f in filenames if not f.startswith("."))
    return sorted(out)


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


# ---- a folder of image + .txt pairs ------------------------------------------------------


class _PairsFolder(_Source):
    """`a/b.jpg` is captioned by `a/b.txt`. Keys are the image's relative path."""

    def __init__(self, root: Path, files: list[str]):
        self.root = root
        self.description = f"{root} (images + .txt captions)"
        self._captions = {_stem(f): f for f in files if f.lower().endswith(CAPTION_EXTENSION)}
        images = [f for f in files if _is_image(f)]
        if not self._captions:
            raise DatasetFormatError(
                f"{root} holds {len(images)} images but no .txt captions: put each caption "
                "in a .txt file named like its image (cat.jpg + cat.txt), or list them in a "
                "metadata.jsonl with columns file_name, text")
        with_image = {_stem(f) for f in images}
        # A .txt with no image beside it is counted (missing_image) rather than ignored: it
        # is usually an image in a format we do not read (.gif, .bmp), worth a mention.
        orphans = [f for s, f in self._captions.items() if s not in with_image]
        self._keys = sorted(images + orphans)

    def candidates(self) -> Iterator[tuple[str, _Fetch]]:
        for key in self._keys:
            yield key, (lambda key=key: self._fetch(key))

    def _fetch(self, key: str) -> tuple[_ImageRef, Any]:
        if not _is_image(key):
            raise _Skip(MISSING_IMAGE, f"no image named like it ({', '.join(IMAGE_EXTENSIONS)})")
        txt = self._captions.get(_stem(key))
        if txt is None:
            raise _Skip(MISSING_CAPTION, f"no {_stem(key)}{CAPTION_EXTENSION} beside it")
        return self.root / key, _read_text(self.root / txt)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _Skip(MISSING_CAPTION, f"cannot read {path.name}: {e}") from None
    # UTF-8 (a BOM tolerated); otherwise Windows-1252, the usual other encoding of
    # hand-written captions; Latin-1 decodes anything.
    for encoding in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")


# ---- tables: parquet / jsonl / csv ------------------------------------------------------


def _pick_column(columns: Sequence[str], given: str | None, candidates: Sequence[str],
                 what: str, arg: str, where: str) -> str:
    if given is not None:
        if given not in columns:
            raise DatasetFormatError(
                f"{where} has no column {given!r} for the {what} (columns: {list(columns)}); "
                f"pass {arg}= one of those")
        return given
    by_lower = {c.lower(): c for c in columns}
    for name in candidates:
        if name in by_lower:
            return by_lower[name]
    raise DatasetFormatError(
        f"cannot tell which column of {where} holds the {what} (columns: {list(columns)}, "
        f"looked for {list(candidates)}); pass {arg}=")


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in TABLE_EXTENSIONS:
        return suffix[1:]
    if suffix == ".json":
        return "jsonl"  # JSON Lines is what datasets' to_json writes under .json
    hint = ""
    if suffix in (".tar", ".zip", ".gz"):
        hint = " Unpack the archive and pass the folder."
    elif _is_image(path.name):
        hint = " Pass the folder holding the images instead of one image."
    raise DatasetFormatError(
        f"{path}: cannot read {suffix or 'extension-less'} files as a dataset; "
        f"{_FORMATS_HELP}.{hint}")


def _columns_of(path: Path, kind: str) -> list[str] | None:
    """The column names of one table file; None when a jsonl file has no rows."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as e:  # noqa: BLE001 — pyarrow raises ArrowInvalid, OSError, ...
            raise DatasetFormatError(f"{path}: not a readable parquet file ({e})") from None
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        if kind == "csv":
            return next(csv.reader(f), [])
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetFormatError(
                        f"{path}: first row is not JSON ({e}); expected one JSON object "
                        "per line") from None
                if not isinstance(row, dict):
                    raise DatasetFormatError(f"{path}: first row is not a JSON object")
                return list(row)
    return None


def _table_files(files: list[Path], image_column, caption_column, where) -> "_TableFiles":
    kinds = {_file_kind(f) for f in files}
    if len(kinds) > 1:
        raise DatasetFormatError(
            f"{where}: mixes {sorted(kinds)} files; pass one kind at a time")
    kind = kinds.pop()
    columns = None
    for f in files:
        cols = _columns_of(f, kind)
        if cols is None:
            continue
        if columns is None:
            columns = cols
            image_column = _pick_column(cols, image_column, IMAGE_COLUMNS, "images",
                                        "image_column", str(f))
            caption_column = _pick_column(cols, caption_column, CAPTION_COLUMNS,
                                          "captions", "caption_column", str(f))
        elif kind != "jsonl":  # jsonl rows may differ; a row missing a key is counted
            for col, what, arg in ((image_column, "images", "image_column"),
                                   (caption_column, "captions", "caption_column")):
                _pick_column(cols, col, (), what, arg, str(f))
    if columns is None:
        raise DatasetFormatError(f"{where}: all files are empty")
    return _TableFiles(files, kind, image_column, caption_column, where)


def _table_rows(path: Path, kind: str, columns: tuple[str, str]
                ) -> Iterator[Callable[[], dict]]:
    """Thunks giving each row of a table file as a dict; a bad row's thunk raises _Skip.

    Rows are read in small batches (parquet: only the two columns), and a row's values
    are converted to Python objects only when its thunk runs, i.e. for this shard's rows.
    """
    if kind == "parquet":
        import pyarrow.parquet as pq

        rows = 0
        with pq.ParquetFile(path) as pf:
            batches = pf.iter_batches(batch_size=64, columns=list(columns))
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                except Exception as e:  # noqa: BLE001 — a broken file, not a broken row
                    raise DatasetFormatError(
                        f"{path}: unreadable after row {rows} ({e}); re-create or remove "
                        "this file") from None
                for i in range(batch.num_rows):
                    yield lambda batch=batch, i=i: batch.slice(i, 1).to_pylist()[0]
                rows += batch.num_rows
    # surrogateescape: undecodable bytes survive as path names (as the OS spells them)
    # and are caught in captions by _clean_caption, instead of ending the iteration.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        if kind == "csv":
            reader = csv.DictReader(f)
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:  # e.g. a NUL byte; the reader goes on after it
                    yield lambda e=e: _raise(_Skip(BAD_RECORD, f"bad CSV line: {e}"))
                    continue
                yield lambda row=row: row
        for line in f:
            if line.strip():  # blank lines are not rows
                yield lambda line=line: _json_row(line)


def _json_row(line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Skip(BAD_RECORD, f"not JSON: {e}") from None
    if not isinstance(row, dict):
        raise _Skip(BAD_RECORD, f"a JSON {type(row).__name__}, not an object")
    return row


def _image_ref(cell: Any, base: Path, column: str) -> _ImageRef:
    """An image cell → bytes or a path (relative paths are relative to `base`)."""
    if isinstance(cell, dict):  # HF Image feature: bytes if embedded, else a path
        cell = cell.get("bytes") if cell.get("bytes") is not None else cell.get("path")
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        raise _Skip(MISSING_IMAGE, f"no image in column {column!r}")
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    if isinstance(cell, str):
        return base / cell  # an absolute `cell` replaces `base`
    raise _Skip(BAD_RECORD, f"column {column!r} holds a {type(cell).__name__}, "
                            "not image bytes or a path")


class _TableFiles(_Source):
    """Rows of parquet / jsonl / csv files in the given order. Keys are "file:row"."""

    def __init__(self, files: list[Path], kind: str, image_column: str, caption_column: str,
                 where: str):
        self.files = files
        self.kind = kind
        self.image_column = image_column
        self.caption_column = caption_column
        self.description = f"{where} ({kind}, image column {image_column!r}, " \
                           f"caption column {caption_column!r})"
        # Keys name files relative to their common folder: short, and stable if the data
        # moves as a whole.
        self._root = Path(os.path.commonpath([os.path.abspath(f.parent) for f in files]))

    def candidates(self) -> Iterator[tuple[str, _Fetch]]:
        for f in self.files:
            name = Path(os.path.relpath(os.path.abspath(f), self._root)).as_posix()
            for row_number, row in enumerate(
                    _table_rows(f, self.kind, (self.image_column, self.caption_column))):
                yield f"{name}:{row_number}", (lambda row=row, f=f: self._fetch(row, f.parent))

    def _fetch(self, row_thunk: Callable[[], dict], base: Path) -> tuple[_ImageRef, Any]:
        row = row_thunk()
        caption = row.get(self.caption_column)
        _clean_caption(caption)  # caption first: cheap, and names the first failing check
        return _image_ref(row.get(self.image_column), base, self.image_column), caption


# ---- an image folder with metadata -------------------------------------------------------


class _MetadataFolder(_Source):
    """HF imagefolder: metadata rows first (file by file, in order), then the images no
    row names, each counted as missing_caption. Keys are "metadata file:row" for rows and
    the image's relative path for the unnamed images.

    Every metadata row is read once up front (captions are text: small) to know which
    images are named; images are read only when iterated.
    """

    def __init__(self, root: Path, metadata: list[str], image_column, caption_column,
                 files: list[str] | None = None):
        self.root = root
        self._metadata = metadata
        self._files = files  # None: only the given metadata file, no unnamed-image pass
        for m in metadata:
            cols = _columns_of(root / m, _file_kind(root / m)) or []
            image_column = _pick_column(cols, image_column, IMAGE_COLUMNS, "image file names",
                                        "image_column", str(root / m))
            caption_column = _pick_column(cols, caption_column, CAPTION_COLUMNS, "captions",
                                          "caption_column", str(root / m))
        self.image_column = image_column
        self.caption_column = caption_column
        self.description = f"{root} (image folder with {', '.join(metadata)})"

    def candidates(self) -> Iterator[tuple[str, _Fetch]]:
        named: set[str] = set()
        for m in self._metadata:
            base = (self.root / m).parent
            for row_number, thunk in enumerate(
                    _table_rows(self.root / m, _file_kind(self.root / m),
                                (self.image_column, self.caption_column))):
                try:
                    row = thunk()
                except _Skip as s:
                    yield f"{m}:{row_number}", (lambda s=s: _raise(s))
                    continue
                caption = row.get(self.caption_column)
                try:
                    ref = _image_ref(row.get(self.image_column), base, self.image_column)
                except _Skip as s:  # checked after the caption, the order used everywhere
                    fetch = (lambda c=caption, s=s: _raise(s) if _clean_caption(c) else None)
                else:
                    if isinstance(ref, Path):  # named, even if the caption is bad
                        named.add(os.path.normpath(os.path.relpath(ref, self.root)))
                    fetch = (lambda ref=ref, c=caption: (ref, c))
                yield f"{m}:{row_number}", fetch
        if self._files is None:
            return
        for f in self._files:
            if _is_image(f) and os.path.normpath(f) not in named:
                yield f, (lambda: _raise(_Skip(MISSING_CAPTION, "not named in any metadata file")))


def _raise(e: Exception):
    raise e


# ---- a datasets save_to_disk directory ---------------------------------------------------


class _SavedDataset(_Source):
    """A `Dataset.save_to_disk` directory, memory-mapped. Keys are the row numbers."""

    def __init__(self, path: Path, split: str | None, image_column, caption_column):
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001
            raise DatasetFormatError(
                f"{path}: looks like a save_to_disk directory but datasets cannot load it "
                f"({type(e).__name__}: {e})") from None
        name = str(path)
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            if split is None:
                split = "train" if "train" in ds else (splits[0] if len(splits) == 1 else None)
            if split not in ds:
                raise DatasetFormatError(
                    f"{path} holds splits {splits}; pass split= one of them")
            ds = ds[split]
            name = f"{path} [{split}]"
        elif split is not None:
            raise DatasetFormatError(f"{path} is a single Dataset, with no split {split!r}")
        cols = ds.column_names
        self.image_column = _pick_column(cols, image_column, IMAGE_COLUMNS, "images",
                                         "image_column", name)
        self.caption_column = _pick_column(cols, caption_column, CAPTION_COLUMNS, "captions",
                                           "caption_column", name)
        self.root = path
        # Arrow format: rows come out as raw cells (an Image feature as its {"bytes","path"}
        # struct), never decoded by datasets, so our loader sees every broken image.
        self._ds = ds.select_columns([self.image_column, self.caption_column]) \
                     .with_format("arrow")
        self.description = (f"{name} (saved datasets.Dataset, {len(ds)} rows, image column "
                            f"{self.image_column!r}, caption column {self.caption_column!r})")

    def candidates(self) -> Iterator[tuple[str, _Fetch]]:
        n, step = len(self._ds), 256
        for start in range(0, n, step):
            table = self._ds[start:min(start + step, n)]  # pa.Table, zero-copy from the mmap
            for i in range(table.num_rows):
                yield str(start + i), (lambda table=table, i=i: self._fetch(table, i))

    def _fetch(self, table, i: int) -> tuple[_ImageRef, Any]:
        row = table.slice(i, 1).to_pylist()[0]
        caption = row[self.caption_column]
        _clean_caption(caption)
        return _image_ref(row[self.image_column], self.root, self.image_column), caption


# --------------------------------------------------------------------------------------
# Encoded shards: parquet of (caption, encoding)
# --------------------------------------------------------------------------------------


def _parquet_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(source, (list, tuple)):
        files = [Path(f) for f in source]
    else:
        text = os.fspath(source)
        if _is_glob(text):
            files = sorted(Path(f) for f in glob.glob(text, recursive=True))
        elif Path(text).is_dir():
            files = [Path(text) / f for f in _walk(Path(text)) if f.endswith(".parquet")]
        else:
            files = [Path(text)]
    if not files:
        raise FileNotFoundError(f"no parquet files in / matching {os.fspath(source)!r}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no such file")
    return files


def read_encoded(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    caption_column: str = "caption",
    encoding_column: str = "encoding",
) -> tuple[list[str], np.ndarray]:
    """Reads encoded parquet shards (the released training format) into memory.

    Args:
      source: a parquet file, a folder (all `*.parquet` below it, sorted), a glob, or a
        list of files (in the given order).
      caption_column: the caption column (str). A null caption reads as "".
      encoding_column: the VQGAN codes column (list of S ints, raster order).

    Returns:
      (captions, encodings): N strings, and int32 [N, S], rows in file order.

    Raises:
      FileNotFoundError: no file found.
      DatasetFormatError: a column is missing or not of the right type, an encoding is
        null, or encodings differ in length.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    captions: list[str] = []
    parts: list[np.ndarray] = []
    length = None
    for f in _parquet_files(source):
        names = pq.read_schema(f).names
        for col in (caption_column, encoding_column):
            if col not in names:
                raise DatasetFormatError(
                    f"{f}: no column {col!r} (columns: {names}); encoded shards hold "
                    "caption and encoding, or pass caption_column=/encoding_column=")
        table = pq.read_table(f, columns=[caption_column, encoding_column])
        if table.num_rows == 0:
            continue
        col = table.column(encoding_column).combine_chunks()
        if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
                or pa.types.is_fixed_size_list(col.type)) \
                or not pa.types.is_integer(col.type.value_type):
            raise DatasetFormatError(
                f"{f}: column {encoding_column!r} is {col.type}, expected a list of ints")
        if col.null_count:
            raise DatasetFormatError(f"{f}: {col.null_count} null encodings")
        lengths = np.unique(col.value_lengths().to_numpy(zero_copy_only=False))
        if len(lengths) != 1 or (length is not None and lengths[0] != length):
            seen = sorted({*lengths.tolist(), *([length] if length is not None else [])})
            raise DatasetFormatError(f"{f}: encodings of different lengths {seen}")
        length = int(lengths[0])
        values = col.flatten().to_numpy(zero_copy_only=False)  # respects offsets
        if values.size and (values.min() < 0 or values.max() > np.iinfo(np.int32).max):
            raise DatasetFormatError(f"{f}: codes outside 0..2^31-1")
        parts.append(values.astype(np.int32).reshape(table.num_rows, length))
        captions.extend("" if c is None else c
                        for c in table.column(caption_column).to_pylist())
    if not parts:
        raise DatasetFormatError(f"{source}: the encoded shards hold no rows")
    return captions, np.concatenate(parts)


def write_encoded(path: str | os.PathLike, captions: Sequence[str],
                  encodings: np.ndarray) -> None:
    """Writes one encoded shard: parquet with `caption` (str), `encoding` (list of int64).

    int64 lists are what pandas writes for lists of Python ints, as the released encoding
    notebook does. The file appears atomically (written beside, then renamed), so a
    resumed encoder never mistakes a half-written shard for a finished one.

    Args:
      path: the parquet file to write.
      captions: N strings.
      encodings: int [N, S] VQGAN codes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    encodings = np.asarray(encodings)
    if encodings.ndim != 2 or len(encodings) != len(captions):
        raise ValueError(f"need encodings [N, S] with N = {len(captions)} captions, "
                         f"got shape {encodings.shape}")
    if not np.issubdtype(encodings.dtype, np.integer):
        raise ValueError(f"encodings must be integers, got {encodings.dtype}")
    n, s = encodings.shape
    if n * s >= 2**31:
        raise ValueError(f"{n} x {s} codes overflow a parquet list column; write smaller shards")
    offsets = pa.array(np.arange(0, n * s + 1, s, dtype=np.int32) if n else [0], pa.int32())
    enc = pa.ListArray.from_arrays(offsets, pa.array(encodings.reshape(-1).astype(np.int64)))
    table = pa.table({"caption": pa.array(list(captions), pa.string()), "encoding": enc})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
