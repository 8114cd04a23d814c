"""Evaluates a run on the held-out split: understanding, caption perplexity, generation, reconstruction.

  python -m tuna2_jax.evaluate --workdir=runs/demo [--step=N] [--config.eval.num_examples=32]

Restores parameters only (the EMA when the run kept one). The config is the run's own `config.json`;
`--config.eval.*` (and any other field) overrides it. Results:
  - understanding: greedy answers to the held-out questions, exact match per question kind, next to the
    accuracy of a blind guesser (the most common answer of each question template, fit on these very
    questions: what a model that ignores the image could reach at best);
  - caption perplexity per token of the held-out captions given their image (uniform guessing = vocab size);
  - generation: images for held-out prompts (CFG, sampler and steps from `eval.*`) scored by
    tuna2_jax.scoring (a GenEval analogue), with the same scorer run on the real images as its ceiling;
  - reconstruction PSNR of held-out images (tuna2_jax.sample.reconstruct, batched).
Writes `eval_<step>.json`, `eval_<step>.md`, `samples_<step>.png` in the workdir, and TensorBoard scalars and
images under `eval/`. `periodic_eval` is the trainer's hook (`eval.every`) on a subset.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tuna2_jax import losses, report, sample, scoring, sequence
from tuna2_jax.input import examples as examples_lib
from tuna2_jax.input import images as images_lib
from tuna2_jax.input import tasks
from tuna2_jax.input.tokenizer import Tokenizer
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.patch_embed import denormalize_pixels
from tuna2_jax.model.tuna2 import Tuna2

# Defaults of the `eval` fields, for configs written before a field existed (see configs/common.py).
EVAL_DEFAULTS = dict(every=0, num_examples=64, periodic_examples=16, gen_num=32, gen_size=0, gen_steps=25,
                     cfg_scale=3.0, sampler="euler", time_shift=1.0, recon_num=8, max_new_tokens=16, seed=0,
                     batch_size=64)


@dataclasses.dataclass(frozen=True)
class KindResult:
  """Exact-match accuracy of one question kind and the blind guesser's on the same questions."""
  accuracy: float
  chance: float
  num: int


@dataclasses.dataclass
class EvalResult:
  step: int
  understanding: dict[str, KindResult]
  caption_perplexity: float
  caption_perplexity_uniform: float   # perplexity of guessing uniformly over the vocabulary
  generation: dict[str, float]        # scoring.aggregate of the generated images
  generation_reference: dict[str, float]  # the same scorer on the real held-out images at the same size
  reconstruction_psnr: float
  seconds: float
  samples: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # a few answers, for the report

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["understanding"] = {k: dataclasses.asdict(v) for k, v in self.understanding.items()}
    return d

  def scalars(self) -> dict[str, float]:
    """Flat name -> value for TensorBoard and metrics.jsonl."""
    out = {f"acc_{k}": v.accuracy for k, v in self.understanding.items()}
    out.update({f"chance_{k}": v.chance for k, v in self.understanding.items()})
    out.update({f"gen_{k}": v for k, v in self.generation.items() if k != "num_images"})
    out.update(caption_perplexity=self.caption_perplexity, reconstruction_psnr=self.reconstruction_psnr)
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def eval_option(config: ml_collections.ConfigDict, name: str):
  return config.eval.get(name, EVAL_DEFAULTS[name]) if "eval" in config else EVAL_DEFAULTS[name]


# ----------------------------------------------------------------------------------------------------
# Understanding: exact match per kind, and the blind guesser.

_NAMES = re.compile(rf"\b({'|'.join([*scoring.COLORS, *scoring.SHAPES])})\b")


def question_template(question: str) -> str:
  """The question with color and shape names blanked: what a blind guesser can condition on."""
  return _NAMES.sub("_", question)


def blind_accuracy(questions: Sequence[str], answers: Sequence[str]) -> float:
  """Accuracy of answering each template's most common answer (fit on these questions)."""
  by_template: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for q, a in zip(questions, answers, strict=True):
    by_template[question_template(q)][a] += 1
  return sum(c.most_common(1)[0][1] for c in by_template.values()) / max(len(questions), 1)


def normalize_answer(text: str) -> str:
  """The first line, stripped, lower case, without a final period."""
  return text.split("\n", 1)[0].strip().lower().rstrip(".")


def understanding_accuracy(params, cfg: ModelConfig, examples: Sequence[examples_lib.Example], tok: Tokenizer,
                           *, max_new_tokens: int = 16, batch_size: int = 64
                           ) -> tuple[dict[str, KindResult], list[dict[str, str]]]:
  """Greedy answers to every held-out question; ({kind: KindResult}, [{kind, question, answer, model}])."""
  items = [(ex, q) for ex in examples for q in ex.qa]
  rows = []
  for i in range(0, len(items), batch_size):
    chunk = items[i:i + batch_size]
    if len(items) > batch_size:  # pad the last chunk: one compiled shape
      chunk += [chunk[-1]] * (batch_size - len(chunk))
    out = sample.generate_text(params, cfg, [tok.encode(q["question"] + "\n") for _, q in chunk],
                               images=[[ex.image] for ex, _ in chunk], max_new_tokens=max_new_tokens,
                               special=tok.special)
    rows += [dict(kind=q["kind"], question=q["question"], answer=q["answer"], model=tok.decode(ids))
             for (_, q), ids in zip(chunk, out, strict=True)]
  rows = rows[:len(items)]
  result = {}
  for kind in sorted({r["kind"] for r in rows}):
    group = [r for r in rows if r["kind"] == kind]
    correct = [normalize_answer(r["model"]) == normalize_answer(r["answer"]) for r in group]
    result[kind] = KindResult(accuracy=float(np.mean(correct)), num=len(group),
                              chance=blind_accuracy([r["question"] for r in group],
                                                    [r["answer"] for r in group]))
  return result, rows


# ----------------------------------------------------------------------------------------------------
# Caption perplexity.


def caption_rows(examples: Sequence[examples_lib.Example], tok: Tokenizer, patch_size: int
                 ) -> dict[str, np.ndarray]:
  """One row per example, `[BOS] [image] Describe the image.\\n caption EOS`, loss on the caption + EOS."""
  sp = tok.special
  docs = [[sequence.Text([sp.bos], loss=False), sequence.Image(ex.image, "understand"),
           sequence.Text(tok.encode(tasks.CAPTION_QUESTION + "\n"), loss=False),
           sequence.Text(tok.encode(ex.caption) + [sp.eos], loss=True)] for ex in examples if ex.caption]
  length = max(sequence.document_length(d, patch_size) for d in docs)
  length = -(-length // 32) * 32  # a few compiled shapes across runs, not one per length
  return sequence.stack_rows([sequence.pack_documents([d], seq_len=length, patch_size=patch_size, special=sp)
                              for d in docs])


def caption_perplexity(params, cfg: ModelConfig, examples: Sequence[examples_lib.Example], tok: Tokenizer,
                       *, batch_size: int = 16) -> float:
  """exp(mean next-token NLL) of the held-out captions given their images (teacher forcing)."""
  rows = caption_rows(examples, tok, cfg.patch_size)
  n = rows["tokens"].shape[0]
  pad = -n % batch_size
  if pad:  # repeated rows with zero loss weight keep one compiled shape
    rows = {k: np.concatenate([v, v[:1].repeat(pad, 0)]) for k, v in rows.items()}
    rows["text_loss"][n:] = 0.0

  @jax.jit
  def nll(params, batch):
    out = Tuna2(cfg).apply({"params": params}, batch, flow=False)
    return losses.text_cross_entropy(out.logits, batch["tokens"], batch["text_loss"])

  total = count = 0.0
  for i in range(0, rows["tokens"].shape[0], batch_size):
    s, c = nll(params, {k: jnp.asarray(v[i:i + batch_size]) for k, v in rows.items()})
    total, count = total + float(s), count + float(c)
  return float(np.exp(total / max(count, 1.0)))


# ----------------------------------------------------------------------------------------------------
# Generation and reconstruction.


def eval_canvas(config: ml_collections.ConfigDict) -> int:
  """Side of the square images generated for scoring: eval.gen_size, else the largest square under the
  patch budget (positions in prompts are relative, so one size serves every prompt)."""
  size = eval_option(config, "gen_size")
  p = config.model.patch_size
  return size or math.isqrt(config.data.get("max_image_patches", 256)) * p


def generate_for_prompts(params, cfg: ModelConfig, prompts: Sequence[str], tok: Tokenizer, *, size: int,
                         steps: int, cfg_scale: float, sampler: str, time_shift: float, noise_scale: float,
                         t_eps: float, seed: int, batch_size: int = 32) -> np.ndarray:
  """uint8 [N, size, size, 3], batches of `batch_size` prompts (the last one padded)."""
  out = []
  for i in range(0, len(prompts), batch_size):
    chunk = list(prompts[i:i + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n if len(prompts) > batch_size else 0)
    out.append(sample.generate_image(
        params, cfg, [tok.encode(p) for p in chunk], height=size, width=size, steps=steps,
        cfg_scale=cfg_scale, sampler=sampler, seed=seed + i, time_shift=time_shift, noise_scale=noise_scale,
        t_eps=t_eps, special=tok.special)[:n])
  return np.concatenate(out)


def reconstruct_batch(params, cfg: ModelConfig, images: np.ndarray, tok: Tokenizer, *, steps: int,
                      sampler: str, noise_scale: float, t_eps: float, seed: int) -> np.ndarray:
  """sample.reconstruct for a batch of same-size images in one call: `[BOS] [image] [target]`, no guidance."""
  b, h, w, _ = images.shape
  p = cfg.patch_size
  docs = [sample.generation_document([], h, w, tok.special, source_image=im) for im in images]
  rows = {k: jnp.asarray(v) for k, v in
          sample.pack_left(docs, patch_size=p, special=tok.special, drop_last=1).items()}
  n = (h // p) * (w // p)
  z0 = noise_scale * jax.random.normal(jax.random.key(seed), (b, n, cfg.patch_dim))
  x = sample.sample_patches(params, rows, z0, cfg=cfg, steps=steps, sampler=sampler, guided=False,
                            cfg_scale=1.0, cfg_interval=(0.0, 1.0), time_shift=1.0, t_eps=float(t_eps),
                            use_cache=True)
  return np.asarray(sequence.unpatchify(denormalize_pixels(x), (h // p, w // p), p))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """Mean over images of the per-image PSNR in dB (uint8 peak 255); a, b: [N, H, W, 3] or [H, W, 3]."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim == 3:
    a, b = a[None], b[None]
  mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


# ----------------------------------------------------------------------------------------------------
# The whole evaluation.


def evaluate(config: ml_collections.ConfigDict, params, cfg: ModelConfig, *, step: int,
             examples: Sequence[examples_lib.Example] | None = None, num_examples: int | None = None,
             gen_examples: Sequence[examples_lib.Example] | None = None, gen_num: int | None = None,
             recon_num: int | None = None) -> tuple[EvalResult, dict[str, np.ndarray]]:
  """(result, images for the artifacts) of `params` on the held-out split.

  `examples` (questions, captions) and `gen_examples` (prompts, reconstructed images) default to the first
  `num_examples` / `gen_num` held-out examples of the datasets the mixture uses for those tasks.
  """
  from tuna2_jax.input import pipeline, tokenizer  # noqa: PLC0415  (Grain / TFDS only when evaluating)

  t0 = time.time()
  tok = tokenizer.get_tokenizer(config)
  opt = lambda name: eval_option(config, name)  # noqa: E731
  split, gen_num = config.data.get("eval_split", "test"), gen_num or opt("gen_num")
  if examples is None:
    examples = pipeline.make_eval_examples(config, split, num_examples or opt("num_examples"))
  if gen_examples is None:
    gen_examples = pipeline.make_eval_examples(config, split, gen_num, task="generate")
  understanding, answers = understanding_accuracy(
      params, cfg, examples, tok, max_new_tokens=opt("max_new_tokens"), batch_size=opt("batch_size"))
  ppl = caption_perplexity(params, cfg, examples, tok)

  size = eval_canvas(config)
  gen_examples = [ex for ex in gen_examples if scoring.parse_prompt(ex.prompt)][:gen_num]
  prompts = [ex.prompt for ex in gen_examples]
  tc = config.train
  generated = generate_for_prompts(
      params, cfg, prompts, tok, size=size, steps=opt("gen_steps"), cfg_scale=opt("cfg_scale"),
      sampler=opt("sampler"), time_shift=opt("time_shift"), noise_scale=tc.noise_scale, t_eps=tc.t_eps,
      seed=opt("seed"))
  real = np.stack([images_lib.resize(ex.image, size, size) for ex in gen_examples])
  wanted = [scoring.parse_prompt(p) for p in prompts]
  words = [scoring.parse_prompt_word(p) for p in prompts]
  gen_scores = [scoring.score_image(im, o, w) for im, o, w in zip(generated, wanted, words, strict=True)]
  ref_scores = [scoring.score_image(im, o, w) for im, o, w in zip(real, wanted, words, strict=True)]

  originals = real[:recon_num if recon_num is not None else opt("recon_num")]
  recons = (reconstruct_batch(params, cfg, originals, tok, steps=opt("gen_steps"), sampler=opt("sampler"),
                              noise_scale=tc.noise_scale, t_eps=tc.t_eps, seed=opt("seed"))
            if len(originals) else originals)
  result = EvalResult(
      step=int(step), understanding=understanding, caption_perplexity=ppl,
      caption_perplexity_uniform=float(tok.vocab_size), generation=scoring.aggregate(gen_scores),
      generation_reference=scoring.aggregate(ref_scores),
      reconstruction_psnr=psnr(originals, recons) if len(originals) else float("nan"),
      seconds=time.time() - t0, samples=answers[:24])
  grids = {"samples": report.sample_grid(generated, real, prompts, gen_scores),
           "reconstructions": report.pair_grid(originals, recons) if len(originals) else None}
  return result, {k: v for k, v in grids.items() if v is not None}


def write_artifacts(result: EvalResult, grids: dict[str, np.ndarray], workdir: str, *,
                    writer=None) -> dict[str, str]:
  """eval_<step>.json, eval_<step>.md, <grid>_<step>.png and TensorBoard; returns the paths written."""
  from PIL import Image  # noqa: PLC0415

  os.makedirs(workdir, exist_ok=True)
  paths = {"json": os.path.join(workdir, f"eval_{result.step}.json"),
           "report": os.path.join(workdir, f"eval_{result.step}.md")}
  for name, grid in grids.items():
    paths[name] = os.path.join(workdir, f"{name}_{result.step}.png")
    Image.fromarray(grid).save(paths[name])
  with open(paths["json"], "w") as f:
    json.dump(result.to_json(), f, indent=2)
  with open(paths["report"], "w") as f:
    f.write(report.markdown(result, {k: os.path.basename(v) for k, v in paths.items()}))
  own = writer is None
  if own:
    from tuna2_jax.metric_writer import MetricWriter  # noqa: PLC0415
    writer = MetricWriter(workdir, total_steps=result.step, enabled=jax.process_index() == 0)
  writer.write_scalars(result.step, result.scalars(), prefix="eval")
  writer.write_images(result.step, {f"eval/{k}": v for k, v in grids.items()})
  if own:
    writer.close()
  return paths


def periodic_eval(config: ml_collections.ConfigDict, params, cfg: ModelConfig, workdir: str, step: int,
                  writer) -> EvalResult:
  """The trainer's `eval.every` hook: a subset (eval.periodic_examples), scalars + images + files."""
  n = eval_option(config, "periodic_examples")
  result, grids = evaluate(config, params, cfg, step=step, num_examples=n, gen_num=min(n, 16),
                           recon_num=min(n, 4))
  if jax.process_index() == 0:
    write_artifacts(result, grids, workdir, writer=writer)
    print(report.summary_table(result), flush=True)
  return result


# ----------------------------------------------------------------------------------------------------
# Entry point.


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config.json (written by the trainer) as a ConfigDict."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir?")
  with open(path) as f:
    config = json.load(f)
  # Runs written before an eval field existed get its default (so --config.eval.<field> can override it).
  config["eval"] = {**EVAL_DEFAULTS, **config.get("eval", {})}
  return ml_collections.ConfigDict(config)


def restore_params(workdir: str, step: int | None = None) -> tuple[ModelConfig, Any, int]:
  """(model config, params, step) of a run's checkpoint: the EMA parameters when the run kept them."""
  from tuna2_jax import checkpoint  # noqa: PLC0415

  ckpt = checkpoint.Checkpointer(workdir, async_save=False, with_data=False)
  step = ckpt.latest_step() if step is None else step
  ckpt.close()
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {checkpoint.checkpoint_dir(workdir)}")
  if hasattr(checkpoint, "restore_params"):
    cfg, params = checkpoint.restore_params(workdir, step=step)
    return cfg, params, int(step)
  import orbax.checkpoint as ocp  # noqa: PLC0415  (fallback: the whole state, unsharded, params kept)

  config = load_run_config(workdir)
  manager = ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir), item_names=("state",))
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  manager.close()
  ema = state.get("ema_params")
  params = ema if config.optim.get("ema_decay", 0.0) > 0 and ema else state["params"]
  return ModelConfig.from_dict(config.model.to_dict()), params, int(step)


def run(config: ml_collections.ConfigDict, workdir: str, *,
        step: int | None = None) -> tuple[EvalResult, dict[str, str]]:
  """Restores, evaluates and writes every artifact; (result, paths)."""
  cfg, params, step = restore_params(workdir, step)
  result, grids = evaluate(config, params, cfg, step=step)
  paths = write_artifacts(result, grids, workdir)
  return result, paths


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags, logging  # noqa: PLC0415

  logging.set_verbosity(logging.WARNING)  # the libraries' INFO lines would bury the table
  result, paths = run(flags.FLAGS.config, flags.FLAGS.workdir, step=flags.FLAGS.step)
  print(report.summary_table(result))
  print("\n".join(f"{k}: {v}" for k, v in paths.items()))


def _workdir_from_argv(argv: Sequence[str]) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--workdir="):
      return a.split("=", 1)[1]
    if a == "--workdir" and i + 1 < len(argv):
      return argv[i + 1]
  raise SystemExit("usage: python -m tuna2_jax.evaluate --workdir=DIR [--step=N] [--config.eval.X=V ...]")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  # The run's own config is the flag's default, so --config.eval.* overrides apply to it.
  _workdir = _workdir_from_argv(sys.argv)
  config_flags.DEFINE_config_dict("config", load_run_config(_workdir), "The run's config (overridable).")
  flags.DEFINE_string("workdir", None, "The training workdir (config.json and checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
  app.run(main)
