"""Parallel example generation for the builders: workers render and encode, the TFDS writer serialises."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def parallel_imap(fn: Callable[[Any], Any], items: Iterable[Any], *, num_workers: int,
                  chunksize: int = 64) -> Iterator[Any]:
  """`map(fn, items)` in order, over `num_workers` spawned processes (0 or 1: in this process).

  Spawned, not forked: the caller may have imported JAX, whose threads do not survive a fork.
  `fn` must be a module-level function.
  """
  if num_workers <= 1:
    yield from map(fn, items)
    return
  with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
    yield from pool.imap(fn, items, chunksize=chunksize)
