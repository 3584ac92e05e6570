"""Encoding datasets to parquet shards: round trip, resume, skipped images.

A freshly initialised `tiny` VQGAN (16x16 images, 4x4 tokens) is enough: the tests check
that the shards hold exactly what `VQModel.encode` gives, not that the codes are good.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from flax import nnx

from dalle_mini_jax import data, shapes
from dalle_mini_jax import encode as enc
from dalle_mini_jax.config import VQGAN_PRESETS
from dalle_mini_jax.vqgan import VQModel
from dalle_mini_jax.vqgan_train import new_model

TINY = VQGAN_PRESETS["tiny"]


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vqgan")
    new_model(TINY, 3).save_pretrained(path)
    return path


def test_parse_shapes_source():
    assert enc.parse_shapes_source("shapes") == (None, 0, "free", "spec")
    assert enc.parse_shapes_source("shapes:100") == (100, 0, "free", "spec")
    assert enc.parse_shapes_source("shapes:100:7") == (100, 7, "free", "spec")
    assert enc.parse_shapes_source("shapes:inf:7") == (None, 7, "free", "spec")
    assert enc.parse_shapes_source("shapes:100:7:reading") == (100, 7, "reading", "spec")
    assert enc.parse_shapes_source("shapes:100:7:reading:multi") == (100, 7, "reading", "multi")
    assert enc.parse_shapes_source("data/shapes") is None
    with pytest.raises(ValueError):
        enc.parse_shapes_source("shapes:x")
    with pytest.raises(ValueError, match="LAYOUT must be one of free, reading"):
        enc.parse_shapes_source("shapes:100:7:sorted")
    with pytest.raises(ValueError, match="MIX must be one of spec, multi, multi_position"):
        enc.parse_shapes_source("shapes:100:7:reading:hard")
    with pytest.raises(ValueError, match="expected shapes"):
        enc.parse_shapes_source("shapes:100:7:reading:multi:x")
    source = enc.open_source("shapes:5:3:free:multi", 64)
    assert source.description == "shapes:5:3:free:multi"
    assert [e.caption for e in source] == [shapes.sample(3, i, mix="multi")[1].text
                                          for i in range(5)]


def test_encode_decode_round_trip(vqgan_dir, tmp_path):
    report = enc.encode_dataset("shapes:22:5", vqgan_dir, tmp_path, batch_size=8,
                                shard_size=10, progress=False)
    assert report.shards_written == [0, 1, 2] and report.examples_encoded == 22
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [
        "00000.parquet", "00001.parquet", "00002.parquet"]
    table = pq.read_table(tmp_path / "00000.parquet")
    assert table.column_names == ["caption", "encoding"]
    captions, codes = data.read_encoded(tmp_path)
    assert codes.shape == (22, TINY.num_tokens)
    # Same images, same captions, same codes as the model's own encode.
    src = enc.ShapesSource(22, 5, TINY.resolution)
    examples = list(src.iterate())
    assert captions == [e.caption for e in examples] == [c for _, c in shapes.generate(22, 5)]
    model = VQModel.from_pretrained(vqgan_dir)
    images = np.stack([e.image for e in examples]).astype(np.float32) / 255.0
    want = np.asarray(nnx.jit(lambda m, x: m.encode(x))(model, images))
    np.testing.assert_array_equal(codes, want)
    decoded = np.asarray(nnx.jit(lambda m, c: m.decode_code(c))(model, codes))
    assert decoded.shape == (22, 16, 16, 3) and np.isfinite(decoded).all()
    info = json.loads((tmp_path / enc.INFO_NAME).read_text())
    assert info["examples_encoded"] == 22 and info["codebook_size"] == TINY.codebook_size


def test_shapes_source_enlarges_by_nearest_and_shrinks_by_lanczos():
    """A VQGAN larger than the canvas (the cell VQGAN's 96) reads the canvas enlarged by
    nearest neighbour, which `shapes.to_canvas` undoes exactly; a smaller one (tiny, 16)
    reads it antialiased."""
    canvas = [image for image, _ in shapes.generate(3, 5)]
    big = [e.image for e in enc.ShapesSource(3, 5, 96).iterate()]
    np.testing.assert_array_equal(np.stack(big), shapes.from_canvas(np.stack(canvas), 96))
    small = [e.image for e in enc.ShapesSource(3, 5, 16).iterate()]
    want = [data.load_image(Image.fromarray(image), 16) for image in canvas]
    np.testing.assert_array_equal(np.stack(small), np.stack(want))


def test_rerun_rewrites_only_missing_shards(vqgan_dir, tmp_path):
    kw = dict(batch_size=4, shard_size=6, progress=False)
    first = enc.encode_dataset("shapes:20:1", vqgan_dir, tmp_path, **kw)
    assert first.shards_written == [0, 1, 2, 3]
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.glob("*.parquet")}
    os.remove(enc.shard_path(tmp_path, 1))
    again = enc.encode_dataset("shapes:20:1", vqgan_dir, tmp_path, **kw)
    assert again.shards_written == [1] and again.shards_skipped == [0, 2, 3]
    assert again.examples_encoded == 6
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.glob("*.parquet")}
    assert after.keys() == before.keys()
    for name in before:
        assert after[name][1] == before[name][1], name  # same content ...
        if name != "00001.parquet":
            assert after[name][0] == before[name][0], name  # ... and untouched
    assert not list(tmp_path.glob(".*.tmp"))
    # Nothing missing: nothing to do.
    done = enc.encode_dataset("shapes:20:1", vqgan_dir, tmp_path, **kw)
    assert done.shards_written == [] and done.examples_encoded == 0


def test_interrupted_encode_resumes(vqgan_dir, tmp_path, monkeypatch):
    """A crash in shard 2 leaves shards 0-1 and no partial file; the rerun does 2 and 3."""
    kw = dict(batch_size=4, shard_size=5, progress=False)
    real = data.write_encoded
    calls = []

    def flaky(path, captions, encodings):
        calls.append(os.path.basename(path))
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(path, captions, encodings)

    monkeypatch.setattr(data, "write_encoded", flaky)
    with pytest.raises(KeyboardInterrupt):
        enc.encode_dataset("shapes:18:2", vqgan_dir, tmp_path, **kw)
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    monkeypatch.setattr(data, "write_encoded", real)
    report = enc.encode_dataset("shapes:18:2", vqgan_dir, tmp_path, **kw)
    assert report.shards_written == [2, 3] and report.examples_encoded == 8
    captions, _ = data.read_encoded(tmp_path)
    assert captions == [c for _, c in shapes.generate(18, 2)]


def test_corrupt_images_are_skipped_and_counted(vqgan_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    shapes.write_folder(folder, 12, seed=4)
    (folder / "000003.png").write_bytes(b"not a png at all")
    (folder / "000007.txt").unlink()
    out = tmp_path / "encoded"
    report = enc.encode_dataset(str(folder), vqgan_dir, out, batch_size=4, shard_size=5,
                                progress=False)
    assert report.skipped == {"unreadable_image": 1, "missing_caption": 1}
    assert report.examples_encoded == 10
    # Shards follow stable indices, skipped ones included: 0-4 lose #3, 5-9 lose #7.
    sizes = [pq.read_metadata(enc.shard_path(out, k)).num_rows for k in range(3)]
    assert sizes == [4, 4, 2]
    captions, _ = data.read_encoded(out)
    want = [c for i, (_, c) in enumerate(shapes.generate(12, 4)) if i not in (3, 7)]
    assert captions == want
    info = json.loads((out / enc.INFO_NAME).read_text())
    assert info["skipped"] == {"unreadable_image": 1, "missing_caption": 1}


def test_cli_prints_the_report(vqgan_dir, tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    enc.add_arguments(parser)
    enc.run(parser.parse_args(["--data", "shapes:5:0", "--vqgan", str(vqgan_dir), "--out",
                               str(tmp_path), "--batch-size", "4", "--no-progress"]))
    assert "encoded 5 images into 1 new shard(s)" in capsys.readouterr().out


def test_refuses_to_mix_shards_of_another_run(vqgan_dir, tmp_path):
    enc.encode_dataset("shapes:6:0", vqgan_dir, tmp_path, batch_size=4, shard_size=3,
                       progress=False)
    with pytest.raises(ValueError, match="shard_size"):
        enc.encode_dataset("shapes:6:0", vqgan_dir, tmp_path, batch_size=4, shard_size=2,
                           progress=False)
    with pytest.raises(ValueError, match="source"):
        enc.encode_dataset("shapes:6:1", vqgan_dir, tmp_path, batch_size=4, shard_size=3,
                           progress=False)
