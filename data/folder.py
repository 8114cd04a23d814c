"""`tuna_folder`: your own images + a JSONL of captions / QA, converted to ArrayRecord shards in parallel.

  python -m data.folder --data_dir=runs/data --images=path/to/images --jsonl=path/to/meta.jsonl

One JSON object per line; the image path is relative to --images. Field names of the common formats work:
  {"image": "a.jpg", "caption": "..."}                              (CC / COCO style; also "text", "TEXT")
  {"image": "b.png", "conversations": [{"from": "human", "value": "<image>\\nQ?"}, {"from": "gpt", ...}]}
  {"image": "c.png", "qa": [{"question": "...", "answer": "..."}], "prompt": "..."}   (our schema)
Without --jsonl every image of the folder is taken with the caption in a same-named .txt file beside it.
Unreadable images and lines without text are skipped and counted; nothing stops the conversion.
Images larger than --max_side are downscaled (aspect ratio kept) and re-encoded as PNG.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from PIL import Image

from data import schema
from data.writing import parallel_imap

NAME = "tuna_folder"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
IMAGE_KEYS = ("image", "image_path", "file_name", "filename", "path")
CAPTION_KEYS = ("caption", "text", "TEXT", "txt")


def read_items(images_dir: str, jsonl: str | None) -> list[dict[str, Any]]:
  """The JSONL lines (or the folder's images with .txt captions) as dicts with an absolute `_path`."""
  items = []
  if jsonl:
    with open(jsonl) as f:
      for n, line in enumerate(f):
        if not line.strip():
          continue
        try:
          item = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{jsonl}:{n + 1}: not JSON ({e})") from e
        key = next((k for k in IMAGE_KEYS if k in item), None)
        if key is None:
          raise ValueError(f"{jsonl}:{n + 1}: no image field (one of {IMAGE_KEYS})")
        items.append(dict(item, _path=os.path.join(images_dir, item[key]), _line=n + 1))
    return items
  for name in sorted(os.listdir(images_dir)):
    if name.lower().endswith(IMAGE_SUFFIXES):
      txt = os.path.join(images_dir, os.path.splitext(name)[0] + ".txt")
      caption = open(txt).read().strip() if os.path.exists(txt) else ""
      path = os.path.join(images_dir, name)
      items.append(dict(image=name, caption=caption, _path=path, _line=len(items) + 1))
  return items


def _text_fields(item: dict[str, Any]) -> dict[str, Any]:
  caption = next((str(item[k]) for k in CAPTION_KEYS if item.get(k)), "")
  qa = [dict(kind=q.get("kind", ""), question=q["question"], answer=q["answer"]) for q in item.get("qa", [])]
  turns = item.get("conversations", [])
  for q, a in zip(turns[0::2], turns[1::2], strict=False):  # LLaVA: human, gpt, human, gpt, ...
    question = q["value"].replace("<image>", "").strip()
    qa.append(dict(kind="chat", question=question, answer=a["value"].strip()))
  return dict(caption=caption, prompt=str(item.get("prompt", "")), qa=qa)


def convert(args: tuple[dict[str, Any], int]) -> tuple[dict | None, str]:
  """(record, '') for a good item; (None, reason) for an unreadable image or an item without text."""
  item, max_side = args
  try:
    with Image.open(item["_path"]) as im:
      im = im.convert("RGB")
      if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
      pixels = np.asarray(im)
  except Exception as e:  # noqa: BLE001  (PIL raises many types for broken files)
    return None, f"{item['_path']}: unreadable image ({type(e).__name__}: {e})"
  try:
    text = _text_fields(item)
  except (KeyError, TypeError, AttributeError) as e:
    return None, f"{item['_path']}: malformed text fields ({type(e).__name__}: {e})"
  if not (text["caption"] or text["qa"] or text["prompt"]):
    return None, f"{item['_path']}: no caption, prompt or qa"
  uid = str(item.get("id", f"folder/{item['_line']}"))
  meta = dict(source_path=item["_path"], width=pixels.shape[1], height=pixels.shape[0])
  return schema.encode_record(dict(id=uid, image=pixels, meta=meta, **text)), ""


def split_of(item: dict[str, Any], test_percent: float) -> str:
  """A stable split from the image path's hash, so re-running keeps every image in its split."""
  h = int(hashlib.sha256(item["_path"].encode()).hexdigest()[:8], 16) % 10_000
  return "test" if h < test_percent * 100 else "train"


class TunaFolder(tfds.core.GeneratorBasedBuilder):
  """A user folder of images + JSONL in the shared schema of data/schema.py."""

  VERSION = tfds.core.Version(schema.VERSION)
  code_path = schema.CODE_PATH

  def __init__(self, *, images: str = "", jsonl: str | None = None, test_percent: float = 0.0,
               max_side: int = 1024, num_workers: int = 0, **kwargs):
    self.images, self.jsonl, self.test_percent = images, jsonl, test_percent
    self.max_side, self.num_workers = max_side, num_workers
    self.skipped: list[str] = []
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=schema.features())

  def _split_generators(self, dl_manager):
    del dl_manager
    if not os.path.isdir(self.images):
      raise FileNotFoundError(f"--images={self.images!r} is not a directory")
    items = read_items(self.images, self.jsonl)
    splits = ("train", "test") if self.test_percent > 0 else ("train",)
    return {s: self._generate_examples([i for i in items if split_of(i, self.test_percent) == s])
            for s in splits}

  def _generate_examples(self, items: list[dict[str, Any]]):
    for record, reason in parallel_imap(convert, ((i, self.max_side) for i in items),
                                        num_workers=self.num_workers, chunksize=16):
      if record is None:
        self.skipped.append(reason)
        logging.warning("skipping %s", reason)
        continue
      yield record["id"], schema.to_tfds(record)


def main(argv):
  del argv
  f = flags.FLAGS
  builder = TunaFolder(data_dir=f.data_dir, images=f.images, jsonl=f.jsonl or None,
                       test_percent=f.test_percent, max_side=f.max_side, num_workers=f.num_workers)
  builder.download_and_prepare()
  print(f"wrote {NAME} to {builder.data_dir}: " +
        ", ".join(f"{k}={v.num_examples}" for k, v in builder.info.splits.items()) +
        f"; skipped {len(builder.skipped)}")


if __name__ == "__main__":
  flags.DEFINE_string("data_dir", "runs/data", "where to write tuna_folder/<version>")
  flags.DEFINE_string("images", None, "folder of images", required=True)
  flags.DEFINE_string("jsonl", "", "JSONL of captions / QA (default: .txt captions beside the images)")
  flags.DEFINE_float("test_percent", 0.0, "percent of images held out as the test split (by path hash)")
  flags.DEFINE_integer("max_side", 1024, "longer image sides are downscaled to this")
  flags.DEFINE_integer("num_workers", 2, "processes that decode and re-encode images in parallel")
  app.run(main)
