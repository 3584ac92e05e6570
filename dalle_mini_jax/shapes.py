"""The built-in captioned "shapes" set (specs/shapes-v1.md): grammar, scenes, rasteriser.

Every caption states facts a program can check in the pixels (`evaluate.py` is the judge),
so this module keeps three things apart:

- the *caption grammar*: a `CaptionSpec` (what a caption requires), `caption_for` (spec ->
  text), `parse_caption` (text -> spec, the exact inverse) and `sample_caption` (draw a
  spec, tagged with the task it tests);
- the *scene*: a `Scene` of `SceneObject`s (colour, shape, size, cell, jitter) that
  realises a caption (`sample_scene`), and `describe` (a scene -> its fullest caption);
- the *rasteriser*: `shape_mask` + `box_origin` + `draw` + `render`. The judge redraws the
  four shapes at a detected object's extent and centre with these very functions, so what
  the generator draws and what the judge expects can never drift apart.

Rasterisation (flat colours, no anti-aliasing). A shape of extent s is drawn into an s x s
pixel box, so its bounding box is exactly s x s:
- box placement: centre (cx, cy) may be integer or half-integer; the box's first column is
  x0 = floor(cx - (s - 1) / 2) (likewise y0). When the parity of s and cx disagree (s even
  at an integer centre, as for every generated object) the box sits half a pixel up/left
  of the centre. The centre of a bounding box x0..x1 is (x0 + x1) / 2, which gives back
  x0 exactly, so redrawing at a detected bbox reproduces the generator's pixels.
- inside the box, pixel (row i, column j) has its centre at (j + 1/2, i + 1/2) in box
  units, the box spanning [0, s] x [0, s]:
  - square: every pixel.
  - circle: pixels whose centre lies in the closed disc of diameter s centred in the box,
    (2j + 1 - s)^2 + (2i + 1 - s)^2 <= s^2. The middle row/column always reaches the box
    edge, so the extent is s.
  - triangle (apex up): row i keeps the pixels whose centre lies within the triangle's
    width at the row's *lower* edge, |2j + 1 - s| <= i + 1. The top row thus has 1 pixel
    (s odd) or 2 (s even) and the bottom row all s: height and width are both s.
  - cross: two bars of thickness t = round(s / 3) (at least 1), each spanning the box, on
    rows/columns floor((s - t) / 2) .. floor((s - t) / 2) + t - 1 (half a pixel up/left of
    the middle when parities disagree, as for the box).
All tests are integer arithmetic, so the masks are exact.

Determinism. Sample i of a data set is drawn from `np.random.default_rng((seed, i))` and
depends on nothing else, so a set can be made in pieces (`start=`) or in parallel.

Task categories (one per caption, decided from its structure by `task_of`; they partition
the grammar, GenEval-style) and the proportions `sample_caption` draws them with:

| task              | caption                                                   | share |
|-------------------|-----------------------------------------------------------|-------|
| one_object        | one phrase, no size, no position                          |  10 % |
| size              | one phrase with a size, no position                       |  10 % |
| position          | one phrase with a position (size stated half the time)    |  15 % |
| two_objects       | two phrases joined by `and`, same colour                  |  10 % |
| colour            | two phrases joined by `and`, same shape, colours differ   |  10 % |
| attribute_binding | two phrases joined by `and`, colours and shapes differ    |  10 % |
| three_objects     | three phrases joined by `and`                             |  10 % |
| relation          | `<A> above/below/left of/right of <B>`                    |  15 % |
| counting          | `two/three [size] <colour> <shape>s`                      |  10 % |

So forms: single phrase 35 %, `and` 40 %, relation 15 %, count 10 %; scenes hold one
object 35 %, two 50 %, three 15 %. The sampler makes `two_objects` captions with two
different shapes (a same-colour same-shape pair is the counting task's business), though
`task_of` files any same-colour pair there. Within `and` captions each phrase states its
size with probability 0.4 and its position with probability 0.4; relation phrases state
their size with probability 0.4 (they never carry a position); counts state the size half
the time. Every caption form and every omission therefore occurs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence

import numpy as np

# --------------------------------------------------------------------------------------
# The spec's constants
# --------------------------------------------------------------------------------------

CANVAS_SIZE = 64  # width = height of every image, pixels
GRID_SIZE = 3  # cells per row and per column
CELL_CENTRES = tuple(11 + 21 * k for k in range(GRID_SIZE))  # x of column k = y of row k
MAX_JITTER = 1  # an object's centre moves by up to this many pixels in x and in y

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "cyan": (40, 205, 215),
    "white": (235, 235, 235),
}
COLOUR_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.uint8)  # [8, 3]

# Order matters only to break exact IoU ties in the judge (the first wins).
SHAPES = ("square", "circle", "triangle", "cross")
PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles",
           "cross": "crosses"}

SIZES: dict[str, int] = {"small": 10, "large": 18}  # size name -> extent in pixels
SIZE_NAMES = tuple(SIZES)

POSITION_PHRASES: dict[tuple[int, int], str] = {  # cell (row, col) -> phrase
    (0, 0): "in the top left", (0, 1): "at the top", (0, 2): "in the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "in the bottom left", (2, 1): "at the bottom", (2, 2): "in the bottom right",
}
CELLS = tuple(POSITION_PHRASES)  # the 9 cells in row-major order

RELATIONS = ("above", "below", "left of", "right of")
COUNT_WORDS = {2: "two", 3: "three"}

FORMS = ("single", "and", "relation", "count")  # the spec's caption forms 1..4

# Task -> share of sampled captions (module docstring has the definitions).
TASK_WEIGHTS: dict[str, float] = {
    "one_object": 0.10,
    "size": 0.10,
    "position": 0.15,
    "two_objects": 0.10,
    "colour": 0.10,
    "attribute_binding": 0.10,
    "three_objects": 0.10,
    "relation": 0.15,
    "counting": 0.10,
}
TASKS = tuple(TASK_WEIGHTS)

# Named task mixes for *training* sets (`sample(..., mix=)`, `shapes:N:SEED:LAYOUT:MIX`):
# the captions stay the spec's grammar, only how often each task is drawn changes. The
# benchmark always draws every task equally (`evaluate.benchmark_prompts`).
TASK_MIXES: dict[str, dict[str, float]] = {
    "spec": TASK_WEIGHTS,
    # Captions that name two or three objects (relations and counts included) 88 % of the
    # time instead of 65 %, single objects 12 % instead of 35 %: the single-object tasks are learnt early (0.96-0.97 for the fourth bundled model) and
    # are part of every multi-object scene anyway; binding each phrase's colour and shape
    # to its own object is what a fixed CPU budget runs out on (BUNDLED.md).
    "multi": {
        "one_object": 0.03,
        "size": 0.03,
        "position": 0.06,
        "two_objects": 0.13,
        "colour": 0.13,
        "attribute_binding": 0.15,
        "three_objects": 0.17,
        "relation": 0.17,
        "counting": 0.13,
    },
    # "multi", but with position captions kept near the spec's share: with "multi" the
    # single-object position task fell from 0.97 to 0.79 (BUNDLED.md).
    "multi_position": {
        "one_object": 0.04,
        "size": 0.04,
        "position": 0.12,
        "two_objects": 0.12,
        "colour": 0.12,
        "attribute_binding": 0.14,
        "three_objects": 0.14,
        "relation": 0.15,
        "counting": 0.13,
    },
    # "multi_position" with three-object captions at 0.28 (0.14 there), the share taken
    # from the tasks that a model trained on "multi_position" (with image-token rows from
    # the VQGAN) already passed at 0.98-1.00 while three objects stood at 0.35; the seventh
    # bundled model was trained on this mix (BUNDLED.md).
    "multi_three": {
        "one_object": 0.04,
        "size": 0.04,
        "position": 0.10,
        "two_objects": 0.08,
        "colour": 0.09,
        "attribute_binding": 0.10,
        "three_objects": 0.28,
        "relation": 0.15,
        "counting": 0.12,
    },
}

# Not a task mix: `sample(..., mix=GRID_MIX)` (`shapes:N:SEED:LAYOUT:grid`) draws images
# for training a VQGAN that codes each cell alone (the cell VQGAN, `VQGANConfig.patch_codes`):
# every cell holds an object with chance P_GRID_OBJECT, all attributes uniform, and the
# caption is the fullest description, up to 9 phrases: beyond the grammar's 3, so never a
# transformer's training set. Why: the spec's scenes hold 1.8 objects on average, so 80 %
# of the cells a VQGAN sees are empty; a filled grid (6.75 objects) shows it ~3.7x as many
# objects a step (`python benchmarks/code_rows.py` prints these means).
GRID_MIX = "grid"
P_GRID_OBJECT = 0.75
MIXES = (*TASK_MIXES, GRID_MIX)  # what `sample`'s mix (and a shapes source's MIX) may be

P_SIZE_IN_LIST = 0.4  # each `and` / relation phrase states its size with this chance
P_POSITION_IN_LIST = 0.4  # each `and` phrase states its position with this chance
P_SIZE_SINGLE = 0.5  # a `position` caption / a count states its size with this chance


# --------------------------------------------------------------------------------------
# Rasteriser: the one definition of how a shape looks, shared with the judge
# --------------------------------------------------------------------------------------


def cross_thickness(extent: int) -> int:
    """Bar thickness of a cross of the given extent: round(s / 3), at least 1 pixel."""
    # s/3 never ends in .5, so floor(s/3 + 1/2) = (2s + 3) // 6 is the one rounding there is.
    return max(1, (2 * extent + 3) // 6)


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, extent: int) -> np.ndarray:
    """The pixels of `shape` inside its extent x extent box (rules in the module doc).

    Args:
      shape: one of `SHAPES`.
      extent: s, the side of the bounding box in pixels (>= 1).

    Returns:
      bool [s, s], read-only (cached: the judge asks for the same masks again and again).
      Its bounding box is exactly s x s.
    """
    s = int(extent)
    if s < 1:
        raise ValueError(f"extent must be >= 1, got {extent}")
    i = np.arange(s)[:, None]  # row
    j = np.arange(s)[None, :]  # column
    if shape == "square":
        mask = np.ones((s, s), bool)
    elif shape == "circle":
        mask = (2 * j + 1 - s) ** 2 + (2 * i + 1 - s) ** 2 <= s * s
    elif shape == "triangle":
        mask = np.abs(2 * j + 1 - s) <= i + 1
    elif shape == "cross":
        t = cross_thickness(s)
        first = (s - t) // 2
        bar = (np.arange(s) >= first) & (np.arange(s) < first + t)
        mask = bar[:, None] | bar[None, :]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask = np.ascontiguousarray(mask)
    mask.flags.writeable = False
    return mask


def box_origin(centre, extent):
    """Top-left pixel of the extent-sized box centred at `centre` (x0 = floor(c - (s-1)/2)).

    Args:
      centre: a coordinate (x or y), integer or half-integer; scalar or array.
      extent: s, scalar or array broadcasting with `centre`.

    Returns:
      int (or int array): the box's first column (or row).
    """
    # Half-integers are exact in binary floating point, so floor() never sees round-off.
    origin = np.floor(np.asarray(centre, np.float64) - (np.asarray(extent) - 1) / 2)
    return origin.astype(np.int64) if origin.ndim else int(origin)


def draw(canvas: np.ndarray, shape: str, extent: int, centre: tuple[float, float],
         colour) -> np.ndarray:
    """Paints one flat shape onto `canvas` in place (clipped at the canvas edges).

    Args:
      canvas: uint8 [H, W, 3], modified in place.
      shape: one of `SHAPES`.
      extent: side of the shape's bounding box, pixels.
      centre: (x, y), integer or half-integer.
      colour: a colour name or an RGB triple.

    Returns:
      `canvas`, for chaining.
    """
    rgb = COLOURS[colour] if isinstance(colour, str) else tuple(colour)
    mask = shape_mask(shape, extent)
    x0, y0 = box_origin(centre[0], extent), box_origin(centre[1], extent)
    h, w = canvas.shape[:2]
    # Clip the box to the canvas; the mask is cut the same way.
    ya, yb, xa, xb = max(y0, 0), min(y0 + extent, h), max(x0, 0), min(x0 + extent, w)
    if ya < yb and xa < xb:
        sub = mask[ya - y0:yb - y0, xa - x0:xb - x0]
        canvas[ya:yb, xa:xb][sub] = rgb
    return canvas


# --------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One drawn object.

    Attributes:
      colour: a name in `COLOURS`.
      shape: a name in `SHAPES`.
      size: a name in `SIZES`.
      cell: (row, col), each in 0..2.
      jitter: (dx, dy), each in -1..1, added to the cell centre.
    """

    colour: str
    shape: str
    size: str
    cell: tuple[int, int]
    jitter: tuple[int, int] = (0, 0)

    @property
    def extent(self) -> int:
        return SIZES[self.size]

    @property
    def centre(self) -> tuple[int, int]:
        """(x, y) of the object's centre, pixels."""
        r, c = self.cell
        return CELL_CENTRES[c] + self.jitter[0], CELL_CENTRES[r] + self.jitter[1]


@dataclasses.dataclass(frozen=True)
class Scene:
    """The objects of one image, each in its own cell (the caption's order)."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self):
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {cells}")


def render(scene: Scene) -> np.ndarray:
    """Draws a scene.

    Returns:
      uint8 [64, 64, 3]: black canvas with each object drawn flat.
    """
    canvas = np.zeros((CANVAS_SIZE, CANVAS_SIZE, 3), np.uint8)
    for obj in scene.objects:
        draw(canvas, obj.shape, obj.extent, obj.centre, obj.colour)
    return canvas


# --------------------------------------------------------------------------------------
# Caption grammar: spec <-> text
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Phrase:
    """An object phrase: what a caption requires of one object (None = not stated).

    Attributes:
      colour: a name in `COLOURS`.
      shape: a name in `SHAPES`.
      size: a name in `SIZES`, or None when the caption omits it.
      cell: (row, col), or None when the caption omits the position.
    """

    colour: str
    shape: str
    size: str | None = None
    cell: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class CaptionSpec:
    """The structured content of a caption: its form and its object phrases.

    Attributes:
      form: one of `FORMS`: 'single' (1 phrase), 'and' (2 or 3 phrases), 'relation'
        (phrases A, B without positions, plus `relation`), 'count' (1 phrase without
        position, plus `count`).
      phrases: the object phrases in caption order.
      relation: for 'relation', one of `RELATIONS` (A <relation> B); else None.
      count: for 'count', 2 or 3; else None.
    """

    form: str
    phrases: tuple[Phrase, ...]
    relation: str | None = None
    count: int | None = None

    def __post_init__(self):
        n = len(self.phrases)
        ok = {
            "single": n == 1,
            "and": n in (2, 3),
            "relation": n == 2 and self.relation in RELATIONS,
            "count": n == 1 and self.count in COUNT_WORDS,
        }.get(self.form)
        if not ok:
            raise ValueError(f"inconsistent caption spec: {self!r}")
        if (self.form == "relation") != (self.relation is not None):
            raise ValueError(f"relation given for form {self.form!r}")
        if (self.form == "count") != (self.count is not None):
            raise ValueError(f"count given for form {self.form!r}")
        if self.form in ("relation", "count") and any(p.cell is not None
                                                      for p in self.phrases):
            raise ValueError(f"{self.form} phrases carry no position: {self!r}")
        for p in self.phrases:
            if (p.colour not in COLOURS or p.shape not in SHAPES
                    or p.size not in (None, *SIZES) or p.cell not in (None, *CELLS)):
                raise ValueError(f"unknown attribute in {p!r}")

    @property
    def objects(self) -> tuple[Phrase, ...]:
        """One phrase per object the image must hold (a count repeats its phrase)."""
        return self.phrases * (self.count or 1)

    @property
    def task(self) -> str:
        return task_of(self)

    @property
    def text(self) -> str:
        return caption_for(self)


def task_of(spec: CaptionSpec) -> str:
    """The task category a caption tests (definitions in the module docstring)."""
    if spec.form == "count":
        return "counting"
    if spec.form == "relation":
        return "relation"
    if spec.form == "single":
        phrase = spec.phrases[0]
        if phrase.cell is not None:
            return "position"
        return "size" if phrase.size is not None else "one_object"
    if len(spec.phrases) == 3:
        return "three_objects"
    a, b = spec.phrases
    if a.colour != b.colour:
        return "attribute_binding" if a.shape != b.shape else "colour"
    return "two_objects"


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _phrase_text(phrase: Phrase) -> str:
    words = ([phrase.size] if phrase.size else []) + [phrase.colour, phrase.shape]
    if phrase.cell is not None:
        words.append(POSITION_PHRASES[phrase.cell])
    return " ".join([_article(words[0])] + words)


def caption_for(spec: CaptionSpec) -> str:
    """The caption text of a spec (lower case, no full stop), e.g. 'an orange cross on the
    right', 'a blue square and a small white cross in the bottom right'."""
    if spec.form == "count":
        p = spec.phrases[0]
        words = [COUNT_WORDS[spec.count]] + ([p.size] if p.size else [])
        return " ".join(words + [p.colour, PLURALS[p.shape]])
    joiner = f" {spec.relation} " if spec.form == "relation" else " and "
    return joiner.join(_phrase_text(p) for p in spec.phrases)


_POSITION_WORDS = {tuple(text.split()): cell for cell, text in POSITION_PHRASES.items()}
_SHAPE_OF_PLURAL = {plural: shape for shape, plural in PLURALS.items()}
_COUNT_OF_WORD = {word: n for n, word in COUNT_WORDS.items()}
_RELATION_WORDS = {tuple(r.split()): r for r in RELATIONS}


class _Words:
    """A cursor over the words of a caption, for the recursive-descent parser."""

    def __init__(self, text: str):
        self.text, self.words, self.pos = text, text.split(), 0

    def peek(self, n: int = 1) -> tuple[str, ...]:
        return tuple(self.words[self.pos:self.pos + n])

    def take(self, n: int = 1) -> tuple[str, ...]:
        got = self.peek(n)
        self.pos += len(got)
        return got

    def expect(self, allowed, expected: str) -> str:
        """Takes the next word if it is in `allowed`, else raises naming `expected`."""
        if not self.peek() or self.peek()[0] not in allowed:
            raise self.fail(expected)
        return self.take()[0]

    def done(self) -> bool:
        return self.pos == len(self.words)

    def fail(self, expected: str) -> ValueError:
        seen = " ".join(self.peek(3)) or "the end"
        return ValueError(f"cannot parse caption {self.text!r}: expected {expected} "
                          f"at word {self.pos + 1} ({seen!r})")


def _parse_phrase(w: _Words) -> Phrase:
    article = w.expect(("a", "an"), "'a' or 'an'")
    if w.peek() and article != _article(w.peek()[0]):
        raise w.fail(f"'{_article(w.peek()[0])}' as the article before {w.peek()[0]!r}")
    size = w.take()[0] if w.peek() and w.peek()[0] in SIZES else None
    colour = w.expect(COLOURS, f"a size or colour {SIZE_NAMES + COLOUR_NAMES}"
                      if size is None else f"a colour {COLOUR_NAMES}")
    shape = w.expect(SHAPES, f"a shape {SHAPES}")
    cell = next((c for words, c in _POSITION_WORDS.items()
                 if w.peek(len(words)) == words), None)
    if cell is not None:
        w.take(len(POSITION_PHRASES[cell].split()))
    return Phrase(colour, shape, size, cell)


def parse_caption(text: str) -> CaptionSpec:
    """Parses a caption of the grammar into its spec; the inverse of `caption_for`.

    Words may be separated by any whitespace; everything else must be exactly as the spec
    writes it (lower case, no full stop, the right article, no position inside a relation).

    Raises:
      ValueError: naming the first word that does not fit the grammar.
    """
    w = _Words(text)
    if w.peek() and w.peek()[0] in _COUNT_OF_WORD:  # form 4: a count
        count = _COUNT_OF_WORD[w.take()[0]]
        size = w.take()[0] if w.peek() and w.peek()[0] in SIZES else None
        colour = w.expect(COLOURS, f"a colour {COLOUR_NAMES}")
        plural = w.expect(_SHAPE_OF_PLURAL, f"a plural shape {tuple(_SHAPE_OF_PLURAL)}")
        if not w.done():
            raise w.fail("the end of a count caption")
        return CaptionSpec("count", (Phrase(colour, _SHAPE_OF_PLURAL[plural], size),),
                           count=count)

    phrases = [_parse_phrase(w)]
    relation = next((r for words, r in _RELATION_WORDS.items()
                     if w.peek(len(words)) == words), None)
    if relation is not None:  # form 3: A <relation> B
        w.take(len(relation.split()))
        phrases.append(_parse_phrase(w))
        if not w.done():
            raise w.fail("the end of a relation caption")
        if any(p.cell is not None for p in phrases):
            raise ValueError(f"cannot parse caption {text!r}: the phrases of a relation "
                             "carry no position")
        return CaptionSpec("relation", tuple(phrases), relation=relation)
    while w.peek() == ("and",):  # forms 1 and 2
        w.take()
        phrases.append(_parse_phrase(w))
    if not w.done():
        raise w.fail("'and', a relation or the end")
    if len(phrases) > 3:
        raise ValueError(f"cannot parse caption {text!r}: at most 3 objects, "
                         f"got {len(phrases)}")
    cells = [p.cell for p in phrases if p.cell is not None]
    if len(set(cells)) != len(cells):
        raise ValueError(f"cannot parse caption {text!r}: two objects in one cell")
    return CaptionSpec("single" if len(phrases) == 1 else "and", tuple(phrases))


# --------------------------------------------------------------------------------------
# Sampling: captions (tagged with their task), then a scene that realises one
# --------------------------------------------------------------------------------------


def _mix_weights(mix: str) -> dict[str, float]:
    if mix not in TASK_MIXES:
        raise ValueError(f"unknown task mix {mix!r}; expected one of {', '.join(TASK_MIXES)}")
    return TASK_MIXES[mix]


def _choice(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _two_distinct(rng: np.random.Generator, options: Sequence) -> tuple:
    a, b = rng.choice(len(options), size=2, replace=False)
    return options[int(a)], options[int(b)]


def sample_caption(rng: np.random.Generator, task: str | None = None,
                   mix: str = "spec") -> CaptionSpec:
    """Draws a caption spec from the grammar.

    Args:
      rng: the randomness.
      task: a name in `TASKS` to draw a caption of that task, or None to draw the task
        with the proportions of `mix`.
      mix: a name in `TASK_MIXES` ("spec": `TASK_WEIGHTS`). Any mix uses the same random
        draws, so a caption's task is the only thing a mix changes directly.

    Returns:
      A `CaptionSpec` whose `task` is `task` (when given).
    """
    if task is None:
        weights = _mix_weights(mix)
        task = TASKS[int(rng.choice(len(TASKS), p=[weights[t] for t in TASKS]))]
    if task not in TASK_WEIGHTS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")

    def size(p: float) -> str | None:
        return _choice(rng, SIZE_NAMES) if rng.random() < p else None

    def colour_shape() -> tuple[str, str]:
        return _choice(rng, COLOUR_NAMES), _choice(rng, SHAPES)

    if task in ("one_object", "size", "position"):
        colour, shape = colour_shape()
        if task == "one_object":
            return CaptionSpec("single", (Phrase(colour, shape),))
        if task == "size":
            return CaptionSpec("single", (Phrase(colour, shape, size(1.0)),))
        return CaptionSpec("single", (Phrase(colour, shape, size(P_SIZE_SINGLE),
                                             _choice(rng, CELLS)),))
    if task == "counting":
        colour, shape = colour_shape()
        count = int(rng.integers(2, 4))
        return CaptionSpec("count", (Phrase(colour, shape, size(P_SIZE_SINGLE)),),
                           count=count)
    if task == "relation":
        phrases = tuple(Phrase(*colour_shape(), size(P_SIZE_IN_LIST)) for _ in range(2))
        return CaptionSpec("relation", phrases, relation=_choice(rng, RELATIONS))

    # `and` captions: pick colours and shapes for the task, then sizes and positions.
    if task == "three_objects":
        pairs = [colour_shape() for _ in range(3)]
    else:
        if task == "two_objects":  # same colour, two shapes
            colour = _choice(rng, COLOUR_NAMES)
            pairs = [(colour, s) for s in _two_distinct(rng, SHAPES)]
        elif task == "colour":  # same shape, two colours
            shape = _choice(rng, SHAPES)
            pairs = [(c, shape) for c in _two_distinct(rng, COLOUR_NAMES)]
        else:  # attribute_binding: both differ
            pairs = list(zip(_two_distinct(rng, COLOUR_NAMES), _two_distinct(rng, SHAPES)))
    cells = [CELLS[int(k)] for k in rng.choice(len(CELLS), size=len(pairs), replace=False)]
    phrases = tuple(
        Phrase(colour, shape, size(P_SIZE_IN_LIST),
               cell if rng.random() < P_POSITION_IN_LIST else None)
        for (colour, shape), cell in zip(pairs, cells))
    return CaptionSpec("and", phrases)


def relation_holds(relation: str, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether the object in cell `a` is `relation` the object in cell `b`.

    'above': a's row is smaller than b's (any columns); 'below': larger; 'left of': a's
    column is smaller (any rows); 'right of': larger.
    """
    (ra, ca), (rb, cb) = a, b
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    return {"above": ra < rb, "below": ra > rb,
            "left of": ca < cb, "right of": ca > cb}[relation]


LAYOUTS = ("free", "reading", "centred", "reading_centred")  # how `sample_scene` places objects
_CENTRED_LAYOUTS = ("centred", "reading_centred")  # the layouts that drop the jitter


def sample_scene(rng: np.random.Generator, spec: CaptionSpec, layout: str = "free") -> Scene:
    """Draws a scene that satisfies a caption: what the caption omits is drawn uniformly.

    Omitted sizes are uniform over small/large, unstated cells uniform over the free cells
    (for a relation: uniform over the cell pairs that satisfy it), jitter uniform in -1..1.

    Args:
      rng: the randomness.
      spec: the caption to realise.
      layout: "free" (the spec's set, above) or "reading": the same set of cells for the
        phrases that state none, handed out to them in reading (row-major) order, so that
        among those phrases the one named first is drawn first. A model trained on it
        learns "the k-th unplaced object I draw is the k-th such phrase" instead of having
        to tell, from what it has drawn, which phrase is still missing. The caption and
        every other draw are the same as with "free" (the same random numbers are used).
        Or "centred": "free" with every jitter 0 (the same draws, the jitter dropped),
        and "reading_centred" both. Every centred image is still an image of the spec (a
        jitter "may" be there); the cell VQGAN is trained on them and the bundled
        transformer's training images are encoded from them: a cell then holds one of
        65 things, not 577 (training/configs/vqgan_shapes.py:cells says what it bought).

    Returns:
      A `Scene` with one object per `spec.objects`, in that order.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    phrases = spec.objects
    if spec.form == "relation":
        pairs = [(a, b) for a in CELLS for b in CELLS
                 if a != b and relation_holds(spec.relation, a, b)]
        cells = list(pairs[int(rng.integers(len(pairs)))])
    else:
        stated = [p.cell for p in phrases if p.cell is not None]
        free = [c for c in CELLS if c not in stated]
        unplaced = sum(p.cell is None for p in phrases)
        picked = [free[int(k)] for k in rng.permutation(len(free))[:unplaced]]
        if layout in ("reading", "reading_centred"):
            picked.sort()  # CELLS are (row, col): tuple order is reading order
        picks = iter(picked)
        cells = [p.cell if p.cell is not None else next(picks) for p in phrases]
    objects = []
    for phrase, cell in zip(phrases, cells):
        size = phrase.size or _choice(rng, SIZE_NAMES)
        jitter = tuple(int(d) for d in rng.integers(-MAX_JITTER, MAX_JITTER + 1, size=2))
        if layout in _CENTRED_LAYOUTS:
            jitter = (0, 0)
        objects.append(SceneObject(phrase.colour, phrase.shape, size, cell, jitter))
    return Scene(tuple(objects))


def describe(scene: Scene) -> CaptionSpec:
    """The fullest caption of a scene: every object's size and position stated."""
    phrases = tuple(Phrase(o.colour, o.shape, o.size, o.cell) for o in scene.objects)
    return CaptionSpec("single" if len(phrases) == 1 else "and", phrases)


# --------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------


def sample(seed: int, index: int, layout: str = "free", mix: str = "spec"
           ) -> tuple[Scene, CaptionSpec]:
    """Sample `index` of the set with this seed; it depends on (seed, index) only.

    `layout` is `sample_scene`'s: "reading" gives the same caption with the unplaced
    objects in reading order. `mix` is `sample_caption`'s task mix (a training set's
    choice; "spec" is the spec's set)."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    if mix == GRID_MIX:
        raise ValueError("a grid image has no caption spec (up to 9 objects): use generate")
    rng = np.random.default_rng((seed, index))
    spec = sample_caption(rng, mix=mix)
    return sample_scene(rng, spec, layout), spec


def grid_scene(seed: int, index: int, layout: str = "centred") -> Scene:
    """Image `index` of the filled-grid set with this seed (`GRID_MIX`): each cell holds
    an object with chance P_GRID_OBJECT (at least one object), colour, shape and size
    uniform, jittered unless `layout` is a centred one."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    # (seed, 9_999, index): no caption set (seed, index), benchmark caption (seed, task, k)
    # or ceiling image (seed, 7_777, k, j) draws from this stream.
    rng = np.random.default_rng((seed, 9_999, index))
    filled = [c for c in CELLS if rng.random() < P_GRID_OBJECT] or [_choice(rng, CELLS)]
    objects = []
    for cell in filled:
        colour, shape, size = _choice(rng, COLOUR_NAMES), _choice(rng, SHAPES), _choice(rng, SIZE_NAMES)
        jitter = tuple(int(d) for d in rng.integers(-MAX_JITTER, MAX_JITTER + 1, size=2))
        objects.append(SceneObject(colour, shape, size, cell,
                                   (0, 0) if layout in _CENTRED_LAYOUTS else jitter))
    return Scene(tuple(objects))


def generate(num: int, seed: int, start: int = 0, layout: str = "free", mix: str = "spec"
             ) -> Iterator[tuple[np.ndarray, str]]:
    """Yields samples start .. start + num - 1 of the set with this seed (layout, mix).

    Yields:
      (image uint8 [64, 64, 3], caption str).
    """
    for index in range(start, start + num):
        if mix == GRID_MIX:  # beyond the grammar (up to 9 phrases): for a cell VQGAN only
            scene = grid_scene(seed, index, layout)
            phrases = (Phrase(o.colour, o.shape, o.size, o.cell) for o in scene.objects)
            yield render(scene), " and ".join(_phrase_text(p) for p in phrases)
            continue
        scene, spec = sample(seed, index, layout, mix)
        yield render(scene), caption_for(spec)


def generate_arrays(num: int, seed: int, start: int = 0, layout: str = "free"
                    ) -> tuple[np.ndarray, list[str]]:
    """Like `generate`, stacked: (images uint8 [num, 64, 64, 3], captions)."""
    images = np.zeros((num, CANVAS_SIZE, CANVAS_SIZE, 3), np.uint8)
    captions = []
    for k, (image, caption) in enumerate(generate(num, seed, start, layout)):
        images[k] = image
        captions.append(caption)
    return images, captions


def _nearest(images: np.ndarray, side: int) -> np.ndarray:
    """Square images [..., R, R, 3] -> [..., side, side, 3] by nearest neighbour: output
    row/column j reads input floor((j + 0.5) * R / side)."""
    rows = ((np.arange(side) + 0.5) * images.shape[-2] / side).astype(np.int64)
    return images[..., rows, :, :][..., :, rows, :]


def from_canvas(images: np.ndarray, side: int) -> np.ndarray:
    """Canvas images [..., 64, 64, 3] enlarged to [..., side, side, 3] by nearest neighbour.

    For a model that works at a larger side than the canvas (the cell VQGAN: 96, so that
    each cell of the 3 x 3 grid is one 32 x 32 patch). Nearest, not an interpolating
    filter: the colours stay the palette's, and `to_canvas` gives the canvas back exactly.
    """
    if side < CANVAS_SIZE:
        raise ValueError(f"from_canvas enlarges; side {side} < {CANVAS_SIZE}")
    return _nearest(images, side)


def to_canvas(images: np.ndarray) -> np.ndarray:
    """Images [..., R, R, 3] with R >= 64 -> the canvas, [..., 64, 64, 3], by nearest
    neighbour: the exact inverse of `from_canvas`, and what the judge reads of a model
    that draws at a larger side."""
    side = images.shape[-2]
    if side < CANVAS_SIZE or images.shape[-3] != side:
        raise ValueError(f"to_canvas takes square images of side >= {CANVAS_SIZE}, "
                         f"got {images.shape}")
    return _nearest(images, CANVAS_SIZE)


def file_stem(index: int) -> str:
    """Name (without suffix) of sample `index` in a folder: 6-digit zero-padded."""
    return f"{index:06d}"


def write_folder(out_dir: str | os.PathLike, num: int, seed: int, start: int = 0) -> None:
    """Writes samples start .. start + num - 1 as `<out_dir>/<i:06d>.png` + `.txt` pairs.

    The .txt file holds exactly the caption, UTF-8, no trailing newline. Pieces written
    with different `start`s into one folder make the same folder as one call.
    """
    from PIL import Image  # only this function needs pillow

    os.makedirs(out_dir, exist_ok=True)
    for index, (image, caption) in zip(range(start, start + num),
                                       generate(num, seed, start)):
        stem = os.path.join(out_dir, file_stem(index))
        Image.fromarray(image).save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as f:
            f.write(caption)


__all__ = [
    "CANVAS_SIZE", "CELL_CENTRES", "CELLS", "COLOURS", "COLOUR_NAMES", "PALETTE",
    "LAYOUTS", "MIXES", "GRID_MIX", "grid_scene", "SHAPES", "SIZES", "POSITION_PHRASES", "RELATIONS", "FORMS", "TASKS", "TASK_WEIGHTS",
    "cross_thickness", "shape_mask", "box_origin", "draw", "render",
    "SceneObject", "Scene", "Phrase", "CaptionSpec", "task_of", "caption_for",
    "parse_caption", "sample_caption", "sample_scene", "relation_holds", "describe",
    "sample", "generate", "generate_arrays", "from_canvas", "to_canvas", "file_stem",
    "write_folder",
]
