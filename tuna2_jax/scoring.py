"""A deterministic GenEval analogue for the shapes data: find shapes in pixels, check them against a prompt.

GenEval scores a text-to-image model by detecting objects in its images and checking count, colors,
attribute binding and positions against the prompt. Our prompts ("Draw a red circle at the top left and a blue
square in the center on a white background.") name shapes, colors and 3 x 3-grid positions, and the renderer
draws flat colors on white, so a small program replaces the detector:

  1. palette quantisation: each pixel -> the nearest of the dataset's colors (plus white and black) when
     within `tol` in RGB, else "unknown" (anti-aliased text, blends at resized edges, a model's smudges);
  2. connected components (8-connectivity) per color, smaller than `min_area` pixels dropped as specks;
  3. shape rules: each component's mask is compared (IoU) with the four shapes drawn by the dataset's own
     polygon rules into its bounding box; the best match names it, below `min_iou` it is a "blob";
  4. position: the component's bounding-box center in the 3 x 3 grid, the rule of data/shapes_render.py.

The word a prompt names ("and the word "cat"") is read back apart from the shapes (`read_word`): the dark
pixels are matched against each word of the dataset drawn in its font, at every offset, and the best IoU
names the word. It is its own category, "text", outside the GenEval-style mean of the five shape categories.
Scores are per image (booleans) and aggregated per category; see `score_image` and `aggregate`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage, signal

from data import shapes_render
from data.shapes_render import BACKGROUND, COLORS, SHAPES, WORDS

TEXT_COLOR = (0, 0, 0)
# Quantisation palette: the shape colors, then the two non-object colors.
PALETTE_NAMES = (*COLORS, "white", "black")
PALETTE = np.array([*COLORS.values(), BACKGROUND, TEXT_COLOR], np.float32)  # [K, 3]
NUM_SHAPE_COLORS = len(COLORS)
EIGHT = np.ones((3, 3), bool)
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
             "bottom right")
CATEGORIES = ("counting", "colors", "shapes", "color_attr", "position")

_ALT = lambda names: "|".join(sorted(names, key=len, reverse=True))  # noqa: E731  (longest first)
_OBJECT_RE = re.compile(rf"\ba ({_ALT(COLORS)}) ({_ALT(SHAPES)}) (?:at|in) the ({_ALT(POSITIONS)})\b")
_WORD_RE = re.compile(r'\bthe word "([^"]+)"')


@dataclasses.dataclass(frozen=True, order=True)
class SceneObject:
  """One shape named by a prompt or found in an image."""
  shape: str
  color: str
  position: str


@dataclasses.dataclass(frozen=True)
class Detection:
  """A connected component of one palette color; `shape` is "blob" when no shape rule fits."""
  shape: str
  color: str
  position: str
  bbox: tuple[int, int, int, int]  # inclusive (x0, y0, x1, y1)
  area: int
  iou: float                       # IoU of the mask with the best-fitting shape drawn in its box

  def as_object(self) -> SceneObject:
    return SceneObject(self.shape, self.color, self.position)


@dataclasses.dataclass(frozen=True)
class ImageScore:
  """Per-image checks against the prompt (GenEval style: a category passes only if exactly right)."""
  counting: bool        # as many shapes as prompted
  colors: bool          # the multiset of colors matches
  shapes: bool          # the multiset of shape kinds matches
  color_attr: bool      # the multiset of (shape, color) pairs matches: colors bound to the right shapes
  position: bool        # the multiset of (shape, color, position) matches: everything right
  object_recall: float  # fraction of prompted (shape, color) pairs found
  num_prompted: int
  detections: tuple[Detection, ...]
  text: bool | None = None      # the prompted word is what `read_word` reads; None: no word prompted
  word_read: str | None = None  # what `read_word` reads (None: no word-like ink)


def parse_prompt(prompt: str) -> list[SceneObject]:
  """The objects a shapes prompt (or caption) names, in order; words and anything else are ignored."""
  return [SceneObject(shape, color, pos) for color, shape, pos in _OBJECT_RE.findall(prompt)]


def parse_prompt_word(prompt: str) -> str | None:
  """The word a prompt asks to write ('... and the word "cat" ...' -> 'cat'), None if it names none."""
  m = _WORD_RE.search(prompt)
  return m.group(1) if m else None


def grid_position(bbox: Sequence[int], width: int, height: int) -> str:
  """'top left', 'top', ..., 'center', ... of a box center in a 3 x 3 grid (the rule of shapes_render)."""
  x0, y0, x1, y1 = bbox
  col = ("left", "center", "right")[min(int(3 * (x0 + x1 + 1) / 2 / width), 2)]
  row = ("top", "middle", "bottom")[min(int(3 * (y0 + y1 + 1) / 2 / height), 2)]
  if row == "middle":
    return col
  return row if col == "center" else f"{row} {col}"


def quantize(image: np.ndarray, tol: float = 60.0) -> np.ndarray:
  """int [H, W]: index into PALETTE_NAMES of each pixel's nearest palette color, -1 if none is within tol."""
  px = np.asarray(image, np.float32)[..., :3]
  dist = np.linalg.norm(px[:, :, None, :] - PALETTE[None, None], axis=-1)  # [H, W, K]
  idx = np.argmin(dist, -1)
  return np.where(np.take_along_axis(dist, idx[..., None], -1)[..., 0] <= tol, idx, -1)


@functools.lru_cache(maxsize=4096)
def shape_template(shape: str, width: int, height: int) -> np.ndarray:
  """bool [height, width]: `shape` drawn into its full box with the dataset's polygon rules (no antialias)."""
  im = Image.new("1", (width, height), 0)
  draw = ImageDraw.Draw(im)
  x1, y1 = width - 1, height - 1
  cx, cy = x1 / 2, y1 / 2
  if shape == "square":
    draw.rectangle((0, 0, x1, y1), fill=1)
  elif shape == "circle":
    draw.ellipse((0, 0, x1, y1), fill=1)
  elif shape == "triangle":
    draw.polygon([(cx, 0), (x1, y1), (0, y1)], fill=1)
  elif shape == "diamond":
    draw.polygon([(cx, 0), (x1, cy), (cx, y1), (0, cy)], fill=1)
  else:
    raise ValueError(f"unknown shape {shape!r}")
  return np.asarray(im, bool)


def text_ink(image: np.ndarray) -> np.ndarray:
  """bool [H, W]: pixels with every channel < 128, the antialiased word's core (no shape color is as dark)."""
  return np.asarray(image)[..., :3].max(-1) < 128


@functools.lru_cache(maxsize=64)
def word_template(word: str) -> np.ndarray:
  """bool [h, w]: the ink of `word` as the dataset's renderer draws it, cropped to its box."""
  scene = shapes_render.Scene(16 + 12 * len(word), 32, (), word=word, word_xy=(4, 4))
  ink = text_ink(shapes_render.render(scene))
  rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
  return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def read_word(image: np.ndarray, *, min_iou: float = 0.6, words: Sequence[str] = WORDS) -> str | None:
  """The word of `words` whose glyphs best match the image's dark pixels, None when none reaches min_iou.

  For each word and every offset where its template fits, IoU = overlap / (ink + template - overlap) over
  the whole image, so stray dark pixels elsewhere count against it; the overlaps at all offsets are one
  cross-correlation.
  """
  ink = text_ink(image).astype(np.float32)
  total = float(ink.sum())
  best, best_iou = None, min_iou
  for word in words if total else ():
    t = word_template(word)
    if t.shape[0] > ink.shape[0] or t.shape[1] > ink.shape[1]:
      continue
    overlap = signal.correlate(ink, t.astype(np.float32), mode="valid").max()
    iou = overlap / (total + t.sum() - overlap)
    if iou >= best_iou:
      best, best_iou = word, iou
  return best


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
  """(best shape, its IoU) for a component's mask cropped to its bounding box."""
  h, w = mask.shape
  best, best_iou = "blob", 0.0
  for shape in SHAPES:
    t = shape_template(shape, w, h)
    iou = float(np.sum(t & mask) / max(np.sum(t | mask), 1))
    if iou > best_iou:
      best, best_iou = shape, iou
  return best, best_iou


def find_objects(image: np.ndarray, *, tol: float = 60.0, min_area: int | None = None,
                 min_iou: float = 0.5) -> list[Detection]:
  """Every shape-colored component of `image` (uint8 [H, W, 3]), in raster order of first pixel.

  min_area defaults to max(4, 0.2% of the image): specks of a noisy generation are not objects.
  """
  h, w = image.shape[:2]
  min_area = max(4, int(0.002 * h * w)) if min_area is None else min_area
  labels = quantize(image, tol)
  out = []
  for k in range(NUM_SHAPE_COLORS):
    comp, n = ndimage.label(labels == k, structure=EIGHT)
    for j, sl in enumerate(ndimage.find_objects(comp), start=1):
      mask = comp[sl] == j
      area = int(mask.sum())
      if area < min_area:
        continue
      shape, iou = classify_shape(mask)
      bbox = (sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1)
      out.append(Detection(shape if iou >= min_iou else "blob", PALETTE_NAMES[k], grid_position(bbox, w, h),
                           bbox, area, iou))
  return sorted(out, key=lambda d: (d.bbox[1], d.bbox[0]))


def _same(a: Sequence, b: Sequence) -> bool:
  return collections.Counter(a) == collections.Counter(b)


def score_image(image: np.ndarray, prompted: Sequence[SceneObject], word: str | None = None,
                **find_kw) -> ImageScore:
  """Checks the shapes found in `image` against the prompted objects, and the word against `word`."""
  found = find_objects(image, **find_kw)
  read = read_word(image)
  want_pairs = collections.Counter((o.shape, o.color) for o in prompted)
  got_pairs = collections.Counter((d.shape, d.color) for d in found)
  recall = sum((want_pairs & got_pairs).values()) / max(len(prompted), 1)
  return ImageScore(
      counting=len(found) == len(prompted),
      colors=_same([d.color for d in found], [o.color for o in prompted]),
      shapes=_same([d.shape for d in found], [o.shape for o in prompted]),
      color_attr=want_pairs == got_pairs,
      position=_same([d.as_object() for d in found], list(prompted)),
      object_recall=recall, num_prompted=len(prompted), detections=tuple(found),
      text=None if word is None else read == word, word_read=read)


def aggregate(scores: Sequence[ImageScore]) -> dict[str, float]:
  """Per-category pass rates, their mean ("geneval"), object recall and "overall" by number of objects;
  "text" over the images whose prompt names a word (absent when none does)."""
  if not scores:
    return {}
  out = {c: float(np.mean([getattr(s, c) for s in scores])) for c in CATEGORIES}
  out["geneval"] = float(np.mean([out[c] for c in CATEGORIES]))
  texts = [s.text for s in scores if s.text is not None]
  if texts:
    out["text"], out["num_text"] = float(np.mean(texts)), float(len(texts))
  out["object_recall"] = float(np.mean([s.object_recall for s in scores]))
  groups: Mapping[str, list[ImageScore]] = collections.defaultdict(list)
  for s in scores:
    name = {1: "1_object", 2: "2_objects"}.get(s.num_prompted, "3plus_objects")
    groups[name].append(s)
  for name, group in sorted(groups.items()):
    out[f"all_correct_{name}"] = float(np.mean([s.position for s in group]))
  out["num_images"] = float(len(scores))
  return out
