"""Records -> validated `Example`s. Corrupt or invalid records are skipped, counted and logged by record id.

A record is a dict from `tfds.data_source` in the schema of data/schema.py (any TFDS dataset with an image and
a text feature also works: `data.image_key`, `data.text_key`). Skips are counted per process (each Grain
worker counts its own); above `data.max_skip_fraction` the pipeline stops with an error naming the last bad
record, because then the data, not a few records, is broken.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from typing import Any

import grain
import numpy as np
from absl import logging

# Skips in this process, by reason; read with `skip_counts()`.
_SKIPS: collections.Counter = collections.Counter()
MIN_RECORDS_FOR_FRACTION = 100  # do not judge the skip fraction on a handful of records


class InputDataError(RuntimeError):
  """Too many records of a dataset are invalid."""


@dataclasses.dataclass
class Example:
  """One decoded record; images are uint8 [H, W, 3]."""
  id: str
  image: np.ndarray
  caption: str = ""
  prompt: str = ""
  qa: list[dict[str, str]] = dataclasses.field(default_factory=list)  # {kind, question, answer}
  edits: list[tuple[str, np.ndarray]] = dataclasses.field(default_factory=list)  # (instruction, target)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def skip_counts() -> dict[str, int]:
  """Records skipped in this process so far, by reason (plus 'total')."""
  return dict(_SKIPS, total=sum(_SKIPS.values()))


def count_skip(reason: str) -> None:
  _SKIPS[reason] += 1


def reset_skip_counts() -> None:
  _SKIPS.clear()


def _text(value: Any, field: str) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, str):
    return value
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _text(value.item(), field)
  raise ValueError(f"field {field!r} is a {type(value).__name__}, expected text")


def _rgb(value: Any, field: str, max_side: int) -> np.ndarray:
  px = np.asarray(value)
  if px.dtype != np.uint8:
    raise ValueError(f"field {field!r}: image dtype {px.dtype}, expected uint8")
  if px.ndim == 2 or (px.ndim == 3 and px.shape[2] == 1):  # grayscale
    px = np.repeat(px.reshape(px.shape[0], px.shape[1], 1), 3, axis=2)
  elif px.ndim == 3 and px.shape[2] == 4:  # RGBA: drop alpha
    px = px[..., :3]
  if px.ndim != 3 or px.shape[2] != 3:
    raise ValueError(f"field {field!r}: image shape {px.shape}, expected [H, W, 3]")
  if min(px.shape[:2]) < 1 or max(px.shape[:2]) > max_side:
    raise ValueError(f"field {field!r}: image {px.shape[0]}x{px.shape[1]} outside 1..{max_side} px a side")
  return np.ascontiguousarray(px)


def decode_record(record: dict[str, Any], *, image_key: str = "image", text_key: str = "caption",
                  max_side: int = 4096) -> Example:
  """A record of the shared schema (or a generic TFDS image+text record) -> Example; ValueError if invalid."""
  if "_error" in record:
    raise ValueError(record["_error"])
  missing = [k for k in (image_key, text_key) if k not in record]
  if missing:
    present = sorted(k for k in record if not k.startswith("_"))
    raise ValueError(f"missing field(s) {missing}; record has {present}")
  ex = Example(id=_text(record.get("id", f"{record.get('_source', '?')}/{record.get('_index', '?')}"), "id"),
               image=_rgb(record[image_key], image_key, max_side), caption=_text(record[text_key], text_key))
  if "prompt" in record:
    ex.prompt = _text(record["prompt"], "prompt")
  qa = record.get("qa")
  if qa is not None:
    cols = {k: [_text(v, f"qa/{k}") for v in qa.get(k, [])] for k in ("question", "answer", "kind")}
    if len(cols["question"]) != len(cols["answer"]):
      raise ValueError(f"qa: {len(cols['question'])} questions but {len(cols['answer'])} answers")
    kinds = cols["kind"] or [""] * len(cols["question"])
    ex.qa = [dict(kind=k, question=q, answer=a)
             for k, q, a in zip(kinds, cols["question"], cols["answer"], strict=True)]
  edits = record.get("edits")
  if edits is not None:
    ex.edits = [(_text(t, "edits/instruction"), _rgb(im, "edits/image", max_side))
                for t, im in zip(edits.get("instruction", []), edits.get("image", []), strict=True)]
  if "meta" in record:
    meta = _text(record["meta"], "meta")
    ex.meta = json.loads(meta) if meta else {}
  if not (ex.caption or ex.prompt or ex.qa):
    raise ValueError("no text: caption, prompt and qa are all empty")
  return ex


class DecodeExamples(grain.transforms.Map):
  """Record -> Example, or None (Grain drops it) for a corrupt / invalid record, counted and logged."""

  def __init__(self, *, image_key: str = "image", text_key: str = "caption", max_side: int = 4096,
               max_skip_fraction: float = 0.05):
    self.image_key, self.text_key, self.max_side = image_key, text_key, max_side
    self.max_skip_fraction = max_skip_fraction
    self.seen = self.skipped = 0

  def map(self, record: dict[str, Any]) -> Example | None:
    self.seen += 1
    try:
      return decode_record(record, image_key=self.image_key, text_key=self.text_key, max_side=self.max_side)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
      where = f"{record.get('_source', '?')} record {record.get('_index', '?')}"
      self.skipped += 1
      _SKIPS[type(e).__name__ if "_error" not in record else "unreadable"] += 1
      logging.warning("skipping %s: %s (%d of %d skipped in this process)", where, e, self.skipped, self.seen)
      if self.seen >= MIN_RECORDS_FOR_FRACTION and self.skipped > self.max_skip_fraction * self.seen:
        raise InputDataError(
            f"{self.skipped} of {self.seen} records were invalid (> data.max_skip_fraction="
            f"{self.max_skip_fraction}); last: {where}: {e}") from e
      return None
