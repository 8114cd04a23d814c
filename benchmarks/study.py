"""The paper's claims at toy scale: Tuna-2 vs Tuna-R, masking on vs off, patch 8 vs 16, on the shapes data.

Every variant trains from the same seed on the same data stream with the same steps, batch rows and row
length (the demo config); checkpoints along the way are scored for understanding (exact match per question
kind, held-out) and the loss curves come from each run's metrics.jsonl. The last checkpoint also gets the
GenEval-style generation score. Results: benchmarks/results/study_<tag>.{json,md} and study_<tag>_*.png.

  python -m benchmarks.study               # 700 steps a variant, 4 evals: 23 min on a quiet 2-core CPU
  python -m benchmarks.study --steps=3000 --evals=6 --tag=long --variants=tuna2_p8,tuna_r_p8

"Equal compute" here is equal steps x rows x row length. Tuna-R also runs its ViT over every image (more
FLOPs per step, reported per variant); patch 16 keeps the image resolution of patch 8 (48 px a side), so
it spends 4x fewer tokens on an image (9 instead of 36 for the 48 x 48 scenes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# name -> (what it tests, config overrides over configs/tuna2_demo.py)
VARIANTS = {
    "tuna2_p8": ("Tuna-2, masking (paper schedule), patch 8", {}),
    "tuna2_p8_nomask": ("Tuna-2 without masking", {"train.mask_prob": 0.0}),
    "tuna_r_p8": ("Tuna-R (ViT encoder + connector), masking", {"model": "vision:tiny"}),
    "tuna2_p16": ("Tuna-2, patch 16 at the same resolution", {"model.patch_size": 16,
                                                               "data.max_image_patches": 9}),
}
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def base_config(steps: int, data_dir: str):
  """The demo config at `steps`, reading `data_dir` (build_data sets the tokenizer it writes there)."""
  from configs import tuna2_demo  # noqa: PLC0415

  c = tuna2_demo.get_config(f"steps={steps}")
  c.data.data_dir = data_dir
  return c


def variant_config(name: str, base):
  from configs import common  # noqa: PLC0415

  c = base.copy_and_resolve_references()
  c.checkpoint.keep = 100
  c.train.log_every = 10
  for key, value in VARIANTS[name][1].items():
    if key == "model":
      c.model.update(common.vision_config(value.split(":")[1]))
      continue
    section, field = key.split(".")
    c[section][field] = value
  return c


def step_flops(c) -> float:
  """Training FLOPs of one step on a real batch of the variant's data (padding costs nothing)."""
  from tuna2_jax import flops  # noqa: PLC0415
  from tuna2_jax.input import pipeline  # noqa: PLC0415
  from tuna2_jax.model.config import ModelConfig  # noqa: PLC0415

  batch = next(pipeline.make_train_iterator(c))
  return float(flops.train_flops(ModelConfig.from_dict(c.model.to_dict()), batch))


def run_variant(name: str, base, *, steps: int, evals: int, workdir: str, num_eval: int,
                gen_num: int) -> dict:
  """Trains one variant (checkpoint every steps/evals), scores each checkpoint; the variant's record."""
  from tuna2_jax import evaluate, train  # noqa: PLC0415
  from tuna2_jax.input import pipeline, tokenizer  # noqa: PLC0415

  c = variant_config(name, base)
  c.checkpoint.every = max(1, steps // evals)
  t0 = time.time()
  train.train_and_evaluate(c, workdir)
  train_s = time.time() - t0
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  curve = [{k: r[k] for k in ("step", "loss", "text_loss", "flow_loss") if k in r}
           for r in rows if "loss" in r]

  tok = tokenizer.get_tokenizer(c)
  examples = pipeline.make_eval_examples(c, "test", num_eval)
  accuracy = []
  for step in range(c.checkpoint.every, steps + 1, c.checkpoint.every):
    cfg, params, _ = evaluate.restore_params(workdir, step)
    per_kind, _ = evaluate.understanding_accuracy(params, cfg, examples, tok, max_new_tokens=8)
    accuracy.append(dict(step=step, **{k: v.accuracy for k, v in per_kind.items()}))
    chance = {k: v.chance for k, v in per_kind.items()}
    print(f"[study] {name} step {step}: " + " ".join(f"{k}={v.accuracy:.2f}" for k, v in per_kind.items()),
          flush=True)
  result, _ = evaluate.evaluate(c, params, cfg, step=steps, examples=examples, gen_num=gen_num, recon_num=4)
  return dict(name=name, what=VARIANTS[name][0], train_seconds=train_s, flops_per_step=step_flops(c),
              loss=curve, accuracy=accuracy, chance=chance,
              final=dict(understanding={k: v.accuracy for k, v in result.understanding.items()},
                         caption_perplexity=result.caption_perplexity, generation=result.generation,
                         reconstruction_psnr=result.reconstruction_psnr))


# ----------------------------------------------------------------------------------------------------
# Plots with PIL (matplotlib is not a dependency).


def line_plot(series: dict[str, list[tuple[float, float]]], *, title: str, ylabel: str,
              size: tuple[int, int] = (560, 360), hline: float | None = None) -> Image.Image:
  """A simple line plot: one polyline per series, axes with min/max ticks, a legend."""
  w, h = size
  left, right, top, bottom = 60, 170, 28, 40
  im = Image.new("RGB", size, "white")
  d = ImageDraw.Draw(im)
  font = ImageFont.load_default(size=11)
  pts = [p for s in series.values() for p in s]
  if not pts:
    return im
  xs, ys = [p[0] for p in pts], [p[1] for p in pts] + ([hline] if hline is not None else [])
  x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
  y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
  sx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
  sy = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
  d.rectangle((left, top, w - right, h - bottom), outline="black")
  d.text((left, 6), title, fill="black", font=font)
  for y in (y0, (y0 + y1) / 2, y1):
    d.text((4, sy(y) - 6), f"{y:.3g}", fill="black", font=font)
  for x in (x0, (x0 + x1) / 2, x1):
    d.text((sx(x) - 10, h - bottom + 4), f"{x:.0f}", fill="black", font=font)
  d.text((w // 2 - 40, h - 16), f"step   ({ylabel})", fill="black", font=font)
  if hline is not None:
    d.line([(left, sy(hline)), (w - right, sy(hline))], fill=(160, 160, 160), width=1)
  for i, (name, s) in enumerate(series.items()):
    color = COLORS[i % len(COLORS)]
    if len(s) > 1:
      d.line([(sx(x), sy(y)) for x, y in s], fill=color, width=2)
    for x, y in s:
      d.ellipse((sx(x) - 2, sy(y) - 2, sx(x) + 2, sy(y) + 2), fill=color)
    d.line([(w - right + 8, top + 8 + 16 * i), (w - right + 24, top + 8 + 16 * i)], fill=color, width=3)
    d.text((w - right + 28, top + 2 + 16 * i), name, fill="black", font=font)
  return im


def smooth(points: list[tuple[float, float]], k: int = 5) -> list[tuple[float, float]]:
  """Moving average over k logged points (the per-step losses are noisy)."""
  if len(points) < k:
    return points
  ys = np.convolve([p[1] for p in points], np.ones(k) / k, mode="valid")
  return [(points[i + k - 1][0], float(y)) for i, y in enumerate(ys)]


def write_results(records: list[dict], tag: str, meta: dict) -> dict[str, str]:
  os.makedirs(RESULTS, exist_ok=True)
  base = os.path.join(RESULTS, f"study_{tag}")
  paths = {"json": base + ".json", "md": base + ".md"}
  with open(paths["json"], "w") as f:
    json.dump(dict(meta=meta, variants=records), f, indent=2)
  for key in ("loss", "text_loss", "flow_loss"):
    series = {r["name"]: smooth([(p["step"], p[key]) for p in r["loss"] if key in p]) for r in records}
    paths[key] = f"{base}_{key}.png"
    line_plot(series, title=f"{key} (moving average of 5 logs)", ylabel=key).save(paths[key])
  kinds = sorted({k for r in records for a in r["accuracy"] for k in a if k != "step"})
  for kind in kinds:
    series = {r["name"]: [(a["step"], a[kind]) for a in r["accuracy"] if kind in a] for r in records}
    chance = float(np.mean([r["chance"][kind] for r in records if kind in r["chance"]]))
    paths[f"acc_{kind}"] = f"{base}_acc_{kind}.png"
    line_plot(series, title=f"{kind} accuracy (grey: blind guesser)", ylabel="exact match",
              hline=chance).save(paths[f"acc_{kind}"])
  lines = [f"# Study `{tag}`", "", meta["compute"], "",
           "| variant | what | train s | GFLOP/step | final loss | " + " | ".join(kinds) +
           " | caption ppl | GenEval-style | PSNR |",
           "| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in kinds) +
           " | ---: | ---: | ---: |"]
  for r in records:
    last = np.mean([p["loss"] for p in r["loss"][-5:]]) if r["loss"] else float("nan")
    fu = r["final"]
    accs = " | ".join(f"{fu['understanding'].get(k, float('nan')):.2f}" for k in kinds)
    lines.append(f"| {r['name']} | {r['what']} | {r['train_seconds']:.0f} | "
                 f"{r['flops_per_step'] / 1e9:.1f} | {last:.3f} | {accs} | {fu['caption_perplexity']:.2f} | "
                 f"{fu['generation'].get('geneval', float('nan')):.3f} | {fu['reconstruction_psnr']:.1f} |")
  chance = {k: np.mean([r["chance"][k] for r in records if k in r["chance"]]) for k in kinds}
  lines += ["", "Blind-guesser chance: " + ", ".join(f"{k} {v:.2f}" for k, v in chance.items()), "",
            *[f"![{k}]({os.path.basename(v)})" for k, v in paths.items() if v.endswith(".png")]]
  with open(paths["md"], "w") as f:
    f.write("\n".join(lines) + "\n")
  return paths


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=700)
  parser.add_argument("--evals", type=int, default=4, help="checkpoints scored along the way")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--tag", default="demo700")
  parser.add_argument("--workdir", default="runs/study")
  parser.add_argument("--num_train", type=int, default=10_000)
  parser.add_argument("--num_eval", type=int, default=100, help="held-out scenes for accuracy")
  parser.add_argument("--gen_num", type=int, default=32)
  parser.add_argument("--reuse", action="store_true", help="keep variants an earlier run of the tag finished")
  args = parser.parse_args()
  from absl import flags  # noqa: PLC0415

  flags.FLAGS.mark_as_parsed()
  from tuna2_jax import demo  # noqa: PLC0415

  base = base_config(args.steps, os.path.join(args.workdir, "data"))
  demo.build_data(base, demo.DemoOptions(num_train=args.num_train, num_test=200))
  records, t0 = [], time.time()
  for name in args.variants.split(","):
    wd = os.path.join(args.workdir, f"{args.tag}_{name}")
    done = os.path.join(wd, "record.json")
    if args.reuse and os.path.exists(done):  # a finished variant of an interrupted study
      records.append(json.load(open(done)))
      if not records[-1]["flops_per_step"]:  # recorded by an earlier version that counted padding rows
        records[-1]["flops_per_step"] = step_flops(variant_config(name, base))
      continue
    shutil.rmtree(wd, ignore_errors=True)
    records.append(run_variant(name, base, steps=args.steps, evals=args.evals, workdir=wd,
                               num_eval=args.num_eval, gen_num=args.gen_num))
    with open(done, "w") as f:
      json.dump(records[-1], f)
  import jax  # noqa: PLC0415

  meta = dict(steps=args.steps, rows_per_step=base.data.global_batch_size, seq_len=base.data.seq_len,
              num_train=args.num_train, num_eval=args.num_eval, wall_seconds=time.time() - t0,
              cpus=os.cpu_count(), jax=jax.__version__,
              compute=(f"Each variant: {args.steps} steps x {base.data.global_batch_size} rows x "
                       f"{base.data.seq_len} tokens on {os.cpu_count()} CPU cores (shared with other jobs), "
                       f"same seed and data stream; accuracy on {args.num_eval} held-out scenes, greedy "
                       "exact match."))
  paths = write_results(records, args.tag, meta)
  print(open(paths["md"]).read())


if __name__ == "__main__":
  main()
