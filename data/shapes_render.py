"""Procedural shapes scenes: objects with known shape, color and position, plus the text that describes them.

One scene is drawn deterministically from `np.random.default_rng((seed, split_code, index))`, so the same
arguments always give the same image, caption, questions and edits. Shapes never touch (a 2-pixel gap), are
drawn without antialiasing in exact colors, and the optional word is black on white, so counts, colors and
positions can be re-derived from the pixels (see tests/data/test_shapes.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (235, 200, 20), "purple": (140, 50, 170), "orange": (245, 130, 20),
}
BACKGROUND = (255, 255, 255)
# Multiples of 16 so every side is a multiple of both patch sizes in use (8 and 16).
SIDES = (32, 48, 64, 80, 96, 112, 128)
WORDS = ("cat", "dog", "sun", "tree", "map", "box", "sky", "fish", "moon", "star", "book", "car", "hat",
         "cup", "pen", "jam", "owl", "kite")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
GAP = 2  # pixels between object boxes, so 8-connected components never merge
FONT_SIZE = 12


@dataclasses.dataclass(frozen=True)
class SceneSpec:
  """What scenes a dataset draws: canvas sides, how many objects, how large, how often a word."""
  sides: tuple[int, ...] = SIDES
  square: bool = False          # one side drawn for both (a fixed canvas when `sides` has one entry)
  max_objects: int = 6          # also capped by the canvas area: one object per px_per_object (at least 1)
  px_per_object: int = 1000
  min_size: int = 8             # object side in px
  max_size: int = 0             # largest side in px; 0 = half the shorter canvas side
  word_prob: float = 0.4        # chance of a word on canvases at least 48 px wide
  word_grid: int = 1            # the word's ink starts on multiples of this (1 = anywhere)
  word_on_top: bool = False     # the word's ink starts on the top row of pixels
  relations: bool = True        # ask "Is the A to the left of / above the B?"
  cells: int = 0                # > 0: each shape inside its own cell of a cells x cells grid (0 = anywhere)
  centered: bool = False        # the shape's box centered on the canvas, or just below the word where they
                                # would overlap (with max_objects=1: drawings)


SCENES = {
    # Any aspect ratio, 32-128 px, 1-6 objects: the any-res dataset.
    "full": SceneSpec(),
    # 48 x 48 canvases with 1-3 objects: 36 patches of 8 px, so a 2-core CPU sees tens of thousands of scenes
    # in ten minutes (the demo). Each shape sits inside one cell of the 3 x 3 position grid, i.e. inside one
    # 2 x 2 patch block: a place's label is never ambiguous at a cell border and no patch holds two shapes.
    # Words start on the 8-px patch grid: each word is then one pixel pattern, not 64 shifted ones, which a
    # model trained for minutes can learn to read; most scenes hold one, so reading leaves its plateau from
    # more seeds. No left-of / above questions: the demo model stays at chance on them (docs/demo_tuning.md).
    "small": SceneSpec(sides=(48,), square=True, max_objects=3, px_per_object=700, min_size=10, word_prob=0.8,
                       word_grid=8, cells=3, relations=False),
    # One shape of 17-26 px in the middle of a 48 x 48 canvas (moved down below the word where they would
    # overlap; still in the center cell) and, in 80 % of them, a word on the top row: the prompts ("Draw a
    # red circle in the center and the word "cat" on a white background.") a model trained for ten minutes
    # learns to draw (the demo's generation data; docs/demo_tuning.md has what it could not learn from the
    # scenes of "small"). Drawing the words teaches the glyphs that reading the scenes of "small" needs:
    # without them, reading was learned from 1 seed of 3. The size trades drawing against reading: larger
    # shapes make the prompt's color more of the pixels, so it is learned sooner (benchmarks.learnability),
    # but take the training from the words (docs/demo_tuning.md: 14-23, 17-26 and 20-30 px from 3 seeds each).
    "draw": SceneSpec(sides=(48,), square=True, max_objects=1, min_size=17, max_size=26, word_prob=0.8,
                      word_grid=8, word_on_top=True, relations=False, centered=True),
}


@dataclasses.dataclass(frozen=True)
class Shape:
  shape: str
  color: str
  x0: int
  y0: int
  size: int

  @property
  def bbox(self) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x0, y0, x1, y1)."""
    return self.x0, self.y0, self.x0 + self.size - 1, self.y0 + self.size - 1

  def name(self) -> str:
    return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
  width: int
  height: int
  objects: tuple[Shape, ...]
  word: str | None = None
  word_xy: tuple[int, int] = (0, 0)

  def position(self, obj: Shape) -> str:
    """'top left', 'top', 'center', 'bottom right', ... from the object's center in a 3 x 3 grid."""
    x0, y0, x1, y1 = obj.bbox
    col = ("left", "center", "right")[min(int(3 * (x0 + x1 + 1) / 2 / self.width), 2)]
    row = ("top", "middle", "bottom")[min(int(3 * (y0 + y1 + 1) / 2 / self.height), 2)]
    if row == "middle":
      return col
    return row if col == "center" else f"{row} {col}"

  def word_bbox(self) -> tuple[int, int, int, int] | None:
    if self.word is None:
      return None
    left, t, r, b = _font().getbbox(self.word)
    return self.word_xy[0] + left, self.word_xy[1] + t, self.word_xy[0] + r - 1, self.word_xy[1] + b - 1

  def meta(self) -> dict[str, Any]:
    """JSON-ready metadata: the ground truth the questions are answered from."""
    return dict(width=self.width, height=self.height, word=self.word, word_bbox=self.word_bbox(),
                objects=[dict(shape=o.shape, color=o.color, bbox=list(o.bbox), position=self.position(o))
                         for o in self.objects])


@functools.cache
def _font() -> ImageFont.FreeTypeFont:
  return ImageFont.load_default(size=FONT_SIZE)


def render(scene: Scene) -> np.ndarray:
  """The scene as uint8 [H, W, 3]; no antialiasing on shapes so colors stay exact."""
  im = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
  draw = ImageDraw.Draw(im)
  for o in scene.objects:
    x0, y0, x1, y1 = o.bbox
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    fill = COLORS[o.color]
    if o.shape == "square":
      draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif o.shape == "circle":
      draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif o.shape == "triangle":
      draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif o.shape == "diamond":
      draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
      raise ValueError(f"unknown shape {o.shape!r}")
  if scene.word is not None:
    draw.text(scene.word_xy, scene.word, fill=(0, 0, 0), font=_font())
  return np.asarray(im)


def _overlaps(box, boxes) -> bool:
  x0, y0, x1, y1 = box
  return any(x0 <= b[2] + GAP and b[0] <= x1 + GAP and y0 <= b[3] + GAP and b[1] <= y1 + GAP for b in boxes)


def _place(rng: np.random.Generator, scene: Scene, shape: str, color: str, taken: list,
           spec: SceneSpec) -> Shape | None:
  """A non-overlapping shape of random size (spec.min_size, max_size, cells), or None after a few tries."""
  min_size, cells = spec.min_size, spec.cells
  if cells:  # inside one cell, 1 px in from its sides: neighbours in adjacent cells stay GAP apart
    cw, ch = scene.width // cells, scene.height // cells
    hi = min(cw, ch) - GAP + 1
  else:
    hi = spec.max_size + 1 if spec.max_size else max(min_size + 1, min(scene.width, scene.height) // 2)
  lo = min(min_size, hi - 1)
  for _ in range(30):
    size = int(rng.integers(lo, hi))
    if spec.centered:
      x0, y0 = (scene.width - size) // 2, (scene.height - size) // 2
      if _overlaps(Shape(shape, color, x0, y0, size).bbox, taken):
        y0 = max(b[3] for b in taken) + GAP + 1
    elif cells:
      col, row = (int(v) for v in rng.integers(0, cells, 2))
      x0 = col * cw + GAP // 2 + int(rng.integers(0, cw - GAP - size + 1))
      y0 = row * ch + GAP // 2 + int(rng.integers(0, ch - GAP - size + 1))
    else:
      x0 = int(rng.integers(0, scene.width - size + 1))
      y0 = int(rng.integers(0, scene.height - size + 1))
    o = Shape(shape, color, x0, y0, size)
    if not _overlaps(o.bbox, taken) and o.bbox[3] < scene.height:
      return o
  return None


def sample_scene(rng: np.random.Generator, spec: SceneSpec = SCENES["full"]) -> Scene:
  """A random canvas with 1..spec.max_objects shapes (fewer on small canvases) and sometimes a word."""
  width = int(rng.choice(spec.sides))
  height = width if spec.square else int(rng.choice(spec.sides))
  scene = Scene(width, height, ())
  taken: list = []
  if width >= 48 and rng.random() < spec.word_prob:
    word = str(rng.choice(WORDS))
    left, t, r, b = _font().getbbox(word)
    for _ in range(20):
      x = int(rng.integers(0, width - r + 1))  # x before y: the scenes of earlier versions stay as they were
      xy = (x, -t if spec.word_on_top else int(rng.integers(-t, height - b + 1)))
      if spec.word_grid > 1:  # snap the ink's top-left corner down onto the grid
        g = spec.word_grid
        xy = ((xy[0] + left) // g * g - left, (xy[1] + t) // g * g - t)
      box = (xy[0] + left, xy[1] + t, xy[0] + r - 1, xy[1] + b - 1)
      if box[0] >= 0 and box[2] < width and box[3] < height:
        scene = dataclasses.replace(scene, word=word, word_xy=xy)
        taken.append(box)
        break
  max_n = int(np.clip(width * height // spec.px_per_object, 1, spec.max_objects))
  objects = []

  def new_object(taken: list) -> Shape | None:
    return _place(rng, scene, str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), taken, spec)

  for _ in range(int(rng.integers(1, max_n + 1))):
    o = new_object(taken)
    if o is not None:
      objects.append(o)
      taken.append(o.bbox)
  if not objects:  # a tiny canvas with a word may leave no room: drop the word rather than have no shape
    scene = dataclasses.replace(scene, word=None)
    objects.append(new_object([]))
  return dataclasses.replace(scene, objects=tuple(objects))


def _count_phrase(n: int, noun: str) -> str:
  return f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {noun}{'s' if n != 1 else ''}"


def describe(scene: Scene) -> str:
  """'a red circle at the top left, a blue square at the bottom and the word "cat"'."""
  parts = [f"a {o.name()} at the {scene.position(o)}".replace("at the center", "in the center")
           for o in scene.objects]
  if scene.word is not None:
    parts.append(f'the word "{scene.word}"')
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
  n = len(scene.objects)
  return f"A picture of {_count_phrase(n, 'shape')}: {describe(scene)}."


def prompt(scene: Scene) -> str:
  return f"Draw {describe(scene)} on a white background."


def questions(scene: Scene, rng: np.random.Generator, relations: bool = True) -> list[dict[str, str]]:
  """Counting, color, position, relation and reading questions with answers from the scene itself."""
  objs, qa = scene.objects, []
  shape = str(rng.choice(SHAPES))  # may be absent: "zero" is a valid count
  qa.append(dict(kind="count", question=f"How many {shape}s are there?",
                 answer=str(sum(o.shape == shape for o in objs))))
  qa.append(dict(kind="count", question="How many shapes are there?", answer=str(len(objs))))
  color = str(rng.choice([o.color for o in objs]))
  qa.append(dict(kind="count", question=f"How many {color} shapes are there?",
                 answer=str(sum(o.color == color for o in objs))))
  by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
  unique_shapes = [s for s, os in by_shape.items() if len(os) == 1]
  if unique_shapes:
    s = str(rng.choice(unique_shapes))
    qa.append(dict(kind="color", question=f"What color is the {s}?", answer=by_shape[s][0].color))
  names = [o.name() for o in objs]
  unique = [o for o in objs if names.count(o.name()) == 1]
  if unique:
    o = unique[int(rng.integers(len(unique)))]
    qa.append(dict(kind="position", question=f"Where is the {o.name()}?", answer=scene.position(o)))
  if relations and len(unique) >= 2:
    a, b = (unique[i] for i in rng.choice(len(unique), 2, replace=False))
    ax, bx = (a.bbox[0] + a.bbox[2]) / 2, (b.bbox[0] + b.bbox[2]) / 2
    ay, by = (a.bbox[1] + a.bbox[3]) / 2, (b.bbox[1] + b.bbox[3]) / 2
    # Only ask when the answer is clear at a glance (centers apart by a sixth of the image).
    if abs(ax - bx) > scene.width / 6:
      qa.append(dict(kind="relation", question=f"Is the {a.name()} to the left of the {b.name()}?",
                     answer="yes" if ax < bx else "no"))
    elif abs(ay - by) > scene.height / 6:
      qa.append(dict(kind="relation", question=f"Is the {a.name()} above the {b.name()}?",
                     answer="yes" if ay < by else "no"))
  if scene.word is not None:
    qa.append(dict(kind="ocr", question="What word is written in the image?", answer=scene.word))
  return qa


def edits(scene: Scene, rng: np.random.Generator, spec: SceneSpec, max_edits: int = 2
          ) -> list[tuple[str, Scene]]:
  """Up to `max_edits` (instruction, edited scene) pairs: recolor, remove or add one object."""
  names = [o.name() for o in scene.objects]
  unique = [i for i, o in enumerate(scene.objects) if names.count(o.name()) == 1]
  out = []
  for kind in rng.permutation(["recolor", "remove", "add"]):
    if len(out) == max_edits:
      break
    if kind in ("recolor", "remove") and unique:
      i = int(rng.choice(unique))
      o = scene.objects[i]
      if kind == "recolor":
        new = str(rng.choice([c for c in COLORS if c != o.color]))
        objs = scene.objects[:i] + (dataclasses.replace(o, color=new),) + scene.objects[i + 1:]
        out.append((f"Make the {o.name()} {new}.", dataclasses.replace(scene, objects=objs)))
      elif len(scene.objects) >= 2:
        objs = scene.objects[:i] + scene.objects[i + 1:]
        out.append((f"Remove the {o.name()}.", dataclasses.replace(scene, objects=objs)))
    elif kind == "add":
      taken = [o.bbox for o in scene.objects] + ([scene.word_bbox()] if scene.word else [])
      o = _place(rng, scene, str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), taken, spec)
      if o is not None:
        new_scene = dataclasses.replace(scene, objects=scene.objects + (o,))
        where = new_scene.position(o)
        out.append((f"Add a {o.name()} {'in' if where == 'center' else 'at'} the {where}.", new_scene))
  return out


def make_scene_example(seed: int, split: str, index: int, scenes: str = "full") -> dict[str, Any]:
  """Everything one record holds, with images as uint8 arrays (the builder encodes them).

  scenes: a SCENES preset; "full" keeps the record of (seed, split, index) as it always was.
  """
  if scenes not in SCENES:
    raise ValueError(f"scenes={scenes!r} not in {sorted(SCENES)}")
  spec = SCENES[scenes]
  rng = np.random.default_rng((seed, SPLIT_CODES[split], index))
  scene = sample_scene(rng, spec)
  return dict(
      id=f"shapes/{split}/{index}", image=render(scene), caption=caption(scene), prompt=prompt(scene),
      qa=questions(scene, rng, spec.relations),
      edits=[dict(instruction=text, image=render(s))
             for text, s in edits(scene, rng, spec)],
      meta=scene.meta())
