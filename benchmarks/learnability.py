"""Learnability probes: can the demo's model learn one skill, and from how many examples? Minutes, not ten.

The demo mixes every task in ten minutes, so when a skill does not appear there it is unclear whether the
model cannot represent it or the budget is short. Each probe trains the demo's model alone (no data
pipeline, a jitted AdamW loop over 32 one-document rows a step, lr 4e-3 warmed up for 30 steps then
cosine to 0.1x) on one skill and measures it on fresh examples:

  position      "Where is the <color> <shape>?" about one object of a scene -> its 3 x 3 grid cell;
                teacher-forced exact match of the whole answer on 200 fresh scenes (--examples).
                --objects=one puts a single 10-13 px shape on a blank canvas; --objects=dataset uses the
                shapes/small scenes (1-3 shapes of 10-14 px, each in its own cell of the 3 x 3 grid,
                sometimes a word; results recorded before those scenes used 10-23 px shapes anywhere), where
                the model must also pick the named shape. --docs says what it trains on: "probe" the rows
                above; the trainer's understanding documents (tuna2_jax.input.tasks, up to 8 turns in a
                random order) about dataset scenes holding "position" only the scene's position question,
                "all" all its questions and the caption, "first" the same with the position questions first
                (the data.qa_first_kinds option), "half" one position-only and one "all" document in turn;
                scored then on the answer without its EOS (an answer mid-document ends in a newline).
  conditioning  generation documents at t = 0 (pure noise in, so only the prompt informs), x-prediction
                MSE; reports the mean color x-hat paints for each prompt color. --targets=objects draws one
                shape (--shape_px, default 10-13) anywhere (the conditional mean is ~95 % white),
                --targets=centered always in the middle, --targets=filled fills the canvas with the prompt's
                color (the largest possible signal), --targets=cell fills the one cell of the 3 x 3 grid that
                the prompt names (the place alone, with a large signal); for objects and cell it also
                reports place_accuracy: how often x-hat inks the named cell most (chance 1/9).

  python -m benchmarks.learnability --probe=position --objects=dataset --steps=600
  python -m benchmarks.learnability --probe=position --docs=all --lr=1e-3
  python -m benchmarks.learnability --probe=conditioning --targets=filled --steps=100
  python -m benchmarks.learnability --probe=conditioning --targets=cell --steps=600

The text is tokenized by a 512-id BPE trained here on scene texts, as the demo trains its own.
Results: benchmarks/results/learnability_<probe>_<variant>.json, and a table on stdout.
"""

from __future__ import annotations

import abc
import argparse
import json
import os
import platform
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data import shapes_render as sr
from tuna2_jax import losses, scoring, sequence
from tuna2_jax.input import bpe, tasks, tokenizer
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.patch_embed import normalize_pixels
from tuna2_jax.model.tuna2 import Tuna2

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROWS, SEQ_LEN, DOC_SEQ_LEN, CANVAS = 32, 72, 192, 48


def scene_tokenizer(num_scenes: int = 2000) -> tokenizer.HFTokenizer:
  """The 512-id BPE of the demo, trained on the texts of shapes/small training scenes."""
  texts = []
  for i in range(num_scenes):
    ex = sr.make_scene_example(0, "train", i, "small")
    texts += bpe.example_texts(ex["caption"], ex["prompt"], ex["qa"])
  with tempfile.TemporaryDirectory() as tmp:  # HFTokenizer reads the file once, at construction
    path = os.path.join(tmp, "tokenizer.json")
    bpe.train_bpe(texts, 512).save(path)
    return tokenizer.HFTokenizer(path)


def one_object_scene(rng: np.random.Generator, sizes: tuple[int, int] = (10, 13),
                     centered: bool = False) -> sr.Scene:
  """One shape of a side in [sizes[0], sizes[1]] px on a blank canvas, anywhere or in its middle."""
  size = int(rng.integers(sizes[0], sizes[1] + 1))
  x0, y0 = ((CANVAS - size) // 2,) * 2 if centered else (int(v) for v in rng.integers(0, CANVAS - size, 2))
  shape = sr.Shape(str(rng.choice(sr.SHAPES)), str(rng.choice(list(sr.COLORS))), x0, y0, size)
  return sr.Scene(CANVAS, CANVAS, (shape,))


class Task(abc.ABC):
  """A probe's data: `batch()` -> (rows, what each row asks for); `train_batch()` -> rows to train on."""

  @abc.abstractmethod
  def batch(self) -> tuple[dict[str, np.ndarray], list]:
    """Rows to score and, per row, what it asks for (an answer, or a color and a grid cell)."""

  def train_batch(self) -> dict[str, np.ndarray]:
    return self.batch()[0]


class PositionTask(Task):
  """Rows of [BOS] [image] question answer [EOS]; the loss is on the answer."""

  def __init__(self, tok, objects: str, seed: int):
    self.tok, self.objects, self.rng, self.index = tok, objects, np.random.default_rng(seed), 0

  def example(self) -> tuple[np.ndarray, str, str]:
    if self.objects == "one":
      scene = one_object_scene(self.rng)
      return sr.render(scene), scene.objects[0].name(), scene.position(scene.objects[0])
    self.index += 1
    ex = sr.make_scene_example(0, "train", self.index, "small")
    names = [f"{o['color']} {o['shape']}" for o in ex["meta"]["objects"]]
    unique = [i for i, n in enumerate(names) if names.count(n) == 1] or [0]
    i = unique[int(self.rng.integers(len(unique)))]
    return ex["image"], names[i], ex["meta"]["objects"][i]["position"]

  def batch(self) -> tuple[dict[str, np.ndarray], list[str]]:
    sp, rows, answers = self.tok.special, [], []
    for _ in range(ROWS):
      image, name, answer = self.example()
      answers.append(answer)
      doc = [sequence.Text([sp.bos], loss=False), sequence.Image(image, "understand"),
             sequence.Text(self.tok.encode(f"Where is the {name}?\n"), loss=False),
             sequence.Text(self.tok.encode(answer) + [sp.eos], loss=True)]
      rows.append(sequence.pack_documents([doc], seq_len=SEQ_LEN, patch_size=8, special=sp))
    return sequence.stack_rows(rows), answers


class DocumentTask(PositionTask):
  """Trains on the trainer's understanding documents about shapes/small scenes; scored as PositionTask."""

  def __init__(self, tok, docs: str, seed: int):
    super().__init__(tok, "dataset", seed)
    self.docs = docs
    self.opts = tasks.TaskOptions(seq_len=DOC_SEQ_LEN, patch_size=8, max_image_patches=36, max_qa_turns=8,
                                  qa_first_kinds=("position",) if docs == "first" else ())

  def train_batch(self) -> dict[str, np.ndarray]:
    rows = []
    while len(rows) < ROWS:
      self.index += 1
      ex = sr.make_scene_example(0, "train", self.index, "small")
      qa, caption = ex["qa"], ex["caption"]
      if self.docs == "position" or (self.docs == "half" and len(rows) % 2 == 0):
        qa, caption = [q for q in qa if q["kind"] == "position"], None
        if not qa:  # every shape has a twin: nothing to ask
          continue
      doc = tasks.understanding_document(types.SimpleNamespace(image=ex["image"], qa=qa, caption=caption),
                                         self.rng, self.tok, self.opts)
      rows.append(sequence.pack_documents([doc], seq_len=DOC_SEQ_LEN, patch_size=8, special=self.tok.special))
    return sequence.stack_rows(rows)

  def batch(self) -> tuple[dict[str, np.ndarray], list[str]]:
    rows, answers = super().batch()
    # Score the answer alone: in the trainer's documents an answer ends in EOS only when it is the last turn.
    eos_next = np.roll(rows["tokens"], -1, axis=-1) == self.tok.special.eos
    rows["text_loss"] = np.where(eos_next, 0, rows["text_loss"]).astype(np.float32)
    return rows, answers


class ConditioningTask(Task):
  """Rows of [BOS] prompt [image to draw]; per row, the prompt's color and the (row, col) of its place."""

  def __init__(self, tok, targets: str, seed: int, sizes: tuple[int, int] = (10, 13)):
    self.tok, self.targets, self.rng, self.sizes = tok, targets, np.random.default_rng(seed), sizes

  def batch(self) -> tuple[dict[str, np.ndarray], list[tuple[str, tuple[int, int]]]]:
    sp, rows, labels = self.tok.special, [], []
    for _ in range(ROWS):
      scene = one_object_scene(self.rng, self.sizes, centered=self.targets == "centered")
      color = scene.objects[0].color
      cell = divmod(scoring.POSITIONS.index(scene.position(scene.objects[0])), 3)
      image = sr.render(scene)
      if self.targets == "filled":
        image = np.full(image.shape, sr.COLORS[color], np.uint8)
      elif self.targets == "cell":
        image = np.full(image.shape, sr.BACKGROUND, np.uint8)
        side = CANVAS // 3
        image[cell[0] * side:(cell[0] + 1) * side, cell[1] * side:(cell[1] + 1) * side] = sr.COLORS[color]
      doc = [sequence.Text([sp.bos, *self.tok.encode(sr.prompt(scene))], loss=False),
             sequence.Image(image, "generate")]
      rows.append(sequence.pack_documents([doc], seq_len=SEQ_LEN, patch_size=8, special=sp))
      labels.append((color, cell))
    return sequence.stack_rows(rows), labels


def place_accuracy(x_hat: np.ndarray, drawn: np.ndarray, cells: list[tuple[int, int]]) -> float:
  """How often the named cell holds the most ink (mean distance from white) of the 3 x 3 cells of x-hat."""
  side, hits = CANVAS // 3, []
  for values, mask, cell in zip(x_hat, drawn, cells, strict=True):
    image = sequence.unpatchify(values[mask], (CANVAS // 8, CANVAS // 8), 8)  # [-1, 1], white = 1
    ink = (1.0 - image).reshape(3, side, 3, side, 3).mean(axis=(1, 3, 4))
    hits.append(np.unravel_index(np.argmax(ink), ink.shape) == cell)
  return float(np.mean(hits))


def t0_inputs(batch, key):
  """Pure noise at the drawn image's patches (t = 0), clean elsewhere; (pixels, t, targets, mask)."""
  x = normalize_pixels(batch["patches"])
  drawn = (batch["image_role"] == sequence.GENERATE) & (batch["modality"] == sequence.PATCH)
  z = jnp.where(drawn[..., None], jax.random.normal(key, x.shape), x)
  t = jnp.where(batch["image_role"] == sequence.GENERATE, 0.0, 1.0)
  return z, t, x, drawn


def run(args) -> dict:
  from configs import common, tuna2_demo  # noqa: PLC0415

  c = tuna2_demo.get_config()
  c.model.update(common.parse_arg(",".join(args.model), **c.model.to_dict()))  # typed, unknown fields named
  cfg = ModelConfig.from_dict(c.model.to_dict())
  tok = scene_tokenizer()
  model = Tuna2(cfg)
  position = args.probe == "position"
  if not position:
    task = ConditioningTask(tok, args.targets, args.seed, tuple(map(int, args.shape_px.split(","))))
  elif args.docs == "probe":
    task = PositionTask(tok, args.objects, args.seed)
  else:
    task = DocumentTask(tok, args.docs, args.seed)

  def loss_fn(params, batch, key):
    if position:
      out = model.apply({"params": params}, batch, flow=False)
      total, count = losses.text_cross_entropy(out.logits, batch["tokens"], batch["text_loss"])
      return total / count
    z, t, x, drawn = t0_inputs(batch, key)
    out = model.apply({"params": params}, batch, pixels=z, t=t, logits=False)
    return jnp.sum(jnp.mean((out.x_pred - x) ** 2, -1) * drawn) / jnp.sum(drawn)

  first = task.train_batch()
  params = model.init(jax.random.key(args.seed), jax.tree.map(jnp.asarray, first))["params"]
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, min(30, args.steps // 2),
                                                         max(args.steps, 2), args.lr * 0.1),
                    weight_decay=0.0)
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  t0, curve = time.time(), []
  for i in range(args.steps):
    batch = task.train_batch()
    params, state, loss = step(params, state, jax.tree.map(jnp.asarray, batch), jax.random.key(i))
    if i % 50 == 0 or i == args.steps - 1:
      curve.append(dict(step=i + 1, loss=float(loss)))
  seconds = time.time() - t0

  if position:
    batches = [jax.tree.map(jnp.asarray, task.batch()[0]) for _ in range(-(-args.examples // ROWS))]
    hits = []
    for b in batches:
      logits = model.apply({"params": params}, b, flow=False).logits
      targets, weight = jnp.roll(b["tokens"], -1, axis=-1), b["text_loss"] > 0
      hits.append(np.asarray(jnp.all((jnp.argmax(logits, -1) == targets) | ~weight, axis=-1)))
    measured = dict(exact_match=float(np.concatenate(hits)[:args.examples].mean()), examples=args.examples)
  else:
    b, labels = task.batch()
    colors = [color for color, _ in labels]
    b = jax.tree.map(jnp.asarray, b)
    z, t, x, drawn = t0_inputs(b, jax.random.key(10_000))
    x_hat = np.asarray(model.apply({"params": params}, b, pixels=z, t=t, logits=False).x_pred)
    x, drawn = np.asarray(x), np.asarray(drawn)

    def mean_rgb(values, rows):
      px = np.concatenate([values[i][drawn[i]].reshape(-1, 3) for i in rows])
      return [round(float(v), 1) for v in (px.mean(0) + 1) * 127.5]

    by_color = {color: [i for i, name in enumerate(colors) if name == color] for color in sr.COLORS}
    painted = {color: mean_rgb(x_hat, rows) for color, rows in by_color.items() if rows}
    target = {color: mean_rgb(x, rows) for color, rows in by_color.items() if rows}
    # How far apart the colors painted for different prompts are (0 = the prompt is ignored).
    measured = dict(mean_rgb_painted=painted, mean_rgb_target=target,
                    spread_painted=float(np.ptp(np.array(list(painted.values())), 0).max()),
                    spread_target=float(np.ptp(np.array(list(target.values())), 0).max()))
    if args.targets in ("objects", "cell"):
      measured["place_accuracy"] = place_accuracy(x_hat, drawn, [cell for _, cell in labels])
  if position:
    variant = args.objects if args.docs == "probe" else f"docs_{args.docs}"
  else:
    px = args.shape_px.replace(",", "-")
    variant = args.targets if args.targets in ("filled", "cell") else f"{args.targets}_{px}px"
  return dict(probe=args.probe, variant=variant, steps=args.steps, rows_per_step=ROWS, lr=args.lr,
              seed=args.seed, model_overrides=args.model, train_seconds=round(seconds, 1), curve=curve,
              measured=measured,
              machine=dict(cpus=os.cpu_count(), machine=platform.machine(), jax=jax.__version__,
                           backend=jax.default_backend()))


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--probe", choices=("position", "conditioning"), default="position")
  p.add_argument("--objects", choices=("one", "dataset"), default="dataset")
  p.add_argument("--docs", choices=("probe", "position", "all", "first", "half"), default="probe",
                 help="position probe's training rows: its own, or the trainer's documents (see above)")
  p.add_argument("--targets", choices=("objects", "centered", "filled", "cell"), default="objects")
  p.add_argument("--shape_px", default="10,13", help="LO,HI: side of the conditioning probe's shape")
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--lr", type=float, default=4e-3)
  p.add_argument("--seed", type=int, default=1)
  p.add_argument("--examples", type=int, default=200, help="fresh examples the position probe is scored on")
  p.add_argument("--model", action="append", default=[],
                 help="a model field=value over the demo's, e.g. rope=mrope (repeatable)")
  p.add_argument("--tag", default="", help="suffix of the result file")
  args = p.parse_args(argv)
  result = run(args)
  name = f"learnability_{result['probe']}_{result['variant']}{'_' + args.tag if args.tag else ''}.json"
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, name), "w") as f:
    json.dump(result, f, indent=1)
  print(f"| probe | variant | steps | train s | result |\n| --- | --- | ---: | ---: | --- |\n"
        f"| {result['probe']} | {result['variant']} | {result['steps']} | {result['train_seconds']} | "
        f"{json.dumps(result['measured'])} |")
  print(f"wrote benchmarks/results/{name}")


if __name__ == "__main__":
  main()
