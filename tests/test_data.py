"""Dataset readers: every format, every kind of broken input, exact skip counts."""

import collections
import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dalle_mini_jax import data
from dalle_mini_jax.data import (
    DatasetFormatError,
    UnusableImageError,
    batched,
    load_image,
    open_dataset,
    read_encoded,
    write_encoded,
)

R = 32  # model resolution in these tests; min_size defaults to R // 2 = 16
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# ---- helpers --------------------------------------------------------------------------


def save(path, size=(40, 40), color=RED, mode="RGB", fmt=None, **kw):
    """Writes a solid image, creating folders; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt, **kw)
    return path


def encoded(size=(40, 40), color=RED, fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def close(pixel, color, tol=12):
    return np.all(np.abs(np.asarray(pixel, int) - np.asarray(color, int)) <= tol)


def hf_image_struct(items):
    """A pyarrow column like datasets' Image feature: struct<bytes, path>."""
    return pa.array(items, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


# ---- load_image: geometry -------------------------------------------------------------


@pytest.mark.parametrize("size", [(300, 100), (100, 300), (37, 53), (32, 32), (1000, 999)])
def test_load_image_shape_and_dtype(tmp_path, size):
    img = load_image(save(tmp_path / "a.png", size), R)
    assert img.shape == (R, R, 3) and img.dtype == np.uint8
    assert img.flags.writeable


@pytest.mark.parametrize("wide", [True, False])
def test_centre_crop_keeps_the_middle(tmp_path, wide):
    # Three bands across the long side: only the middle (green) one survives the crop.
    band = 100
    im = Image.new("RGB", (3 * band, band) if wide else (band, 3 * band))
    for i, color in enumerate((RED, GREEN, BLUE)):
        box = (i * band, 0, (i + 1) * band, band) if wide else (0, i * band, band, (i + 1) * band)
        im.paste(color, box)
    im.save(tmp_path / "bands.png")
    out = load_image(tmp_path / "bands.png", R)
    assert close(out[2:-2, 2:-2].reshape(-1, 3).min(0), GREEN, 10)
    assert close(out[2:-2, 2:-2].reshape(-1, 3).max(0), GREEN, 10)


def test_large_jpeg_uses_reduced_decode_and_keeps_content(tmp_path):
    # A 2000x1000 JPEG (libjpeg draft path) must still centre-crop the right region.
    im = Image.new("RGB", (2000, 1000), RED)
    im.paste(BLUE, (500, 0, 1500, 1000))  # exactly the centred square
    im.save(tmp_path / "big.jpg", quality=95)
    out = load_image(tmp_path / "big.jpg", R)
    assert close(out[1:-1, 1:-1].reshape(-1, 3).mean(0), BLUE, 8)


@pytest.mark.parametrize("size", [(80, 40), (1600, 800)])  # 1600: libjpeg draft decode
def test_exif_orientation_is_applied(tmp_path, size):
    # Stored wide: left half red, right half blue. Orientation 6 = rotate 90° clockwise to
    # display: tall, red on top. The centred square then is red above blue.
    w, h = size
    im = Image.new("RGB", size, RED)
    im.paste(BLUE, (w // 2, 0, w, h))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg", R)
    assert close(out[4, R // 2], RED, 30) and close(out[R - 5, R // 2], BLUE, 30)
    # Without the tag the same pixels give left/right instead.
    im.save(tmp_path / "plain.jpg", quality=95)
    out = load_image(tmp_path / "plain.jpg", R)
    assert close(out[R // 2, 4], RED, 30) and close(out[R // 2, R - 5], BLUE, 30)


# ---- load_image: colour modes ---------------------------------------------------------


def test_rgba_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # fully transparent black
    im.paste((255, 0, 0, 128), (0, 0, 20, 40))  # left half: half-opaque red
    im.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", R)
    assert close(out[R // 2, R - 3], (255, 255, 255), 1)  # transparent → background
    assert close(out[R // 2, 3], (255, 127, 127), 2)  # red over white at alpha 1/2
    black = load_image(tmp_path / "a.png", R, background=(0, 0, 0))
    assert close(black[R // 2, R - 3], (0, 0, 0), 1)


def test_la_palette_and_transparency_modes(tmp_path):
    Image.new("LA", (40, 40), (0, 0)).save(tmp_path / "la.png")
    assert close(load_image(tmp_path / "la.png", R)[5, 5], (255, 255, 255), 1)

    pal = Image.new("P", (40, 40), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 40, 20))  # top half index 1 = green, bottom index 0
    pal.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png", R)
    assert close(out[3, 3], GREEN, 1) and close(out[R - 3, 3], (0, 0, 0), 1)
    pal.save(tmp_path / "pt.png", transparency=0)  # index 0 transparent
    out = load_image(tmp_path / "pt.png", R)
    assert close(out[3, 3], GREEN, 1) and close(out[R - 3, 3], (255, 255, 255), 1)

    Image.new("RGB", (40, 40), BLUE).save(tmp_path / "trns.png", transparency=BLUE)
    assert close(load_image(tmp_path / "trns.png", R)[5, 5], (255, 255, 255), 1)


def test_greyscale_binary_cmyk(tmp_path):
    out = load_image(save(tmp_path / "l.png", mode="L", color=77), R)
    assert np.all(out == 77)
    out = load_image(save(tmp_path / "b.png", mode="1", color=1), R)
    assert np.all(out == 255)
    out = load_image(save(tmp_path / "c.jpg", mode="CMYK", color=(0, 255, 255, 0)), R)
    assert close(out[R // 2, R // 2], RED, 10)


def test_16_bit_greyscale_keeps_the_range(tmp_path):
    a = np.full((40, 40), 65535, np.uint16)
    a[:, 20:] = 32768
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    out = load_image(tmp_path / "g16.png", R)
    assert np.all(out[:, :12] == 255) and np.all(out[:, -12:] == 128)
    # 32-bit "I" holding 16-bit values is scaled the same way.
    out = load_image(Image.fromarray(a.astype(np.int32)), R)
    assert np.all(out[:, :12] == 255)


def test_bytes_and_pil_inputs(tmp_path):
    assert close(load_image(encoded(color=GREEN), R)[0, 0], GREEN, 1)
    assert close(load_image(bytearray(encoded(color=GREEN, fmt="WEBP")), R)[5, 5], GREEN, 8)
    assert close(load_image(Image.new("RGB", (50, 40), BLUE), R)[0, 0], BLUE, 1)


# ---- load_image: broken inputs --------------------------------------------------------


def reason_of(source, **kw):
    with pytest.raises(UnusableImageError) as e:
        load_image(source, R, **kw)
    return e.value.reason


def test_broken_images_have_reasons(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "noise.jpg").write_bytes(rng.integers(0, 256, 5000, np.uint8).tobytes())
    (tmp_path / "empty.png").write_bytes(b"")
    save(tmp_path / "full.jpg", (200, 200), quality=95)
    full = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(full[: len(full) // 2])
    assert reason_of(tmp_path / "noise.jpg") == data.UNREADABLE_IMAGE
    assert reason_of(tmp_path / "empty.png") == data.EMPTY_IMAGE
    assert reason_of(b"") == data.EMPTY_IMAGE
    assert reason_of(tmp_path / "trunc.jpg") == data.UNREADABLE_IMAGE
    assert reason_of(tmp_path / "nope.png") == data.MISSING_IMAGE
    assert reason_of(tmp_path) == data.UNREADABLE_IMAGE  # a folder, not a file
    assert reason_of(save(tmp_path / "tiny.png", (15, 100))) == data.TOO_SMALL
    assert reason_of(encoded((40, 40)), min_size=41) == data.TOO_SMALL


def test_undersized_image_accepted_with_min_size_zero(tmp_path):
    out = load_image(save(tmp_path / "tiny.png", (3, 5), GREEN), R, min_size=0)
    assert out.shape == (R, R, 3) and close(out[0, 0], GREEN, 1)


def test_decompression_bomb_is_too_large(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # errors above 2x = 200 pixels
    assert reason_of(encoded((40, 40))) == data.TOO_LARGE


# ---- folder of image + .txt pairs -----------------------------------------------------


def make_pairs_folder(root):
    """10 candidates: 4 good (one nested two deep, one .JPEG), 6 broken in 6 ways."""
    save(root / "a.jpg", color=RED)
    write_text(root / "a.txt", "a red square\n")
    save(root / "sub" / "b.png", color=GREEN)
    write_text(root / "sub" / "b.txt", "  a green square ")
    save(root / "sub" / "deep" / "c.webp", color=BLUE)
    write_text(root / "sub" / "deep" / "c.txt", "a blue square")
    save(root / "k.JPEG", color=RED)
    (root / "k.txt").write_bytes("caf\xe9".encode("cp1252"))  # not UTF-8
    save(root / "no_caption.png")  # missing_caption
    write_text(root / "orphan.txt", "no image")  # missing_image
    (root / "corrupt.jpg").write_bytes(b"\x00\x01 not a jpeg" * 100)  # unreadable_image
    write_text(root / "corrupt.txt", "corrupt")
    (root / "empty.png").write_bytes(b"")  # empty_image
    write_text(root / "empty.txt", "empty")
    save(root / "tiny.png", (8, 8))  # too_small
    write_text(root / "tiny.txt", "tiny")
    save(root / "blank.png")  # empty_caption
    write_text(root / "blank.txt", " \n\t")
    # Hidden files and folders are not candidates at all.
    (root / "._a.jpg").write_bytes(b"AppleDouble junk")
    save(root / ".cache" / "x.png")
    write_text(root / ".cache" / "x.txt", "hidden")


PAIRS_SKIPS = {
    data.MISSING_CAPTION: 1, data.MISSING_IMAGE: 1, data.UNREADABLE_IMAGE: 1,
    data.EMPTY_IMAGE: 1, data.TOO_SMALL: 1, data.EMPTY_CAPTION: 1,
}


def test_pairs_folder(tmp_path, caplog):
    make_pairs_folder(tmp_path)
    ds = open_dataset(tmp_path, R)
    with caplog.at_level(logging.INFO, logger="dalle_mini_jax.data"):
        examples = list(ds)
    assert [e.key for e in examples] == ["a.jpg", "k.JPEG", "sub/b.png", "sub/deep/c.webp"]
    assert [e.caption for e in examples] == ["a red square", "café", "a green square",
                                             "a blue square"]
    assert [e.index for e in examples] == [0, 4, 7, 8]  # positions among all 10 candidates
    assert close(examples[2].image[5, 5], GREEN, 1) and close(examples[3].image[5, 5], BLUE, 8)
    assert dict(ds.skipped) == PAIRS_SKIPS
    assert (ds.num_seen, ds.num_yielded) == (10, 4)
    summary = ds.summary()
    assert "10 examples seen, 4 used, 6 skipped" in summary
    assert "missing_caption: 1 (e.g. no_caption.png" in summary
    assert "missing_image: 1 (e.g. orphan.txt" in summary
    assert summary in caplog.text and caplog.records[-1].levelno == logging.WARNING
    # A second pass counts afresh rather than adding up.
    assert len(list(ds)) == 4 and dict(ds.skipped) == PAIRS_SKIPS


def test_clean_folder_logs_info(tmp_path, caplog):
    save(tmp_path / "a.png")
    write_text(tmp_path / "a.txt", "x")
    with caplog.at_level(logging.INFO, logger="dalle_mini_jax.data"):
        assert len(list(open_dataset(tmp_path, R))) == 1
    assert caplog.records[-1].levelno == logging.INFO
    assert "1 examples seen, 1 used, 0 skipped" in caplog.text


def test_sharding_resume_and_workers(tmp_path):
    make_pairs_folder(tmp_path)
    full = [(e.index, e.key) for e in open_dataset(tmp_path, R)]
    shards = [open_dataset(tmp_path, R, shard_index=i, num_shards=3) for i in range(3)]
    parts = [[(e.index, e.key) for e in s] for s in shards]
    assert sorted(sum(parts, [])) == full
    for i, part in enumerate(parts):
        assert all(index % 3 == i for index, _ in part)
    assert sum(s.num_seen for s in shards) == 10
    assert sum((s.skipped for s in shards), collections.Counter()) == PAIRS_SKIPS
    assert "shard 1/3" in shards[1].summary()

    ds = open_dataset(tmp_path, R)
    assert [e.key for e in ds.iterate(start_index=6)] == ["sub/b.png", "sub/deep/c.webp"]
    assert ds.num_seen == 4
    assert [e.key for e in ds.iterate(skip_keys={"a.jpg", "sub/b.png"})] == [
        "k.JPEG", "sub/deep/c.webp"]

    threaded = list(open_dataset(tmp_path, R, num_workers=2))
    plain = list(open_dataset(tmp_path, R))
    assert [e.key for e in threaded] == [e.key for e in plain]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(threaded, plain))


def test_early_stop_does_not_log(tmp_path, caplog):
    make_pairs_folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="dalle_mini_jax.data"):
        it = iter(open_dataset(tmp_path, R, num_workers=2))
        next(it)
        it.close()
    assert "examples seen" not in caplog.text


def test_symlinked_folders_are_followed_once(tmp_path):
    save(tmp_path / "real" / "a.png")
    write_text(tmp_path / "real" / "a.txt", "a")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "loop").symlink_to(tmp_path)  # a cycle must end
    ds = open_dataset(tmp_path, R)
    assert [e.key for e in ds] == ["link/a.png"] and not ds.skipped  # first in walk order


def test_images_without_any_captions_is_an_error(tmp_path):
    save(tmp_path / "a.png")
    with pytest.raises(DatasetFormatError, match="no .txt captions"):
        open_dataset(tmp_path, R)


# ---- image folder with metadata -------------------------------------------------------


def test_metadata_jsonl_and_nested_csv(tmp_path):
    save(tmp_path / "a.png", color=RED)
    save(tmp_path / "sub" / "b.png", color=GREEN)
    save(tmp_path / "c.png")
    save(tmp_path / "unlisted.png")  # missing_caption: no row names it
    (tmp_path / "bad.png").write_bytes(b"junk")
    rows = [
        {"file_name": "a.png", "text": "red"},
        {"file_name": "sub/b.png", "text": "green"},
        {"file_name": "gone.png", "text": "x"},  # missing_image
        {"file_name": "c.png", "text": ""},  # empty_caption
        {"file_name": "a.png"},  # missing_caption (same image, no text)
        {"file_name": "bad.png", "text": "bad"},  # unreadable_image
        {"file_name": "a.png", "text": 7},  # bad_record: caption not text
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "{not json")  # bad_record
    lines.insert(3, "")  # blank lines are not rows
    write_text(tmp_path / "metadata.jsonl", "\n".join(lines) + "\n")
    # A nested metadata.csv, names relative to its own folder.
    save(tmp_path / "more" / "d.png", color=BLUE)
    write_text(tmp_path / "more" / "metadata.csv",
               'file_name,text\nd.png,"blue, with a comma"\n')

    ds = open_dataset(tmp_path, R)
    assert (ds.image_column, ds.caption_column) == ("file_name", "text")
    ex = list(ds)
    assert [(e.key, e.caption) for e in ex] == [
        ("metadata.jsonl:0", "red"), ("metadata.jsonl:1", "green"),
        ("more/metadata.csv:0", "blue, with a comma")]
    assert close(ex[2].image[3, 3], BLUE, 1)
    assert dict(ds.skipped) == {
        data.MISSING_IMAGE: 1, data.EMPTY_CAPTION: 1, data.MISSING_CAPTION: 2,
        data.UNREADABLE_IMAGE: 1, data.BAD_RECORD: 2}
    assert ds.num_seen == 10
    assert ds.skipped_examples[data.MISSING_CAPTION][-1][0] == "unlisted.png"


def test_metadata_custom_columns(tmp_path):
    save(tmp_path / "a.png")
    write_text(tmp_path / "metadata.csv", "picture,description,text\na.png,mine,other\n")
    with pytest.raises(DatasetFormatError, match="image_column"):
        open_dataset(tmp_path, R)
    ds = open_dataset(tmp_path, R, image_column="picture", caption_column="description")
    assert [e.caption for e in ds] == ["mine"]
    with pytest.raises(DatasetFormatError, match="no column 'nope'"):
        open_dataset(tmp_path, R, image_column="picture", caption_column="nope")


def test_metadata_file_given_directly(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "unlisted.png")
    write_text(tmp_path / "metadata.jsonl", json.dumps({"file_name": "a.png", "text": "t"}))
    ds = open_dataset(tmp_path / "metadata.jsonl", R)
    assert [e.caption for e in ds] == ["t"] and not ds.skipped


def test_metadata_bad_encoding_and_oversized_csv_field(tmp_path):
    for name in "abc":
        save(tmp_path / f"{name}.png")
    (tmp_path / "metadata.csv").write_bytes(
        b"file_name,text\na.png,caf\xe9\n"  # Latin-1, not UTF-8: bad_record
        + b"b.png," + b"x" * 200_000 + b"\n"  # over csv's field limit: bad_record
        + b"c.png,fine\n")
    ds = open_dataset(tmp_path, R)
    assert [(e.key, e.caption) for e in ds] == [("metadata.csv:2", "fine")]
    # b.png is named only by the unreadable line, so it is also an unlisted image.
    assert dict(ds.skipped) == {data.BAD_RECORD: 2, data.MISSING_CAPTION: 1}


# ---- parquet / jsonl / csv ------------------------------------------------------------


def test_parquet_with_hf_image_dicts_raw_bytes_and_paths(tmp_path):
    save(tmp_path / "imgs" / "p.png", color=BLUE)
    struct = hf_image_struct([
        {"bytes": encoded(color=RED), "path": "r.png"},
        {"bytes": None, "path": "imgs/p.png"},  # path only: relative to the parquet file
        {"bytes": b"", "path": None},  # empty_image
        None,  # missing_image
        {"bytes": encoded(color=GREEN), "path": None},
    ])
    pq.write_table(pa.table({"image": struct,
                             "text": ["red", "blue", "e", "m", None]}),  # last: missing_caption
                   tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"image": hf_image_struct([{"bytes": b"junk", "path": None}]),
                             "text": ["junk"]}), tmp_path / "part-1.parquet")
    ds = open_dataset(tmp_path / "*.parquet", R)
    ex = list(ds)
    assert [(e.key, e.caption) for e in ex] == [("part-0.parquet:0", "red"),
                                                ("part-0.parquet:1", "blue")]
    assert close(ex[0].image[0, 0], RED, 1) and close(ex[1].image[0, 0], BLUE, 1)
    assert dict(ds.skipped) == {data.EMPTY_IMAGE: 1, data.MISSING_IMAGE: 1,
                                data.MISSING_CAPTION: 1, data.UNREADABLE_IMAGE: 1}
    # The folder reads the same files.
    assert [e.key for e in open_dataset(tmp_path, R)] == [e.key for e in ex]


def test_parquet_raw_bytes_custom_columns_and_shards(tmp_path):
    n = 7
    table = pa.table({"jpg": pa.array([encoded(color=(i * 30, 0, 0), fmt="JPEG")
                                       for i in range(n)], pa.binary()),
                      "TEXT": [f"cap {i}" for i in range(n)],
                      "other": list(range(n))})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=3)
    with pytest.raises(DatasetFormatError, match="cannot tell which column"):
        open_dataset(tmp_path / "x.parquet", R)
    ds = open_dataset(tmp_path / "x.parquet", R, image_column="jpg")
    assert ds.caption_column == "TEXT"  # auto-detection ignores case
    assert [e.caption for e in ds] == [f"cap {i}" for i in range(n)]
    odd = open_dataset(tmp_path / "x.parquet", R, image_column="jpg", shard_index=1,
                       num_shards=2)
    assert [e.index for e in odd] == [1, 3, 5] and odd.num_seen == 3


def test_jsonl_and_csv_with_paths(tmp_path):
    save(tmp_path / "imgs" / "a.png", color=RED)
    abs_img = save(tmp_path / "elsewhere" / "b.png", color=GREEN)
    lines = [json.dumps({"img": "imgs/a.png", "caption": "rel"}),
             json.dumps({"img": str(abs_img), "caption": "abs"}),
             "[1, 2]",  # bad_record
             json.dumps({"img": 5, "caption": "x"}),  # bad_record
             json.dumps({"img": "imgs/none.png", "caption": "x"})]  # missing_image
    write_text(tmp_path / "data" / "train.jsonl", "\n".join(lines))
    # Paths are relative to the jsonl file's folder.
    (tmp_path / "data" / "imgs").symlink_to(tmp_path / "imgs")
    ds = open_dataset(tmp_path / "data" / "train.jsonl", R)
    assert [(e.key, e.caption) for e in ds] == [("train.jsonl:0", "rel"),
                                                ("train.jsonl:1", "abs")]
    assert dict(ds.skipped) == {data.BAD_RECORD: 2, data.MISSING_IMAGE: 1}

    write_text(tmp_path / "c" / "list.csv", f"path,prompt\n{abs_img},hello\n,empty\n")
    ds = open_dataset(tmp_path / "c" / "list.csv", R)
    assert [e.caption for e in ds] == ["hello"]
    assert dict(ds.skipped) == {data.MISSING_IMAGE: 1}


# ---- datasets save_to_disk ------------------------------------------------------------


def test_saved_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": encoded(color=RED), "path": None},
                   {"bytes": b"not an image", "path": None},
                   {"bytes": encoded((8, 8)), "path": None},
                   {"bytes": encoded(color=GREEN), "path": None}],
         "text": ["red", "corrupt", "tiny", " "]},
        features=feats)
    ds.save_to_disk(str(tmp_path / "saved"))
    out = open_dataset(tmp_path / "saved", R)
    ex = list(out)
    assert [(e.key, e.caption) for e in ex] == [("0", "red")]
    assert close(ex[0].image[0, 0], RED, 1)
    assert dict(out.skipped) == {data.UNREADABLE_IMAGE: 1, data.TOO_SMALL: 1,
                                 data.EMPTY_CAPTION: 1}

    def raw(caption):  # raw bytes in a plain binary column
        return datasets.Dataset.from_dict({"png": [encoded(color=BLUE)], "prompt": [caption]})

    datasets.DatasetDict({"train": raw("train"), "test": raw("test")}).save_to_disk(
        str(tmp_path / "dict"))
    for split, caption in ((None, "train"), ("test", "test")):
        got = open_dataset(tmp_path / "dict", R, image_column="png", split=split)
        assert [e.caption for e in got] == [caption]
    with pytest.raises(DatasetFormatError, match="splits"):
        open_dataset(tmp_path / "dict", R, image_column="png", split="validation")


# ---- errors at open -------------------------------------------------------------------


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        open_dataset(tmp_path / "missing", R)
    with pytest.raises(FileNotFoundError, match="no files match"):
        open_dataset(tmp_path / "*.parquet", R)
    (tmp_path / "data.tar").write_bytes(b"x")
    with pytest.raises(DatasetFormatError, match="Unpack the archive"):
        open_dataset(tmp_path / "data.tar", R)
    with pytest.raises(DatasetFormatError, match="one image"):
        open_dataset(save(tmp_path / "one.png"), R)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="found no images or data files"):
        open_dataset(tmp_path / "empty", R)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetFormatError, match="not a readable parquet"):
        open_dataset(tmp_path / "bad.parquet", R)
    save(tmp_path / "pairs" / "one.png")
    write_text(tmp_path / "pairs" / "one.txt", "caption")
    with pytest.raises(ValueError, match="shard_index"):
        open_dataset(tmp_path / "pairs", R, shard_index=2, num_shards=2)
    with pytest.raises(DatasetFormatError, match="has no columns"):
        open_dataset(tmp_path / "pairs", R, caption_column="text")


# ---- encoded shards -------------------------------------------------------------------


def test_read_encoded(tmp_path):
    rng = np.random.default_rng(0)
    enc = rng.integers(0, 16384, (5, 16))
    (tmp_path / "enc").mkdir()
    write_encoded(tmp_path / "enc" / "000.parquet", ["a", "b", "c"], enc[:3])
    # The released format written by hand: pandas-style list<int64>.
    pq.write_table(pa.table({"caption": ["d", None],
                             "encoding": pa.array(enc[3:].tolist(), pa.list_(pa.int64())),
                             "clip_score": [0.3, 0.2]}),
                   tmp_path / "enc" / "001.parquet")
    for source in (tmp_path / "enc", str(tmp_path / "enc" / "*.parquet"),
                   [tmp_path / "enc" / "000.parquet", tmp_path / "enc" / "001.parquet"]):
        captions, codes = read_encoded(source)
        assert captions == ["a", "b", "c", "d", ""]
        assert codes.dtype == np.int32 and codes.shape == (5, 16)
        np.testing.assert_array_equal(codes, enc)
    assert not list((tmp_path / "enc").glob(".*"))  # no temporary file left behind


def test_read_encoded_errors(tmp_path):
    def write(name, **cols):
        pq.write_table(pa.table(cols), tmp_path / name)
        return tmp_path / name

    f = write("a.parquet", caption=["x"], codes=pa.array([[1, 2]]))
    with pytest.raises(DatasetFormatError, match="no column 'encoding'"):
        read_encoded(f)
    assert read_encoded(f, encoding_column="codes")[1].tolist() == [[1, 2]]
    with pytest.raises(DatasetFormatError, match="different lengths"):
        read_encoded(write("b.parquet", caption=["x", "y"], encoding=pa.array([[1, 2], [3]])))
    with pytest.raises(DatasetFormatError, match="null"):
        read_encoded(write("c.parquet", caption=["x", "y"],
                           encoding=pa.array([[1, 2], None])))
    with pytest.raises(DatasetFormatError, match="list of ints"):
        read_encoded(write("d.parquet", caption=["x"], encoding=pa.array([[0.5]])))
    with pytest.raises(DatasetFormatError, match="no rows"):
        read_encoded(write("e.parquet", caption=pa.array([], pa.string()),
                           encoding=pa.array([], pa.list_(pa.int64()))))
    fixed = write("f.parquet", caption=["x", "y"],
                  encoding=pa.array([[1, 2], [3, 4]], pa.list_(pa.int64(), 2)))
    assert read_encoded(fixed)[1].tolist() == [[1, 2], [3, 4]]
    with pytest.raises(DatasetFormatError, match="different lengths"):  # 2 vs 3 across files
        read_encoded([fixed, write("g.parquet", caption=["z"], encoding=pa.array([[1, 2, 3]]))])
    with pytest.raises(FileNotFoundError):
        read_encoded(tmp_path / "none" / "*.parquet")


def test_batched():
    assert list(batched(range(5), 2)) == [[0, 1], [2, 3], [4]]
    assert list(batched(range(5), 2, drop_last=True)) == [[0, 1], [2, 3]]
    assert list(batched([], 3)) == []
    with pytest.raises(ValueError):
        list(batched([1], 0))
