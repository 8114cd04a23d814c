"""Human-readable renderings of an evaluation: the console table, the markdown report, the image grids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
  from tuna2_jax.evaluate import EvalResult
  from tuna2_jax.scoring import ImageScore

GEN_ROWS = (("geneval", "GenEval-style mean of the 5 categories"), ("counting", "count right"),
            ("colors", "colors right"), ("shapes", "shape kinds right"),
            ("color_attr", "colors bound to the right shapes"), ("position", "everything incl. positions"),
            ("object_recall", "prompted (shape, color) pairs found"),
            ("text", "the prompted word written (read back by glyph matching; prompts with a word)"))


def normalize(text: str) -> str:
  """A model answer as one table cell: its first line."""
  return text.split("\n", 1)[0].replace("|", "/")


def _fmt(x: float | None, digits: int = 3) -> str:
  return "-" if x is None else f"{x:.{digits}f}"


def summary_table(result: EvalResult) -> str:
  """The console summary: one line per understanding kind, then perplexity, generation, PSNR."""
  lines = [f"evaluation at step {result.step} ({result.seconds:.0f} s)",
           f"{'understanding':<22}{'n':>5}{'accuracy':>10}{'chance':>9}"]
  for kind, r in result.understanding.items():
    lines.append(f"  {kind:<20}{r.num:>5}{r.accuracy:>10.3f}{r.chance:>9.3f}")
  lines.append(f"{'caption perplexity':<27}{result.caption_perplexity:>10.2f}"
               f"{result.caption_perplexity_uniform:>9.0f}  (uniform)")
  lines.append(f"{'generation':<27}{'model':>10}{'real':>9}  (the scorer on the real images)")
  for key, _ in GEN_ROWS:
    lines.append(f"  {key:<25}{_fmt(result.generation.get(key)):>10}"
                 f"{_fmt(result.generation_reference.get(key)):>9}")
  lines.append(f"{'reconstruction PSNR':<27}{result.reconstruction_psnr:>10.2f} dB")
  return "\n".join(lines)


def markdown(result: EvalResult, files: Mapping[str, str]) -> str:
  """The report: tables with chance levels and the scorer's ceiling, the sample grid, example answers."""
  out = [f"# Evaluation at step {result.step}", "",
         "## Understanding (exact match, greedy)", "",
         "Chance = a blind guesser answering each question template's most common answer, fit on these very "
         "questions: the best a model that ignores the image can do.", "",
         "| kind | questions | accuracy | chance |", "| --- | ---: | ---: | ---: |"]
  out += [f"| {k} | {r.num} | {r.accuracy:.3f} | {r.chance:.3f} |" for k, r in result.understanding.items()]
  out += ["", f"Caption perplexity per token: **{result.caption_perplexity:.2f}** "
          f"(uniform guessing: {result.caption_perplexity_uniform:.0f}).", "",
          "## Generation (GenEval-style, tuna2_jax/scoring.py)", "",
          "Each category passes only when exactly right for the whole image. *real* = the same scorer on the "
          "real held-out images resized to the generation size: the scorer's own ceiling.", "",
          "| category | meaning | model | real |", "| --- | --- | ---: | ---: |"]
  out += [f"| {k} | {m} | {_fmt(result.generation.get(k))} | {_fmt(result.generation_reference.get(k))} |"
          for k, m in GEN_ROWS]
  by_n = sorted(k for k in result.generation if k.startswith("all_correct_"))
  out += [f"| {k} | all correct, prompts with {k[12:].replace('_', ' ')} | "
          f"{_fmt(result.generation[k])} | {_fmt(result.generation_reference.get(k))} |" for k in by_n]
  out += ["", f"![samples]({files.get('samples', '')}) — generated (left) and real (right) per prompt.", "",
          "## Reconstruction", "", f"PSNR of held-out images regenerated from themselves: "
          f"**{result.reconstruction_psnr:.2f} dB**.", ""]
  if "reconstructions" in files:
    out += [f"![reconstructions]({files['reconstructions']}) — original (left), reconstruction (right).", ""]
  out += ["## Example answers", "", "| kind | question | answer | model |", "| --- | --- | --- | --- |"]
  out += [f"| {s['kind']} | {s['question']} | {s['answer']} | {normalize(s['model'])} |"
          for s in result.samples]
  return "\n".join(out) + "\n"


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width: int) -> None:
  font = ImageFont.load_default(size=10)
  words, line, y = text.split(), "", xy[1]
  for w in words:  # greedy wrap to the cell width, at most 3 lines
    if draw.textlength(f"{line} {w}".strip(), font=font) > width and line:
      draw.text((xy[0], y), line, fill=(0, 0, 0), font=font)
      line, y = w, y + 11
      if y >= xy[1] + 33:
        return
    else:
      line = f"{line} {w}".strip()
  draw.text((xy[0], y), line, fill=(0, 0, 0), font=font)


def sample_grid(generated: np.ndarray, real: np.ndarray, prompts: Sequence[str],
                scores: Sequence[ImageScore] | None = None, *, cols: int = 4, scale: int = 2,
                max_items: int = 16) -> np.ndarray:
  """uint8 grid: per prompt, generated | real (upscaled, nearest) above the prompt's objects and verdict."""
  from tuna2_jax.scoring import parse_prompt  # noqa: PLC0415

  n = min(len(generated), max_items)
  h, w = generated.shape[1] * scale, generated.shape[2] * scale
  cell_w, cell_h = 2 * w + 12, h + 40
  rows = -(-n // cols)
  canvas = Image.new("RGB", (cols * cell_w, max(rows, 1) * cell_h), (235, 235, 235))
  draw = ImageDraw.Draw(canvas)
  for i in range(n):
    x, y = (i % cols) * cell_w + 4, (i // cols) * cell_h + 2
    for j, im in enumerate((generated[i], real[i])):
      canvas.paste(Image.fromarray(im).resize((w, h), Image.Resampling.NEAREST), (x + j * (w + 4), y))
    objs = ", ".join(f"{o.color} {o.shape} {o.position}" for o in parse_prompt(prompts[i]))
    verdict = "" if scores is None else (" [ok]" if scores[i].position else
                                         f" [{scores[i].object_recall:.0%} found]")
    if scores is not None and scores[i].word_read:
      verdict += f' "{scores[i].word_read}"'
    _label(draw, (x, y + h + 1), objs + verdict, cell_w - 8)
  return np.asarray(canvas)


def pair_grid(left: np.ndarray, right: np.ndarray, *, cols: int = 4, scale: int = 2) -> np.ndarray:
  """uint8 grid of (left | right) pairs, e.g. original | reconstruction."""
  n, h, w = left.shape[0], left.shape[1] * scale, left.shape[2] * scale
  cell_w = 2 * w + 12
  rows = -(-n // cols)
  canvas = Image.new("RGB", (cols * cell_w, rows * (h + 4)), (235, 235, 235))
  for i in range(n):
    x, y = (i % cols) * cell_w + 4, (i // cols) * (h + 4) + 2
    for j, im in enumerate((left[i], right[i])):
      canvas.paste(Image.fromarray(im).resize((w, h), Image.Resampling.NEAREST), (x + j * (w + 4), y))
  return np.asarray(canvas)
