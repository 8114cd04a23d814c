"""Any-res image sizing: free sizes that are multiples of the patch size, or aspect-ratio buckets.

The rule (free mode): keep the aspect ratio, never upscale (except to reach one patch), and shrink to the
largest patch grid whose patch count fits the budget; each side is snapped down to a multiple of `p` and the
image is resized (not cropped) to exactly that size, so nothing the text talks about is cut off.
Bucket mode (the paper's ~1K-token buckets): pick the bucket of closest aspect ratio, center-crop to its
aspect ratio, resize to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

# height / width of the buckets: the paper's 512x512, 448x576, 384x672 (and transposes).
DEFAULT_BUCKET_ASPECTS = (1.0, 7 / 9, 9 / 7, 4 / 7, 7 / 4)


def fit_grid(height: int, width: int, patch_size: int, max_patches: int) -> tuple[int, int]:
  """The (rows, cols) patch grid of the free-size rule for an image of `height` x `width`."""
  if max_patches < 1:
    raise ValueError(f"max_patches must be >= 1, got {max_patches}")
  gh, gw = max(1, height // patch_size), max(1, width // patch_size)
  if gh * gw > max_patches:
    scale = math.sqrt(max_patches / (gh * gw))
    gh, gw = max(1, math.floor(gh * scale)), max(1, math.floor(gw * scale))
    while gh * gw > max_patches:  # only when one side was clamped to 1
      gh, gw = (gh - 1, gw) if gh >= gw else (gh, gw - 1)
  return gh, gw


def bucket_grids(max_patches: int,
                 aspects: Sequence[float] = DEFAULT_BUCKET_ASPECTS) -> list[tuple[int, int]]:
  """(rows, cols) per aspect ratio (rows / cols), each with at most `max_patches` patches."""
  grids = []
  for aspect in aspects:
    gh = max(1, round(math.sqrt(max_patches * aspect)))
    grids.append((gh, max(1, max_patches // gh)))
  return grids


def nearest_bucket(height: int, width: int, grids: Sequence[tuple[int, int]]) -> tuple[int, int]:
  log_aspect = math.log(height / width)
  return min(grids, key=lambda g: abs(math.log(g[0] / g[1]) - log_aspect))


def resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [H, W, 3] -> [height, width, 3]: box filter when shrinking (no ringing), bicubic when growing."""
  if pixels.shape[:2] == (height, width):
    return pixels
  shrink = height <= pixels.shape[0] and width <= pixels.shape[1]
  method = Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC
  return np.asarray(Image.fromarray(pixels).resize((width, height), method))


def center_crop_to_aspect(pixels: np.ndarray, aspect: float) -> np.ndarray:
  """The largest centered crop whose height / width equals `aspect` (to within a pixel)."""
  h, w = pixels.shape[:2]
  if h / w > aspect:
    new_h = max(1, round(w * aspect))
    top = (h - new_h) // 2
    return pixels[top:top + new_h]
  new_w = max(1, round(h / aspect))
  left = (w - new_w) // 2
  return pixels[:, left:left + new_w]


def fit_image(pixels: np.ndarray, *, patch_size: int, max_patches: int, mode: str = "free",
              aspects: Sequence[float] = DEFAULT_BUCKET_ASPECTS) -> np.ndarray:
  """Resizes an image to a patch-multiple size under `max_patches` by the rule of `mode` (free | buckets)."""
  h, w = pixels.shape[:2]
  if mode == "free":
    gh, gw = fit_grid(h, w, patch_size, max_patches)
  elif mode == "buckets":
    gh, gw = nearest_bucket(h, w, bucket_grids(max_patches, aspects))
    pixels = center_crop_to_aspect(pixels, gh / gw)
  else:
    raise ValueError(f"data.image_mode={mode!r}: expected 'free' or 'buckets'")
  return resize(pixels, gh * patch_size, gw * patch_size)
