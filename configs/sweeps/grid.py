"""Helpers for sweep files: a sweep is a generator of override dicts ({"optim.lr": 3e-4, ...})."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any


def product(axes: Mapping[str, Sequence[Any]], **fixed: Any) -> Iterator[dict[str, Any]]:
  """Every combination of `axes` (the last key varies fastest), each merged with `fixed`.

  Dotted keys cannot be keyword names, so `fixed` uses '__' for '.': train__steps=200 -> "train.steps".
  """
  base = {k.replace("__", "."): v for k, v in fixed.items()}
  keys = list(axes)
  for values in itertools.product(*(axes[k] for k in keys)):
    yield {**base, **dict(zip(keys, values, strict=True))}


def zipped(axes: Mapping[str, Sequence[Any]], **fixed: Any) -> Iterator[dict[str, Any]]:
  """The i-th value of every axis together (all axes the same length), each merged with `fixed`."""
  base = {k.replace("__", "."): v for k, v in fixed.items()}
  keys = list(axes)
  for values in zip(*(axes[k] for k in keys), strict=True):
    yield {**base, **dict(zip(keys, values, strict=True))}
