"""The end-to-end demo (`make demo`): build the shapes data, train ~10 minutes, evaluate, report.

  python -m tuna2_jax.demo --workdir=runs/demo                          # what `make demo` runs
  python -m tuna2_jax.demo --workdir=runs/demo_long --config.train.steps=4000 --minutes=45   # longer
  python -m tuna2_jax.demo --workdir=runs/demo_tiny --config=configs/tuna2_tiny.py --minutes=60  # bigger

Everything goes under the workdir: data/ (the dataset), checkpoints/, tb/ (TensorBoard), metrics.jsonl,
eval_<step>.{json,md}, samples_<step>.png, reconstructions_<step>.png, and eval.json (the summary: accuracy
and chance per question kind, generation scores, reconstruction PSNR, wall times). Training stops at
`train.steps` or after `--minutes`, whichever comes first (it saves a checkpoint either way); a rerun
resumes the training, or only re-evaluates when it is finished.
"""

from __future__ import annotations

import dataclasses
import json
import logging as py_logging
import os
import signal
import sys
import threading
import time

import ml_collections
from absl import app, flags, logging

# The trainer defines --config and --workdir; the demo reuses them (absl flags are process-global).
from tuna2_jax import train

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                              "tuna2_demo.py")


@dataclasses.dataclass(frozen=True)
class DemoOptions:
  """What the demo does besides the config: dataset size and the training time cap."""
  num_train: int = 10_000
  num_test: int = 300
  minutes: float = 11.0      # wall-clock cap on training (0 = none); `train.steps` is the other bound
  data_workers: int = 2


class _ProgressOnly(py_logging.Filter):
  """Keeps the trainer's per-step lines (with ETA) and warnings; drops the libraries' INFO chatter."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or str(record.msg).startswith("step ")


def _say(msg: str) -> None:
  print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_data(config: ml_collections.ConfigDict, opts: DemoOptions) -> float:
  """Writes the shapes dataset (and its BPE tokenizer when the config reads one) into config.data.data_dir
  unless they are there; seconds taken."""
  from data import shapes  # noqa: PLC0415
  from tuna2_jax.input import bpe, sources  # noqa: PLC0415

  t0 = time.time()
  names = [item.name for item in sources.parse_mixture(config.data.dataset)]
  for name in names:
    base, scenes = sources.builder_name(name)
    if base != "shapes":
      raise ValueError(f"data.dataset={config.data.dataset!r}: the demo builds 'shapes' or 'shapes/<config>' "
                       f"datasets, not {name!r}")
    builder = shapes.build(config.data.data_dir, scenes or "full", num_train=opts.num_train,
                           num_test=opts.num_test, num_workers=opts.data_workers)
    sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
    _say(f"dataset in {builder.data_dir}: {sizes} ({time.time() - t0:.0f} s)")
  if config.data.tokenizer.startswith("hf:"):
    vocab = config.model.vocab_size
    path = bpe.build(names[0], config.data.data_dir, vocab)  # the first dataset's texts name every word
    config.data.tokenizer = f"hf:{path}"
    _say(f"tokenizer: {vocab}-id byte-level BPE trained on the training text, {path}")
  return time.time() - t0


def train_with_cap(config: ml_collections.ConfigDict, workdir: str, minutes: float) -> float:
  """Trains to config.train.steps, or stops after `minutes` (SIGTERM: the trainer saves and exits)."""
  timer = None
  if minutes > 0:
    # The trainer's preemption handler turns SIGTERM into "save at the next step, then stop".
    timer = threading.Timer(minutes * 60, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.daemon = True
  t0 = time.time()
  try:
    if timer:
      timer.start()
    train.train_and_evaluate(config, workdir)
  finally:
    if timer:
      timer.cancel()
  return time.time() - t0


def run(config: ml_collections.ConfigDict, workdir: str, opts: DemoOptions | None = None) -> dict:
  """The whole demo; returns the eval.json summary."""
  opts = opts or DemoOptions()
  from tuna2_jax import checkpoint, evaluate, report  # noqa: PLC0415

  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  with config.unlocked():
    config.data.data_dir = os.path.join(workdir, "data")
    _say(f"[1/3] building the shapes data ({opts.num_train} train, {opts.num_test} held-out scenes each)")
    data_s = build_data(config, opts)

  cap = f" or {opts.minutes:g} minutes, whichever comes first" if opts.minutes > 0 else ""
  _say(f"[2/3] training {config.model.hidden_size}-wide model for {config.train.steps} steps{cap}; "
       f"the first step compiles (about a minute). TensorBoard: tensorboard --logdir {workdir}/tb")
  train_s = train_with_cap(config, workdir, opts.minutes)
  ckpt = checkpoint.Checkpointer(workdir, async_save=False, with_data=False)
  step = ckpt.latest_step()
  ckpt.close()
  _say(f"trained to step {step} in {train_s / 60:.1f} min")

  _say("[3/3] evaluating on the held-out split (understanding, captions, generation, reconstruction)")
  result, paths = evaluate.run(config, workdir, step=step)
  summary = dict(
      step=step, config=config.get("name", ""), wall_seconds=dict(data=data_s, train=train_s,
                                                                   eval=result.seconds,
                                                                   total=time.time() - t_start),
      understanding={k: dict(accuracy=v.accuracy, chance=v.chance, num=v.num)
                     for k, v in result.understanding.items()},
      caption_perplexity=result.caption_perplexity,
      caption_perplexity_uniform=result.caption_perplexity_uniform,
      generation=result.generation, generation_reference=result.generation_reference,
      reconstruction_psnr=result.reconstruction_psnr,
      files={k: os.path.relpath(v, workdir) for k, v in paths.items()})
  with open(os.path.join(workdir, "eval.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print("\n" + report.summary_table(result) + "\n", flush=True)
  _say(f"done in {(time.time() - t_start) / 60:.1f} min. Report: {paths['report']}  Samples: "
       f"{paths.get('samples', '-')}  Summary: {os.path.join(workdir, 'eval.json')}  "
       f"TensorBoard: tensorboard --logdir {workdir}/tb")
  return summary


_MINUTES = flags.DEFINE_float("minutes", DemoOptions.minutes, "Training wall-clock cap (0 = train.steps).")
_NUM_TRAIN = flags.DEFINE_integer("num_train", DemoOptions.num_train, "Training scenes to build.")
_NUM_TEST = flags.DEFINE_integer("num_test", DemoOptions.num_test, "Held-out scenes to build.")


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_ProgressOnly())
  opts = DemoOptions(num_train=_NUM_TRAIN.value, num_test=_NUM_TEST.value, minutes=_MINUTES.value)
  run(train._CONFIG.value, train._WORKDIR.value or os.environ.get("DEMO_DIR", "runs/demo"), opts)


def _with_default_config(argv: list[str]) -> list[str]:
  """argv with --config=configs/tuna2_demo.py first unless one is given (--config.* overrides apply to it)."""
  if any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    return argv
  return [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]


if __name__ == "__main__":
  sys.exit(app.run(main, argv=_with_default_config(sys.argv)))
