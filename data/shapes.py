"""`tuna_shapes`: the embedded procedural dataset (no download), written as ArrayRecord through TFDS.

  python -m data.shapes --data_dir=runs/data --num_train=20000 --num_test=500
  then: tfds.data_source("tuna_shapes", data_dir="runs/data", split="train")
  python -m data.shapes --config=small ...   ->   tfds.data_source("tuna_shapes/small", ...)

Each record is a scene of colored shapes (and sometimes a word) with a caption, counting / color / position /
relation / reading questions, a generation prompt and up to two edits (see data/shapes_render.py). Three
builder configs, named after shapes_render.SCENES: `full` (the default; 1-6 shapes on canvases of 32-128 px a
side, any aspect ratio), `small` (1-3 shapes on 48 x 48 canvases, one per grid cell, the demo's scenes) and
`draw` (one shape in the middle of 48 x 48, mostly a word on top: the demo's drawings). Splits draw from
disjoint seed streams: (seed, split code, index).
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds
from absl import app, flags

from data import schema, shapes_render
from data.writing import parallel_imap

NAME = "tuna_shapes"


def _record(args: tuple[int, str, int, str]) -> dict:
  return schema.encode_record(shapes_render.make_scene_example(*args))


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """A builder config per shapes_render.SCENES preset (its name)."""


class TunaShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural shapes scenes; sizes and seed are constructor arguments (they do not change the schema)."""

  # A new version whenever a preset draws other scenes, so data built by older code is not reused.
  VERSION = tfds.core.Version("1.3.0")
  RELEASE_NOTES = {"1.1.0": "small: one shape per grid cell, a word in 80 % of scenes, no relation questions",
                   "1.2.0": "draw: a word on the top row in 80 % of drawings",
                   "1.3.0": "draw: shapes of 17-26 px, moved down below the word where they would overlap"}
  BUILDER_CONFIGS = [  # the first is the default ("tuna_shapes" = "tuna_shapes/full")
      ShapesConfig(name="full", description="1-6 shapes, 32-128 px canvases of any aspect ratio"),
      ShapesConfig(name="small", description="1-3 shapes on 48 x 48 canvases, one per grid cell (demo)"),
      ShapesConfig(name="draw", description="one centered shape on 48 x 48, a word on top (demo drawings)"),
  ]
  code_path = schema.CODE_PATH

  def __init__(self, *, num_train: int = 20_000, num_validation: int = 0, num_test: int = 500, seed: int = 0,
               num_workers: int = 0, **kwargs):
    self.sizes = dict(train=num_train, validation=num_validation, test=num_test)
    self.seed, self.num_workers = seed, num_workers
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=__doc__, features=schema.features())

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split, n in self.sizes.items() if n > 0}

  def _generate_examples(self, split: str):
    items = ((self.seed, split, i, self.builder_config.name) for i in range(self.sizes[split]))
    for record in parallel_imap(_record, items, num_workers=self.num_workers):
      yield record["id"], schema.to_tfds(record)


def build(data_dir: str, config: str = "full", **sizes) -> TunaShapes:
  """Writes the dataset under `data_dir/tuna_shapes/<config>/<version>` (a no-op if it is already there)."""
  builder = TunaShapes(data_dir=data_dir, config=config, **sizes)
  builder.download_and_prepare()
  return builder


def main(argv):
  del argv
  f = flags.FLAGS
  builder = build(f.data_dir, f.config, num_train=f.num_train, num_validation=f.num_validation,
                  num_test=f.num_test, seed=f.seed, num_workers=f.num_workers)
  print(f"wrote {NAME} to {builder.data_dir}: " +
        ", ".join(f"{k}={v.num_examples}" for k, v in builder.info.splits.items()))


if __name__ == "__main__":
  flags.DEFINE_string("data_dir", "runs/data", "where to write tuna_shapes/<config>/<version>")
  flags.DEFINE_enum("config", "full", list(shapes_render.SCENES), "scene preset (builder config)")
  flags.DEFINE_integer("num_train", 20_000, "training examples")
  flags.DEFINE_integer("num_validation", 0, "validation examples")
  flags.DEFINE_integer("num_test", 500, "held-out test examples")
  flags.DEFINE_integer("seed", 0, "base seed; splits use disjoint streams (seed, split, index)")
  flags.DEFINE_integer("num_workers", 2, "processes that render and encode examples in parallel")
  app.run(main)
