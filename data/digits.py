"""`tuna_digits`: the 1,797 real 8x8 handwritten digits shipped with scikit-learn, upscaled, with text.

  python -m data.digits --data_dir=runs/data --size=32

Real (not procedural) pixels for a small sanity check of understanding and generation. Digits are drawn
dark on white, upscaled with nearest-neighbour to `size` (a multiple of 16). Test = every 10th digit
(180), validation = every 10th after one (180), train = the rest (1,437): disjoint by construction.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags

from data import schema
from data.writing import parallel_imap

NAME = "tuna_digits"
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def split_indices(split: str, n: int) -> list[int]:
  """Disjoint index sets: test i % 10 == 0, validation i % 10 == 1, train the rest."""
  if split == "test":
    return [i for i in range(n) if i % 10 == 0]
  if split == "validation":
    return [i for i in range(n) if i % 10 == 1]
  return [i for i in range(n) if i % 10 > 1]


def digit_example(args: tuple[int, np.ndarray, int, str, int]) -> dict:
  """One record: the digit upscaled to `size` x `size` RGB, caption, QA and prompt."""
  index, pixels16, label, split, size = args
  # 0..16 ink -> dark on white
  gray = 255 - (pixels16.astype(np.float32) * (255 / 16)).round().astype(np.uint8)
  scale = size // 8
  gray = np.kron(gray, np.ones((scale, scale), np.uint8))
  word = NUMBER_WORDS[label]
  return schema.encode_record(dict(
      id=f"digits/{split}/{index}", image=np.repeat(gray[..., None], 3, axis=2),
      caption=f"A handwritten digit {label} ({word}).", prompt=f"Draw the handwritten digit {label}.",
      qa=[dict(kind="ocr", question="What digit is this?", answer=str(label)),
          dict(kind="ocr", question="Is the digit even or odd?", answer="even" if label % 2 == 0 else "odd")],
      meta=dict(label=int(label), width=size, height=size, sklearn_index=int(index))))


class TunaDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits in the shared schema of data/schema.py."""

  VERSION = tfds.core.Version(schema.VERSION)
  code_path = schema.CODE_PATH

  def __init__(self, *, size: int = 32, num_workers: int = 0, **kwargs):
    if size % 16 or size < 16:
      raise ValueError(f"--size={size}: must be a positive multiple of 16 (patch sizes 8 and 16)")
    self.size, self.num_workers = size, num_workers
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=schema.features())

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in ("train", "validation", "test")}

  def _generate_examples(self, split: str):
    from sklearn.datasets import load_digits  # noqa: PLC0415  (ships inside scikit-learn, no download)

    digits = load_digits()
    items = ((i, digits.images[i], int(digits.target[i]), split, self.size)
             for i in split_indices(split, len(digits.target)))
    for record in parallel_imap(digit_example, items, num_workers=self.num_workers):
      yield record["id"], schema.to_tfds(record)


def main(argv):
  del argv
  f = flags.FLAGS
  builder = TunaDigits(data_dir=f.data_dir, size=f.size, num_workers=f.num_workers)
  builder.download_and_prepare()
  print(f"wrote {NAME} to {builder.data_dir}: " +
        ", ".join(f"{k}={v.num_examples}" for k, v in builder.info.splits.items()))


if __name__ == "__main__":
  flags.DEFINE_string("data_dir", "runs/data", "where to write tuna_digits/<version>")
  flags.DEFINE_integer("size", 32, "side of the upscaled square image, a multiple of 16")
  flags.DEFINE_integer("num_workers", 0, "processes that encode examples in parallel")
  app.run(main)
