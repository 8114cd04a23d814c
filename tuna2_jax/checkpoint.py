"""Orbax checkpointing: train state + Grain iterator state + resolved config + metadata, per step.

Saves are async (the loop blocks only while device arrays are copied out); Orbax writes each step to a
temporary directory and renames it when complete, so an interrupted save never shows up as a step and never
touches the previous ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """One run's checkpoints: keep the last `keep`, every `keep_every`-th step permanently."""

  def __init__(self, workdir: str, *, keep: int = 3, keep_every: int = 0, async_save: bool = True,
               with_data: bool = True):
    self.with_data = with_data
    items = ("state", "meta", "config") + (("data",) if with_data else ())
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_every or None, enable_async_checkpointing=async_save,
        create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=items)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, *, data_iter=None, meta: Mapping | None = None,
           config: Mapping | None = None, force: bool = True) -> bool:
    args = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))),
                config=ocp.args.JsonSave(dict(config or {})))
    if self.with_data and data_iter is not None:
      import grain  # noqa: PLC0415
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(int(step), args=ocp.args.Composite(**args), force=force)

  def restore(self, abstract_state: Any, *, step: int | None = None, data_iter=None) -> tuple[Any, dict]:
    """Restores onto the shardings of `abstract_state` (jax.ShapeDtypeStruct leaves with .sharding)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
    args = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if self.with_data and data_iter is not None:
      import grain  # noqa: PLC0415
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    logging.info("restored checkpoint step %d from %s", step, self.manager.directory)
    return out["state"], dict(out["meta"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying target shardings: what restoring onto a (possibly different) mesh needs."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
