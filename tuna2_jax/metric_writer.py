"""Where training metrics go: a console line with ETA, metrics.jsonl and TensorBoard (process 0 only)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

import numpy as np
from absl import logging


class MetricWriter:
  """Writes scalars (and images) for one run; a no-op on processes other than 0."""

  def __init__(self, workdir: str, *, total_steps: int, enabled: bool = True):
    self.enabled = enabled
    self.total_steps = total_steps
    self._start = time.time()
    self._start_step: int | None = None
    self._jsonl = self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 (closed in close())
      from tensorboardX import SummaryWriter  # noqa: PLC0415  (heavy import, process 0 only)
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write_scalars(self, step: int, scalars: Mapping[str, float], *, prefix: str = "train") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    if prefix != "train":
      row = {"step": int(step), **{f"{prefix}/{k}": v for k, v in row.items() if k != "step"}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))
    self._tb.flush()

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: name -> uint8 [H, W, 3]."""
    if not self.enabled:
      return
    for k, img in images.items():
      self._tb.add_image(k, np.asarray(img), int(step), dataformats="HWC")
    self._tb.flush()

  def log_line(self, step: int, scalars: Mapping[str, float]) -> str:
    """One human line: step, the main scalars and ETA from the observed rate."""
    if self._start_step is None:
      self._start_step, self._start = step, time.time()
    done = step - self._start_step
    rate = done / max(time.time() - self._start, 1e-9)
    eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
    shown = ("loss", "text_loss", "flow_loss", "grad_norm", "lr", "tokens_per_s", "mfu")
    keys = [k for k in shown if k in scalars]
    body = " ".join(f"{k}={scalars[k]:.4g}" for k in keys)
    line = f"step {step}/{self.total_steps} {body} eta={_fmt_seconds(eta)}"
    if self.enabled:
      logging.info(line)
    return line

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _fmt_seconds(s: float) -> str:
  if not np.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
