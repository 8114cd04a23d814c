"""The one record schema every builder of data/ writes, so the input pipeline reads them all alike.

A record: an RGB image (PNG), a caption, a generation prompt, question-answer pairs, editing pairs
(instruction + target image) and JSON metadata (the ground truth the text was written from).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

VERSION = "1.0.0"
# Builders set `code_path` to this: TFDS only uses it to find a checksums file (ours download nothing), and
# computing it for a module inside a package needs `importlib_resources`, which we do not install.
CODE_PATH = None


def features() -> tfds.features.FeaturesDict:
  text = tfds.features.Text
  image = lambda: tfds.features.Image(shape=(None, None, 3), encoding_format="png")
  return tfds.features.FeaturesDict({
      "id": text(),
      "image": image(),
      "caption": text(),
      "prompt": text(),
      "qa": tfds.features.Sequence({"kind": text(), "question": text(), "answer": text()}),
      "edits": tfds.features.Sequence({"instruction": text(), "image": image()}),
      "meta": text(),  # JSON
  })


def png_bytes(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def encode_record(example: dict[str, Any]) -> dict[str, Any]:
  """Arrays -> PNG bytes and metadata -> JSON: picklable output of a worker, input of the TFDS writer.

  Images are encoded to PNG here, in the worker, because without TensorFlow `tfds.features.Image` only
  accepts already-encoded bytes.
  """
  return dict(
      id=example["id"], image=png_bytes(example["image"]), caption=example.get("caption", ""),
      prompt=example.get("prompt", ""), qa=list(example.get("qa", [])),
      edits=[dict(instruction=e["instruction"], image=png_bytes(e["image"]))
             for e in example.get("edits", [])],
      meta=json.dumps(example.get("meta", {})))


def to_tfds(record: dict[str, Any]) -> dict[str, Any]:
  """Wraps PNG bytes in file objects, the form `tfds.features.Image` takes without TensorFlow."""
  edits = [dict(instruction=e["instruction"], image=io.BytesIO(e["image"])) for e in record["edits"]]
  return dict(record, image=io.BytesIO(record["image"]), edits=edits)
