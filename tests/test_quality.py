"""The shapes quality benchmark (quality.py) and the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle_mini_jax import evaluate, quality, shapes
from dalle_mini_jax.pipeline import BUNDLED_MODEL_DIR

BUNDLED_LIMIT_BYTES = 25 * 1024 * 1024  # the "at most 25 MB together"


def _render(caption: str, seed: int) -> np.ndarray:
    """An image that satisfies `caption` (the generator's own scene for it)."""
    spec = shapes.parse_caption(caption)
    return shapes.render(shapes.sample_scene(np.random.default_rng(seed), spec))


class PerfectPipe:
    """A stand-in for DalleMini that draws every caption correctly (or leaves it blank)."""

    name = "perfect"

    class vqgan:  # noqa: N801  (mimics pipe.vqgan.config.resolution)
        class config:  # noqa: N801
            resolution = 64

    def __init__(self, blank_tasks=()):
        self.blank_tasks = set(blank_tasks)
        self.calls = []

    def generate(self, prompts, num_images=1, seed=0, batch_size=None, progress=False, **kw):
        self.calls.append((len(prompts), num_images, batch_size, kw))
        out = []
        for p, text in enumerate(prompts):
            for k in range(num_images):
                if shapes.parse_caption(text).task in self.blank_tasks:
                    pixels = np.zeros((64, 64, 3), np.uint8)
                else:
                    pixels = _render(text, seed * 1000 + p * 10 + k)
                img = Image.fromarray(pixels)
                img.info["settings"] = json.dumps(dict(kw))
                out.append(img)
        return out


def test_prompts_are_balanced_deterministic_and_parse():
    prompts = quality.shapes_prompts(40, seed=3)
    assert len(prompts) == 40
    assert prompts == quality.shapes_prompts(40, seed=3)
    assert prompts[:20] == quality.shapes_prompts(20, seed=3)  # a prefix of a longer list
    assert prompts != quality.shapes_prompts(40, seed=4)
    tasks = [t for _, t in prompts]
    assert tasks[:9] == list(shapes.TASKS)
    counts = {t: tasks.count(t) for t in shapes.TASKS}
    assert set(counts.values()) == {4, 5}
    for caption, task in prompts:
        assert shapes.parse_caption(caption).task == task


def test_perfect_images_score_one_and_blank_ones_zero():
    pipe = PerfectPipe(blank_tasks={"relation", "counting"})
    report = quality.run_shapes(pipe, num_prompts=27, images_per_prompt=2, seed=1,
                                batch_size=16, guidance=3.0)
    # One generate call for everything (batched), the sampling keywords passed through.
    assert pipe.calls == [(27, 2, 16, {"guidance": 3.0})]
    assert list(report.scores) == list(shapes.TASKS) + ["overall"]
    for task, score in report.scores.items():
        if task in ("relation", "counting"):
            assert score == 0.0
        elif task != "overall":
            assert score == 1.0, task
    assert report.overall == pytest.approx(7 / 9)
    assert report.counts["overall"] == 54 and report.counts["size"] == 6
    assert report.settings == {"guidance": 3.0}
    assert all("found 0 object" in reason for _, reason in report.failures)
    table = report.table()
    for task in shapes.TASKS:
        assert f"| {task} |" in table
    assert "**overall**" in table and "images/s" in table


class EnlargedPipe(PerfectPipe):
    """PerfectPipe drawing at 96 x 96 like the cell VQGAN (the canvas enlarged)."""

    class vqgan:  # noqa: N801
        class config:  # noqa: N801
            resolution = 96

    def generate(self, prompts, **kw):
        return [Image.fromarray(shapes.from_canvas(np.asarray(im), 96))
                for im in super().generate(prompts, **kw)]


def test_a_model_drawing_at_a_larger_side_is_judged_on_the_canvas():
    report = quality.run_shapes(EnlargedPipe(), num_prompts=18, images_per_prompt=1, seed=2)
    assert report.overall == 1.0, report.table()


def test_rejects_a_model_smaller_than_the_canvas():
    pipe = PerfectPipe()
    pipe.vqgan = type("V", (), {"config": type("C", (), {"resolution": 16})})
    with pytest.raises(ValueError, match="shapes"):
        quality.run_shapes(pipe, num_prompts=9)


@pytest.fixture(scope="module")
def shapes_model_dir(tmp_path_factory) -> Path:
    """A random tiny transformer over a random 64x64 `shapes`-preset VQGAN."""
    from tests.model_dirs import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("q") / "model", vqgan="shapes",
                          text_len=32)


def test_eval_command_end_to_end(shapes_model_dir, tmp_path, capsys):
    from dalle_mini_jax import cli

    out = tmp_path / "report.json"
    argv = ["eval", "shapes", "--model", str(shapes_model_dir), "--prompts", "9",
            "--images-per-prompt", "2", "--seed", "5", "--guidance", "2", "--top-k", "0",
            "--batch-size", "8", "--json", str(out), "--ceiling", "-q"]
    if "eval" not in cli.COMMANDS:  # until cli.py registers it, the module's own entry point
        status = quality.main(argv[1:])
    else:
        status = cli.main(argv)
    assert status == 0
    printed = capsys.readouterr().out
    assert "**overall**" in printed
    report = json.loads(out.read_text())
    assert set(report["scores"]) == set(shapes.TASKS) | {"overall"}
    assert report["counts"]["overall"] == 18
    assert report["settings"]["guidance"] == 2.0 and report["settings"]["top_k"] is None
    assert all(0.0 <= s <= 1.0 for s in report["scores"].values())
    # The VQGAN ceiling: its reconstructions of true images, judged per task.
    assert set(report["ceiling"]) == set(shapes.TASKS) | {"overall"}
    assert "VQGAN ceiling" in printed


def test_ceiling_judges_true_images_of_the_layout_asked(monkeypatch):
    """vqgan_ceiling(layout=...): the true images are drawn in that layout (jittered for
    "free", none for "centred") and, for a VQGAN larger than the canvas, enlarged going
    in and shrunk back before the judge. Here a perfect 96-pixel "VQGAN" (identity)."""
    from dalle_mini_jax import vqgan, vqgan_train

    seen = []

    class Identity:
        config = type("C", (), {"resolution": 96})

    def reconstruct(model, images, batch_size):
        seen.append(images)
        return images, None

    monkeypatch.setattr(vqgan.VQModel, "from_pretrained", staticmethod(lambda d: Identity()))
    monkeypatch.setattr(vqgan_train, "reconstruct", reconstruct)
    for layout in ("free", "centred"):
        scores = quality.vqgan_ceiling("unused", num_prompts=18, layout=layout)
        assert scores["overall"] == 1.0
    free, centred = (shapes.to_canvas(x) for x in seen)
    assert seen[0].shape[1:] == (96, 96, 3)
    assert not np.array_equal(free, centred)
    def origins(images):  # every object's box origin, as an offset from its unjittered one
        return {(o.bbox[0] - shapes.box_origin(shapes.CELL_CENTRES[o.cell[1]], o.extent),
                 o.bbox[1] - shapes.box_origin(shapes.CELL_CENTRES[o.cell[0]], o.extent))
                for image in images for o in evaluate.find_objects(image)}

    assert origins(centred) == {(0, 0)} and len(origins(free)) > 1


def test_eval_save_defaults_round_trip(shapes_model_dir, tmp_path, capsys):
    """--save-defaults writes the settings evaluated; the next run without flags uses them."""
    from dalle_mini_jax import cli
    from dalle_mini_jax.pipeline import read_generation_config

    model_dir = tmp_path / "model"  # links to the fixture's files: its own generation_config
    model_dir.mkdir()
    for entry in shapes_model_dir.iterdir():
        (model_dir / entry.name).symlink_to(entry)
    # The same sizes and settings as test_eval_command_end_to_end: shared compilations.
    argv = ["eval", "shapes", "--model", str(model_dir), "--prompts", "9", "--images-per-prompt",
            "2", "--seed", "5", "--batch-size", "8", "-q"]
    assert cli.main(argv + ["--guidance", "2", "--top-k", "0", "--save-defaults"]) == 0
    printed = capsys.readouterr().out
    assert "released defaults" in printed and "from flags: guidance, top_k" in printed
    saved = json.loads((model_dir / "generation_config.json").read_text())
    assert saved == {"temperature": 1.0, "top_k": None, "top_p": None, "guidance": 2.0}
    assert "wrote these sampling settings" in printed
    assert read_generation_config(model_dir).to_dict() == saved

    out = tmp_path / "report.json"
    assert cli.main(argv + ["--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["settings"] == saved
    assert "from flags: none" in printed and "generation_config.json" in printed
    assert "wrote" not in printed  # only with --save-defaults


# --------------------------------------------------------------------------------------
# The bundled model
# --------------------------------------------------------------------------------------

needs_bundled = pytest.mark.skipif(not (BUNDLED_MODEL_DIR / "config.json").is_file(),
                                   reason="no bundled model in this checkout")


@needs_bundled
def test_bundled_model_is_small_and_complete():
    files = [p for p in BUNDLED_MODEL_DIR.rglob("*") if p.is_file()]
    names = {p.relative_to(BUNDLED_MODEL_DIR).as_posix() for p in files}
    for name in ("config.json", "flax_model.msgpack", "vocab.json", "merges.txt",
                 "vqgan/config.json", "vqgan/flax_model.msgpack"):
        assert name in names
    assert sum(p.stat().st_size for p in files) <= BUNDLED_LIMIT_BYTES


@needs_bundled
def test_bundled_model_draws_what_it_is_told():
    """A small sample of the benchmark: the shipped model must keep its measured level.

    The bounds are the shipped model's measured level with a margin: on 400 captions x 4
    it scores 0.97 overall, 0.97-1.00 on every task but three objects (0.82) (BUNDLED.md,
    seventh model), and on this sample (seed 99) 1.0 on the single-object and two-object
    tasks, 0.875 on three objects, 0.75 on relations, 0.96 overall. An untrained or broken
    model (wrong codes, wrong VQGAN, lost sampling defaults) scores ~0 on all of them, one
    that ignores position words ~0.1-0.2 on position, and the sixth model (random
    image-token rows, 0.60 overall) scored 0.64 here. 4 captions x 2 images per task.
    """
    from dalle_mini_jax import DalleMini

    pipe = DalleMini.from_pretrained()
    assert pipe.name == "bundled"
    assert pipe.defaults.guidance == 1.25  # its generation_config.json is read
    report = quality.run_shapes(pipe, num_prompts=36, images_per_prompt=2, seed=99)
    single = (report.scores["one_object"] + report.scores["size"]) / 2
    two = (report.scores["two_objects"] + report.scores["colour"] + report.scores["attribute_binding"]) / 3
    assert single >= 0.85, report.table()
    assert report.scores["position"] >= 0.85, report.table()
    assert two >= 0.8, report.table()
    assert report.overall >= 0.8, report.table()


def test_cross_attention_probe_records_one_distribution_per_step_and_layer():
    """benchmarks/cross_attention_probe.py: its recorded weights are the decoder's softmax
    over the caption's real tokens (sum 1, nothing on padding), for every step and layer;
    phrase spans and object patches are the grammar's and the rasteriser's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cross_attention_probe as probe

    from dalle_mini_jax import DalleMini

    pipe = DalleMini.from_pretrained()
    caption = "a red circle in the top left and a blue square"
    words, spans = probe.phrase_spans(pipe, caption)
    assert [" ".join(words[a:b]) for a, b in spans] == ["a red circle in the top left",
                                                       "a blue square"]
    codes = np.zeros(pipe.config.image_len, np.int64)
    w = probe.cross_attention(pipe, caption, codes)
    n = int(pipe.tokenizer([caption])["attention_mask"].sum())
    assert w.shape == (pipe.config.image_len, pipe.config.num_decoder_layers, pipe.config.text_len)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert np.abs(w[..., n:]).max() < 1e-6
    obj = shapes.SceneObject("red", "circle", "large", (0, 0), (0, 0))  # box 2..19 -> patches 0..2
    words, spans = probe.phrase_spans(pipe, "a cross in the top right right of a small circle")
    assert [" ".join(words[a:b]) for a, b in spans] == ["a cross in the top right", "a small circle"]
    assert probe.object_tokens(obj, 8) == [0, 1, 2, 8, 9, 10, 16, 17, 18]
