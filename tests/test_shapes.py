"""The shapes set (specs/shapes-v1.md): rasteriser, grammar, generator and judge."""

import dataclasses
import itertools
from collections import Counter, deque

import numpy as np
import pytest
from PIL import Image

from dalle_mini_jax import evaluate, shapes
from dalle_mini_jax.shapes import CaptionSpec, Phrase, Scene, SceneObject

NUM_JUDGED = 3000  # generated pairs checked against the judge


@pytest.fixture(scope="module")
def dataset():
    """(scenes, specs, images uint8 [N, 64, 64, 3]) of the first NUM_JUDGED samples."""
    scenes, specs = zip(*(shapes.sample(seed=7, index=i) for i in range(NUM_JUDGED)))
    images = np.stack([shapes.render(s) for s in scenes])
    return scenes, specs, images


# --------------------------------------------------------------------------------------
# Rasteriser
# --------------------------------------------------------------------------------------


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max(), ys.max()


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_every_extent_fills_its_box(shape):
    for s in range(1, 41):
        mask = shapes.shape_mask(shape, s)
        assert mask.shape == (s, s) and _bbox(mask) == (0, 0, s - 1, s - 1), (shape, s)
        if shape != "cross" or (s - shapes.cross_thickness(s)) % 2 == 0:
            np.testing.assert_array_equal(mask, mask[:, ::-1])  # left-right symmetric


def test_mask_details():
    assert shapes.cross_thickness(10) == 3 and shapes.cross_thickness(18) == 6
    tri = shapes.shape_mask("triangle", 10)
    assert tri.sum(1).tolist() == [2, 2, 4, 4, 6, 6, 8, 8, 10, 10]  # apex up, base s wide
    cross = shapes.shape_mask("cross", 18)
    assert cross[:, 0].sum() == 6 and cross[0].sum() == 6 and cross.sum() == 2 * 18 * 6 - 36
    circle = shapes.shape_mask("circle", 18)
    np.testing.assert_array_equal(circle, circle.T)
    # The four shapes differ at every extent the judge can meet on real objects.
    for s in range(5, 41):
        masks = [shapes.shape_mask(sh, s) for sh in shapes.SHAPES]
        for a, b in itertools.combinations(masks, 2):
            assert not np.array_equal(a, b), s


def test_draw_places_the_box_and_clips():
    canvas = np.zeros((64, 64, 3), np.uint8)
    shapes.draw(canvas, "square", 10, (11, 11), "red")  # even extent, integer centre
    assert _bbox(canvas.any(-1)) == (6, 6, 15, 15)  # half a pixel up/left
    canvas[:] = 0
    shapes.draw(canvas, "square", 9, (11, 11), (1, 2, 3))
    assert _bbox(canvas.any(-1)) == (7, 7, 15, 15) and tuple(canvas[11, 11]) == (1, 2, 3)
    canvas[:] = 0
    shapes.draw(canvas, "circle", 18, (0, 63), "blue")  # clipped at the corner
    assert canvas.any() and tuple(canvas[63, 0]) == shapes.COLOURS["blue"]
    # Drawing at a bounding box's own centre reproduces it, for either parity.
    for s, (x0, y0) in itertools.product((9, 10, 17, 18), ((3, 5), (20, 41))):
        centre = ((2 * x0 + s - 1) / 2, (2 * y0 + s - 1) / 2)
        assert (shapes.box_origin(centre[0], s), shapes.box_origin(centre[1], s)) == (x0, y0)


def test_scenes_keep_apart_and_inside():
    # Extreme jitter of large objects in neighbouring cells leaves a black gap.
    for jitter in itertools.product((-1, 1), repeat=2):
        objs = [SceneObject("white", "square", "large", cell, jitter) for cell in shapes.CELLS]
        image = shapes.render(Scene(tuple(objs)))
        assert len(evaluate.find_objects(image)) == 9
        assert not image[[0, -1]].any() and not image[:, [0, -1]].any()
    with pytest.raises(ValueError, match="share a cell"):
        Scene((SceneObject("red", "cross", "small", (0, 0)),) * 2)


# --------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------


def test_deterministic_and_indexable():
    first = list(shapes.generate(30, seed=3))
    again = list(shapes.generate(30, seed=3))
    assert all(a[0].tobytes() == b[0].tobytes() and a[1] == b[1] for a, b in zip(first, again))
    piece = list(shapes.generate(10, seed=3, start=20))  # sample i ignores num and start
    assert all(a[0].tobytes() == b[0].tobytes() and a[1] == b[1]
               for a, b in zip(first[20:], piece))
    other = [c for _, c in shapes.generate(30, seed=4)]
    assert other != [c for _, c in first]
    images, captions = shapes.generate_arrays(30, seed=3)
    assert images.shape == (30, 64, 64, 3) and images.dtype == np.uint8
    assert captions == [c for _, c in first]


def test_all_forms_omissions_and_proportions(dataset):
    specs = dataset[1][:2000]
    tasks = Counter(s.task for s in specs)
    for task, weight in shapes.TASK_WEIGHTS.items():
        assert abs(tasks[task] / len(specs) - weight) < 0.03, (task, tasks[task])
    seen = set()
    for spec in specs:
        for p in spec.phrases:
            seen.add((spec.form, len(spec.phrases), spec.count, p.size is not None,
                      p.cell is not None))
        seen.add(("relation", spec.relation))
        seen |= {("colour", p.colour) for p in spec.phrases}
        seen |= {("shape", p.shape) for p in spec.phrases}
        seen |= {("cell", p.cell) for p in spec.phrases}
    for size_stated, cell_stated in itertools.product((False, True), repeat=2):
        for n in (1, 2, 3):
            assert (("single", "and")[n > 1], n, None, size_stated, cell_stated) in seen
    for size_stated in (False, True):
        assert ("relation", 2, None, size_stated, False) in seen
        assert ("count", 1, 2, size_stated, False) in seen
        assert ("count", 1, 3, size_stated, False) in seen
    assert {("relation", r) for r in shapes.RELATIONS} <= seen
    assert {("colour", c) for c in shapes.COLOURS} <= seen
    assert {("shape", s) for s in shapes.SHAPES} <= seen
    assert {("cell", c) for c in shapes.CELLS} <= seen
    captions = [s.text for s in specs]
    assert any(c.startswith("an orange") for c in captions)
    assert any(" and an orange" in c for c in captions)
    assert all(c == c.lower() and not c.endswith(".") for c in captions)


def test_sample_caption_by_task():
    rng = np.random.default_rng(0)
    for task in shapes.TASKS:
        for _ in range(50):
            assert shapes.sample_caption(rng, task).task == task
    with pytest.raises(ValueError, match="unknown task"):
        shapes.sample_caption(rng, "spelling")
    prompts = evaluate.benchmark_prompts(per_task=3, seed=1)
    assert len(prompts) == 3 * len(shapes.TASKS)
    assert all(shapes.parse_caption(c).task == t for c, t in prompts)
    assert prompts == evaluate.benchmark_prompts(per_task=3, seed=1)


def test_write_folder(tmp_path):
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    shapes.write_folder(whole, 7, seed=5)
    shapes.write_folder(pieces, 4, seed=5)
    shapes.write_folder(pieces, 3, seed=5, start=4)
    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in pieces.iterdir())
    assert names == sorted(f"{i:06d}.{ext}" for i in range(7) for ext in ("png", "txt"))
    for i, (image, caption) in enumerate(shapes.generate(7, seed=5)):
        for folder in (whole, pieces):
            png = Image.open(folder / f"{i:06d}.png")
            assert png.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(png), image)
            assert (folder / f"{i:06d}.txt").read_text(encoding="utf-8") == caption


# --------------------------------------------------------------------------------------
# Grammar
# --------------------------------------------------------------------------------------


def test_caption_text_examples():
    red = Phrase("red", "circle", "large", (0, 0))
    assert shapes.caption_for(CaptionSpec("single", (red,))) == \
        "a large red circle in the top left"
    assert shapes.caption_for(CaptionSpec("single", (Phrase("orange", "cross", None, (1, 2)),))) \
        == "an orange cross on the right"
    assert shapes.caption_for(CaptionSpec("and", (
        Phrase("blue", "square"), Phrase("white", "cross", "small", (2, 2))))) == \
        "a blue square and a small white cross in the bottom right"
    assert shapes.caption_for(CaptionSpec("relation", (
        Phrase("orange", "triangle"), Phrase("cyan", "circle", "small")),
        relation="left of")) == "an orange triangle left of a small cyan circle"
    assert shapes.caption_for(CaptionSpec("count", (Phrase("green", "cross", "large"),),
                                          count=3)) == "three large green crosses"


def test_parse_inverts_caption_for(dataset):
    for spec in dataset[1]:
        assert shapes.parse_caption(spec.text) == spec
    assert shapes.parse_caption("  a red   circle\tat the top ") == \
        CaptionSpec("single", (Phrase("red", "circle", None, (0, 1)),))


@pytest.mark.parametrize("caption", [
    "", "red circle", "a orange circle", "an red circle", "a red circles", "a red",
    "a large small red circle", "a red circle.", "A red circle", "a red circle in the top",
    "a red circle in the middle", "a red circle and", "a red circle and red square",
    "two red circle", "four red circles", "one red circle", "two red circles on the left",
    "a red circle in the top left above a blue square",
    "a red circle above a blue square at the bottom",
    "a red circle above a blue square and a green cross",
    "a red circle and a blue square above a green cross",
    "a red circle and a blue square and a green cross and a white circle",
    "a red circle on the left and a blue square on the left",
    "a red circle on top of a blue square", "a pink circle", "a red star",
])
def test_parse_rejects(caption):
    with pytest.raises(ValueError, match="cannot parse caption"):
        shapes.parse_caption(caption)


# --------------------------------------------------------------------------------------
# Judge
# --------------------------------------------------------------------------------------


def _reference_labels(fg):
    """Breadth-first search labelling, the plain definition of 8-connectivity."""
    labels = np.full(fg.shape, -1)
    n, h, w = fg.shape
    for start in zip(*np.nonzero(fg)):
        if labels[start] >= 0:
            continue
        name = np.ravel_multi_index(start, fg.shape)
        labels[start] = name
        queue = deque([start])
        while queue:
            i, y, x = queue.popleft()
            for dy, dx in itertools.product((-1, 0, 1), repeat=2):
                q = (i, y + dy, x + dx)
                if 0 <= q[1] < h and 0 <= q[2] < w and fg[q] and labels[q] < 0:
                    labels[q] = name
                    queue.append(q)
    return labels


def test_label_components_matches_bfs():
    rng = np.random.default_rng(0)
    fg = rng.random((6, 64, 64)) < np.array([0.05, 0.2, 0.4, 0.5, 0.6, 0.9])[:, None, None]
    fg[0] = False  # an empty image
    pixels, labels = evaluate.label_components(fg)
    np.testing.assert_array_equal(pixels, np.flatnonzero(fg))
    np.testing.assert_array_equal(labels, _reference_labels(fg).reshape(-1)[pixels])
    # A long winding path: one component however many turns.
    snake = np.zeros((1, 64, 64), bool)
    snake[0, ::2] = True
    snake[0, 1::4, -1] = snake[0, 3::4, 0] = True
    assert len(np.unique(evaluate.label_components(snake)[1])) == 1


def test_generated_pairs_pass(dataset):
    scenes, specs, images = dataset
    found = evaluate.find_objects_batch(images)
    for scene, objects in zip(scenes, found):
        got = sorted((o.colour, o.shape, o.size, o.cell, o.iou) for o in objects)
        assert got == sorted((o.colour, o.shape, o.size, o.cell, 1.0) for o in scene.objects)
    assert evaluate.judge_batch(images, [s.text for s in specs]).all()
    assert evaluate.judge_batch(images, [shapes.describe(s) for s in scenes]).all()
    ok, objects, reason = evaluate.judge_detailed(images[0], specs[0].text)
    assert ok and reason == "ok" and len(objects) == len(specs[0].objects)


def test_reading_layout_orders_the_unplaced_objects_and_changes_nothing_else():
    """layout="reading": same captions, sizes and jitter; the objects that state no cell take
    the same cells as with "free", in reading order; the images still pass the judge."""
    moved = 0
    for i in range(600):
        free, spec = shapes.sample(seed=11, index=i)
        reading, spec_r = shapes.sample(seed=11, index=i, layout="reading")
        assert spec_r == spec
        assert [(o.colour, o.shape, o.size, o.jitter) for o in reading.objects] == [
            (o.colour, o.shape, o.size, o.jitter) for o in free.objects]
        placed = [p.cell is not None for p in spec.objects] if spec.form != "relation" else None
        if placed is None:  # relations choose a cell pair; the layout does not touch them
            assert reading == free
            continue
        unplaced_r = [o.cell for o, p in zip(reading.objects, placed) if not p]
        unplaced_f = [o.cell for o, p in zip(free.objects, placed) if not p]
        assert unplaced_r == sorted(unplaced_f)
        assert [o.cell for o, p in zip(reading.objects, placed) if p] == [
            o.cell for o, p in zip(free.objects, placed) if p]
        moved += unplaced_r != unplaced_f
        assert evaluate.judge(shapes.render(reading), spec.text)
    assert moved > 50  # the layout does reorder
    with pytest.raises(ValueError, match="unknown layout"):
        shapes.sample(seed=11, index=0, layout="sorted")


def test_centred_layout_drops_only_the_jitter():
    """layout="centred" (the cell VQGAN's training images): the "free" scene with every
    jitter 0, and the images still pass the judge."""
    jittered = 0
    for i in range(200):
        free, spec = shapes.sample(seed=4, index=i)
        centred, spec_c = shapes.sample(seed=4, index=i, layout="centred")
        assert spec_c == spec
        assert centred == shapes.Scene(tuple(dataclasses.replace(o, jitter=(0, 0))
                                             for o in free.objects))
        jittered += any(o.jitter != (0, 0) for o in free.objects)
        assert evaluate.judge(shapes.render(centred), spec.text)
    assert jittered > 150


def test_grid_mix_fills_the_cells_it_names():
    """MIX "grid" (a cell VQGAN's training images): objects in ~3/4 of the cells, each one
    a phrase of the caption with its cell, the judge's detector finding exactly them;
    `sample` refuses it (no caption spec holds 9 objects) and a shapes source parses it."""
    from dalle_mini_jax.encode import parse_shapes_source

    counts = []
    for k, (image, caption) in enumerate(shapes.generate(60, 3, layout="centred", mix=shapes.GRID_MIX)):
        scene = shapes.grid_scene(3, k, "centred")
        assert np.array_equal(image, shapes.render(scene))
        assert all(o.jitter == (0, 0) for o in scene.objects)
        phrases = caption.split(" and ")
        assert len(phrases) == len(scene.objects) >= 1
        found = {(o.colour, o.shape, o.size, o.cell) for o in evaluate.find_objects(image)}
        assert found == {(o.colour, o.shape, o.size, o.cell) for o in scene.objects}
        for phrase, obj in zip(phrases, scene.objects):
            assert shapes.parse_caption(phrase) == shapes.CaptionSpec(
                "single", (shapes.Phrase(obj.colour, obj.shape, obj.size, obj.cell),))
        counts.append(len(scene.objects))
    assert 5.5 < np.mean(counts) < 8  # 9 x 0.75 = 6.75
    assert any(o.jitter != (0, 0) for k in range(20) for o in shapes.grid_scene(3, k, "free").objects)
    with pytest.raises(ValueError, match="grid"):
        shapes.sample(3, 0, mix=shapes.GRID_MIX)
    assert parse_shapes_source("shapes:inf:0:centred:grid") == (None, 0, "centred", "grid")
    with pytest.raises(ValueError, match="MIX must be one of"):
        parse_shapes_source("shapes:inf:0:centred:full")


def test_task_mix_changes_only_how_often_each_task_is_drawn():
    """mix="spec" is the default set draw for draw; "multi" draws the tasks with its own
    shares, from the same grammar, and its images still satisfy their captions."""
    n = 3000
    counts = Counter()
    for i in range(n):
        scene, spec = shapes.sample(seed=4, index=i, mix="multi")
        counts[spec.task] += 1
        assert shapes.parse_caption(spec.text) == spec
        if i < 200:
            assert shapes.sample(seed=4, index=i, mix="spec") == shapes.sample(seed=4, index=i)
            assert evaluate.judge(shapes.render(scene), spec.text)
    for task, share in shapes.TASK_MIXES["multi"].items():
        # binomial standard error at n=3000 is at most 0.009
        assert abs(counts[task] / n - share) < 0.03, (task, counts[task] / n, share)
    for name, mix in shapes.TASK_MIXES.items():  # every mix: every task, shares summing to 1
        assert set(mix) == set(shapes.TASKS) and abs(sum(mix.values()) - 1) < 1e-9, name
    with pytest.raises(ValueError, match="unknown task mix 'hard'"):
        shapes.sample(seed=4, index=0, mix="hard")


def test_shapes_recognised_at_any_centre_parity():
    for shape, s, centre in itertools.product(shapes.SHAPES, range(6, 25),
                                              ((31, 30), (31.5, 30), (30, 31.5))):
        canvas = shapes.draw(np.zeros((64, 64, 3), np.uint8), shape, s, centre, "cyan")
        (obj,) = evaluate.find_objects(canvas)
        assert (obj.shape, obj.extent, obj.iou, obj.colour) == (shape, s, 1.0, "cyan")
        assert obj.size == ("small" if s < 14 else "large") and obj.cell == (1, 1)


def test_detection_rules():
    canvas = np.zeros((64, 64, 3), np.uint8)
    shapes.draw(canvas, "square", 13, (21, 11), "white")
    shapes.draw(canvas, "square", 14, (32.5, 53), "white")
    # Colour from the median pixel: 56 of 196 pixels off-colour do not change it.
    assert _bbox(canvas[40:].any(-1)) == (26, 6, 39, 19)  # the 14 x 14 box, rows 46..59
    canvas[46:50, 26:40] = shapes.COLOURS["blue"]
    a, b = evaluate.find_objects(canvas)
    assert (a.size, b.size) == ("small", "large")  # extent 13 < 14 <= extent 14
    assert a.cell == (0, 0)  # bbox centre x = 21: 10 from column 0's 11, 11 from 32
    assert b.cell == (2, 1) and b.colour == "white" and b.extent == 14
    canvas[:] = 0
    shapes.draw(canvas, "square", 10, (21.5, 11), "red")  # centre on the border: lower col
    assert evaluate.find_objects(canvas)[0].cell == (0, 0)
    # A non-square box: extent is the longer side.
    canvas[:] = 0
    canvas[30:34, 20:40] = shapes.COLOURS["green"]
    (bar,) = evaluate.find_objects(canvas)
    assert bar.extent == 20 and bar.size == "large" and bar.bbox == (20, 30, 39, 33)


def _with(scene, k, **changes):
    objects = list(scene.objects)
    objects[k] = dataclasses.replace(objects[k], **changes)
    return Scene(tuple(objects))


def _other(options, value, rng):
    return [o for o in options if o != value][rng.integers(len(options) - 1)]


def test_caption_edits_fail(dataset):
    """Changing any stated fact of a true caption makes the judge refuse it."""
    scenes, specs, images = dataset
    rng = np.random.default_rng(1)
    found = evaluate.find_objects_batch(images[:400])
    checked = Counter()
    for scene, spec, objects in zip(scenes, specs, found):
        full = shapes.describe(scene)  # every size and cell stated
        edits = []
        for k in range(len(full.phrases)):
            p = full.phrases[k]
            free = [c for c in shapes.CELLS if c not in {o.cell for o in scene.objects}]
            for field, value in (("colour", _other(shapes.COLOUR_NAMES, p.colour, rng)),
                                 ("shape", _other(shapes.SHAPES, p.shape, rng)),
                                 ("size", _other(shapes.SIZE_NAMES, p.size, rng)),
                                 ("cell", free[rng.integers(len(free))])):
                phrases = list(full.phrases)
                phrases[k] = dataclasses.replace(p, **{field: value})
                edits.append((field, dataclasses.replace(full, phrases=tuple(phrases))))
        # Colour and shape are always stated, so they must count in sampled captions too.
        q = spec.phrases[0]
        for field, options in (("colour", shapes.COLOUR_NAMES), ("shape", shapes.SHAPES)):
            phrases = (dataclasses.replace(q, **{field: _other(options, getattr(q, field),
                                                                rng)}),) + spec.phrases[1:]
            edits.append((field, dataclasses.replace(spec, phrases=phrases)))
        extra = shapes.sample_caption(rng, "one_object").phrases[0]
        if spec.form == "and":
            edits.append(("missing object",
                          CaptionSpec("and", spec.phrases[1:]) if len(spec.phrases) == 3
                          else CaptionSpec("single", spec.phrases[1:])))
            if len(spec.phrases) == 2 and extra.cell not in [p.cell for p in spec.phrases]:
                edits.append(("extra object", CaptionSpec("and", spec.phrases + (extra,))))
        if spec.form == "single":
            edits.append(("extra object", CaptionSpec("and", spec.phrases + (extra,))))
        if spec.form == "count":
            edits.append(("count", dataclasses.replace(spec, count=5 - spec.count)))
            edits.append(("missing object", CaptionSpec("single", spec.phrases)))
        if spec.form == "relation":
            a, b = spec.phrases
            if (a.colour, a.shape) != (b.colour, b.shape):  # else A and B may swap roles
                opposite = {"above": "below", "below": "above",
                            "left of": "right of", "right of": "left of"}[spec.relation]
                edits.append(("relation", dataclasses.replace(spec, relation=opposite)))
            edits.append(("missing object", CaptionSpec("single", (a,))))
        for field, edited in edits:
            text = edited.text  # judged as text, the way a benchmark judges it
            assert not evaluate.match(objects, text)[0], (field, spec.text, text)
            checked[field] += 1
    assert set(checked) == {"colour", "shape", "size", "cell", "relation", "count",
                            "missing object", "extra object"}


def test_image_edits_fail(dataset):
    """Changing the image against its (true) caption makes the judge refuse it."""
    scenes, specs, _ = dataset
    rng = np.random.default_rng(2)
    images, captions, kinds = [], [], []

    def add(kind, image, caption):
        images.append(image)
        captions.append(caption)
        kinds.append(kind)

    for scene, spec in zip(scenes[:300], specs[:300]):
        full = shapes.describe(scene).text
        k = int(rng.integers(len(scene.objects)))
        obj = scene.objects[k]
        free = [c for c in shapes.CELLS if c not in {o.cell for o in scene.objects}]
        add("colour", shapes.render(_with(scene, k, colour=_other(shapes.COLOUR_NAMES,
                                                                   obj.colour, rng))), spec.text)
        add("shape", shapes.render(_with(scene, k, shape=_other(shapes.SHAPES, obj.shape,
                                                                 rng))), spec.text)
        add("size", shapes.render(_with(scene, k, size=_other(shapes.SIZE_NAMES, obj.size,
                                                               rng))), full)
        add("cell", shapes.render(_with(scene, k, cell=free[rng.integers(len(free))])), full)
        add("missing object", shapes.render(
            Scene(scene.objects[:k] + scene.objects[k + 1:])), spec.text)
        extra = SceneObject("white", "cross", "small", free[0])
        add("extra object", shapes.render(Scene(scene.objects + (extra,))), spec.text)
        if spec.form == "relation" and (
                scene.objects[0].colour, scene.objects[0].shape) != (
                scene.objects[1].colour, scene.objects[1].shape):
            a, b = scene.objects
            swapped = Scene((dataclasses.replace(a, cell=b.cell),
                             dataclasses.replace(b, cell=a.cell)))
            add("relation", shapes.render(swapped), spec.text)
    ok = evaluate.judge_batch(np.stack(images), captions)
    assert not ok.any(), [(k, c) for k, c, o in zip(kinds, captions, ok) if o][:5]
    assert set(kinds) == {"colour", "shape", "size", "cell", "missing object",
                          "extra object", "relation"}


def test_count_needs_distinct_cells():
    canvas = np.zeros((64, 64, 3), np.uint8)
    shapes.draw(canvas, "square", 10, (6, 11), "red")  # two small squares in cell (0, 0)
    shapes.draw(canvas, "square", 10, (17, 11), "red")
    ok, objects, reason = evaluate.judge_detailed(canvas, "two small red squares")
    assert [o.cell for o in objects] == [(0, 0), (0, 0)] and not ok
    assert "share a cell" in reason
    assert evaluate.judge(canvas, "a red square and a red square")  # 'and' states no cells
    canvas[:] = 0
    shapes.draw(canvas, "square", 10, (11, 11), "red")
    shapes.draw(canvas, "square", 10, (53, 53), "red")
    assert evaluate.judge(canvas, "two small red squares")


def test_noise_is_ignored():
    scene = Scene((SceneObject("orange", "triangle", "large", (0, 0), (1, -1)),
                   SceneObject("green", "circle", "small", (2, 2))))
    caption = "a large orange triangle in the top left and a green circle"
    image = shapes.render(scene)
    assert evaluate.judge(image, caption)
    noisy = image.copy()
    noisy[30:33, 30:34] = 200  # 12 pixels ...
    noisy[31, 33] = 0  # ... less one: noise
    noisy[::9, 60] = (255, 0, 0)  # single pixels
    noisy[60:62, 2:6] = (0, 0, 255)  # 8 pixels
    noisy[noisy.sum(-1) == 0] = 34  # dim background: 34 * sqrt(3) = 58.9 <= 60
    noisy[5, 40], noisy[5, 50] = (60, 0, 0), (0, 60, 0)  # exactly 60: not foreground
    ok, objects, reason = evaluate.judge_detailed(noisy, caption)
    assert ok, reason
    for blob in ((slice(30, 33), slice(30, 34)),  # a 12-pixel component is an object
                 (slice(5, 8), slice(42, 46))):
        worse = noisy.copy()
        worse[blob] = 200
        ok, objects, reason = evaluate.judge_detailed(worse, caption)
        assert not ok and len(objects) == 3 and "found 3 object(s)" in reason
    worse = noisy.copy()
    worse[5, 40:52] = (61, 0, 0)  # 61 > 60: twelve foreground pixels in a row
    assert not evaluate.judge(worse, caption)


def test_judge_reports_and_refuses_bad_input():
    image = shapes.render(Scene((SceneObject("red", "circle", "small", (1, 1)),)))
    ok, objects, reason = evaluate.judge_detailed(image, "a large red circle in the center")
    assert not ok and "size is small, not large" in reason
    ok, _, reason = evaluate.judge_detailed(image, "a red square on the left")
    assert not ok and "shape is circle, not square" in reason and "cell is (1, 1)" in reason
    assert evaluate.miss_kinds(reason) == ["shape", "cell"]
    assert evaluate.miss_kinds(evaluate.judge_detailed(image, "two red circles")[2]) == ["object count"]
    two = shapes.render(Scene((SceneObject("red", "circle", "small", (1, 1)),
                               SceneObject("blue", "square", "small", (0, 1)))))
    reason = evaluate.judge_detailed(two, "a red circle above a blue square")[2]
    assert evaluate.miss_kinds(reason) == ["relation"]
    reason = evaluate.judge_detailed(two, "a green circle below a blue square")[2]
    assert evaluate.miss_kinds(reason) == ["colour"]
    assert evaluate.miss_kinds("ok") == []
    with pytest.raises(ValueError, match="cannot parse caption"):
        evaluate.judge(image, "a red circle please")
    with pytest.raises(ValueError, match="uint8"):
        evaluate.judge(image.astype(np.float32), "a red circle")
    with pytest.raises(ValueError, match="shape"):
        evaluate.judge(image[:32], "a red circle")
    scores = evaluate.task_accuracy(np.stack([image, image * 0]),
                                    ["a red circle", "a small red circle"])
    assert scores == {"one_object": 1.0, "size": 0.0, "overall": 0.5}


def test_cli_data_shapes_writes_the_folder_format(tmp_path):
    """`dalle-mini-jax data shapes` writes exactly what `write_folder` writes."""
    from dalle_mini_jax import cli

    assert cli.main(["data", "shapes", "--out", str(tmp_path / "cli"), "--num", "5", "--seed", "3"]) == 0
    shapes.write_folder(tmp_path / "lib", 5, 3)
    names = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "lib").iterdir())
    assert len(names) == 10
    for name in names:
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "lib" / name).read_bytes()
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "shapes", "--out", str(tmp_path / "bad"), "--num", "-1"])
    assert e.value.code != 0


def test_canvas_enlarged_by_nearest_neighbour_comes_back_exactly():
    """`from_canvas` / `to_canvas`: the round trip is exact at any larger side, colours stay
    the palette's, and at 96 every object (jitter and size included) lies inside its
    cell's 32 x 32 patch: what the cell VQGAN's one code per cell relies on."""
    images, _ = shapes.generate_arrays(64, seed=7)
    for side in (64, 96, 128, 200):
        big = shapes.from_canvas(images, side)
        assert big.shape == (64, side, side, 3)
        np.testing.assert_array_equal(shapes.to_canvas(big), images)
    big = shapes.from_canvas(images, 96)
    assert set(map(tuple, big.reshape(-1, 3))) <= set(map(tuple, images.reshape(-1, 3)))
    for r, c, size, shape in itertools.product(range(3), range(3), shapes.SIZES, shapes.SHAPES):
        for jitter in itertools.product((-1, 0, 1), repeat=2):
            one = shapes.render(Scene((SceneObject("white", shape, size, (r, c), jitter),)))
            lit = np.argwhere(shapes.from_canvas(one, 96).any(-1))
            assert len(lit) and (lit // 32 == (r, c)).all(), (r, c, size, shape, jitter)
    with pytest.raises(ValueError, match="side"):
        shapes.to_canvas(images[:, :32, :32])
