"""Where records come from: dataset names -> `tfds.data_source`, mixtures, and a reader that never raises."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import tensorflow_datasets as tfds

from tuna2_jax.input.tasks import TASKS

# Builders of data/: config name -> (TFDS name, the command that writes it). "shapes/small" names the builder
# config "small" of "shapes" (TFDS's "tuna_shapes/small").
BUILDERS = {
    "shapes": ("tuna_shapes",
               "python -m data.shapes --data_dir={data_dir} --num_train=20000 --num_test=500{config_flag}"),
    "digits": ("tuna_digits", "python -m data.digits --data_dir={data_dir}"),
    "folder": ("tuna_folder", "python -m data.folder --data_dir={data_dir} --images=DIR --jsonl=FILE"),
}


class DatasetMissingError(FileNotFoundError):
  """The dataset was never built into `data.data_dir`."""


class MixtureItem(NamedTuple):
  name: str
  weight: float
  tasks: tuple[str, ...]  # the tasks this source's records may become; () = every task

  def allows(self, task: str) -> bool:
    return not self.tasks or task in self.tasks


def parse_mixture(spec: str) -> list[MixtureItem]:
  """'shapes', 'shapes:3,digits:1' or 'shapes/small@understand+edit:1,shapes/draw@generate:1' -> items.

  Weights need not sum to one. `@task+task` keeps a source to those tasks (tasks.TASKS), as pretraining
  mixes understanding-only and generation-only datasets; without it every task its records support.
  """
  out = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, _, weight = item.partition(":")
    name, _, task_list = name.partition("@")
    try:
      w = float(weight) if weight else 1.0
    except ValueError:
      raise ValueError(f"data.dataset={spec!r}: weight {weight!r} of {name!r} is not a number") from None
    if w <= 0:
      raise ValueError(f"data.dataset={spec!r}: weight of {name!r} must be > 0")
    tasks = tuple(filter(None, task_list.split("+")))
    if unknown := [t for t in tasks if t not in TASKS]:
      raise ValueError(f"data.dataset={spec!r}: {name!r} names unknown tasks {unknown}; expected {TASKS}")
    out.append(MixtureItem(name, w, tasks))
  if not out:
    raise ValueError("data.dataset is empty; name shapes, digits, folder or a TFDS dataset")
  return out


def builder_name(name: str) -> tuple[str, str]:
  """('shapes', 'small') for 'shapes/small', ('shapes', '') for 'shapes'; (name, '') for names not ours."""
  base, _, config = name.partition("/")
  return (base, config) if base in BUILDERS else (name, "")


def tfds_name(name: str) -> str:
  base, config = builder_name(name)
  return BUILDERS[base][0] + (f"/{config}" if config else "") if base in BUILDERS else name


def open_source(name: str, data_dir: str, split: str):
  """The random-access ArrayRecord source of one split; a clear error with the build command if missing."""
  full = tfds_name(name)
  try:
    return tfds.data_source(full, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types (not found, no split, no files); all mean "build it"
    base, config = builder_name(name)
    if base in BUILDERS:
      flag = f" --config={config}" if config else ""
      hint = f"build it first:\n  {BUILDERS[base][1].format(data_dir=data_dir, config_flag=flag)}"
    else:
      hint = "prepare it with tfds (file_format='array_record') into data.data_dir"
    exists = os.path.isdir(os.path.join(data_dir, full.split("/")[0].split(":")[0]))
    what = f"split {split!r} of {full!r}" if exists else f"dataset {full!r}"
    raise DatasetMissingError(f"data.dataset: {what} not found under data.data_dir={data_dir!r} ({e}); "
                              f"{hint}") from e


class SafeSource:
  """Wraps a random-access source so a record that cannot be read or parsed becomes an error marker.

  The marker `{"_index": i, "_error": msg}` flows to the example decoder, which counts and skips it, so one
  bad record never stops training.
  """

  def __init__(self, source, name: str):
    self.source, self.name = source, name

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      record = self.source[index]
    except Exception as e:  # noqa: BLE001  (corrupt bytes can raise anything from the PNG or proto decoders)
      return {"_index": index, "_source": self.name, "_error": f"{type(e).__name__}: {e}"}
    if not isinstance(record, dict):
      error = f"record is a {type(record).__name__}, not a dict"
      return {"_index": index, "_source": self.name, "_error": error}
    return dict(record, _index=index, _source=self.name)
