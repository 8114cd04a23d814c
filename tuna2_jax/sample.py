"""Inference: text decoding with a KV cache, image generation and editing with a cached text prefix.

Documents follow the training templates (tuna2_jax/input/tasks.py): understanding `[BOS] [images] prompt`,
generation `[BOS] prompt [target]`, editing `[BOS] [source] instruction [target]`; the unconditional CFG row
drops the prompt / instruction, leaving the bare `[BOS]` (and the source), as the data pipeline's
`cfg_drop_prob` does. `prompt_tokens` are token ids without BOS.

Image generation never lets the text prefix see the image (the mask is causal to it), so the prefix is
encoded once into a KV cache of the decoder and of the flow head, and each ODE step recomputes only the
image span (TIME + patches). Exact: the same numbers as recomputing the whole row.

  python -m tuna2_jax.sample image --ckpt DIR --prompt "a red circle" --height 64 --width 64 --out a.png
  python -m tuna2_jax.sample edit --ckpt DIR --image in.png --prompt "make it blue" --out b.png
  python -m tuna2_jax.sample text --ckpt DIR --image in.png --prompt "What is this?"
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tuna2_jax import flow, sequence
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.patch_embed import denormalize_pixels, normalize_pixels
from tuna2_jax.model.tuna2 import Tuna2, init_cache
from tuna2_jax.sequence import Image, SpecialTokens, Text

Prompts = Sequence[int] | Sequence[Sequence[int]]
SPECIAL = SpecialTokens()


# ----------------------------------------------------------------------------------------------------
# Rows: documents packed at their exact length, then left-padded so every row ends at the same index.


def _as_batch(prompt_tokens: Prompts) -> list[list[int]]:
  if len(prompt_tokens) and isinstance(prompt_tokens[0], (int, np.integer)):
    return [list(prompt_tokens)]  # type: ignore[arg-type]
  return [list(p) for p in prompt_tokens]  # type: ignore[union-attr]


def _left_pad(row: dict[str, np.ndarray], length: int, special: SpecialTokens) -> dict[str, np.ndarray]:
  n = row["tokens"].shape[-1]
  off = length - n
  out = sequence.empty_row(length, int(math.isqrt(row["patches"].shape[-1] // 3)))
  out["tokens"][:] = special.pad
  for k, v in row.items():
    if k == "patches":
      out[k][off:] = v
    else:
      out[k][..., off:] = v
  out["attn_end"][off:] = row["attn_end"] + off
  return out


def pack_left(docs: Sequence[sequence.Document], *, patch_size: int, special: SpecialTokens,
              drop_last: int = 0) -> dict[str, np.ndarray]:
  """One row per document, each packed at its own length minus `drop_last` trailing tokens, left-padded."""
  rows = []
  for doc in docs:
    n = sequence.document_length(doc, patch_size)
    row = sequence.pack_documents([doc], seq_len=n, patch_size=patch_size, special=special)
    keep = n - drop_last
    rows.append({k: (v[:keep] if k == "patches" else v[..., :keep]) for k, v in row.items()})
  length = max(r["tokens"].shape[-1] for r in rows)
  return sequence.stack_rows([_left_pad(r, length, special) for r in rows])


def understanding_document(tokens: Sequence[int], images: Sequence[np.ndarray],
                           special: SpecialTokens) -> sequence.Document:
  """[BOS] then the prompt with each `special.image` id replaced by the next image (images first if none)."""
  parts: list[sequence.Part] = [Text([special.bos], loss=False)]
  images = list(images)
  if images and special.image not in tokens:
    parts += [Image(im, "understand") for im in images]
    images = []
  run: list[int] = []
  for tok in tokens:
    if tok == special.image:
      if not images:
        raise ValueError("prompt has more image placeholders than images")
      if run:
        parts.append(Text(run, loss=False))
        run = []
      parts.append(Image(images.pop(0), "understand"))
    else:
      run.append(int(tok))
  if run:
    parts.append(Text(run, loss=False))
  if images:
    raise ValueError(f"{len(images)} images without a placeholder in the prompt")
  return parts


def generation_document(tokens: Sequence[int], height: int, width: int, special: SpecialTokens,
                        source_image: np.ndarray | None = None) -> sequence.Document:
  """[BOS] ([source]) prompt [target of zeros]; empty tokens = the unconditional document."""
  parts: list[sequence.Part] = [Text([special.bos], loss=False)]
  if source_image is not None:
    parts.append(Image(np.asarray(source_image, np.uint8), "understand"))
  if len(tokens):
    parts.append(Text(list(tokens), loss=False))
  return [*parts, Image(np.zeros((height, width, 3), np.uint8), "generate")]


def _chunk(rows, start: int, stop: int):
  return {k: (v[:, :, start:stop] if k == "positions" else v[:, start:stop]) for k, v in rows.items()}


# ----------------------------------------------------------------------------------------------------
# Text.


def _sample_token(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
  if temperature <= 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    order = jnp.argsort(-logits, -1)
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    probs = jax.nn.softmax(sorted_logits, -1)
    keep_sorted = (jnp.cumsum(probs, -1) - probs) < top_p   # always keeps the most likely token
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, -1).astype(jnp.int32)


def _token_chunk(tok, index, position, segment, patch_dim):
  b = tok.shape[0]
  zeros = jnp.zeros((b, 1), jnp.int32)
  return dict(tokens=tok[:, None], modality=jnp.full((b, 1), sequence.TEXT, jnp.int8),
              segment_ids=segment[:, None], attn_end=jnp.full((b, 1), index, jnp.int32),
              positions=jnp.stack([position[:, None], zeros, zeros], 1),
              patches=jnp.zeros((b, 1, patch_dim), jnp.uint8), image_ids=zeros,
              image_role=jnp.zeros((b, 1), jnp.int8), text_loss=jnp.zeros((b, 1), jnp.float32))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_p", "eos", "pad",
                                             "use_cache"))
def _decode(params, rows, rng, *, cfg: ModelConfig, max_new_tokens: int, temperature: float, top_p: float,
            eos: int, pad: int, use_cache: bool) -> jax.Array:
  model = Tuna2(cfg)
  b, p = rows["tokens"].shape
  total = p + max_new_tokens
  segment = rows["segment_ids"][:, -1]
  next_pos = rows["positions"][:, 0, -1] + 1
  if use_cache:
    cache = init_cache(cfg, b, total, flow=False)
    out, cache = model.apply({"params": params}, rows, cache, start=0, logits=True, flow=False,
                             method=Tuna2.extend)
    state = cache
  else:
    # Recompute everything: a full-length row whose future positions are padding until written.
    full = {k: jnp.pad(v, ((0, 0), (0, max_new_tokens), (0, 0)) if k == "patches" else
                       [(0, 0)] * (v.ndim - 1) + [(0, max_new_tokens)]) for k, v in rows.items()}
    full["attn_end"] = full["attn_end"].at[:, p:].set(jnp.arange(p, total))
    out = model.apply({"params": params}, full, logits=True, flow=False)
    state = full
  first_logits = out.logits[:, p - 1]

  def step(carry, i):
    state, logits, done, rng = carry
    rng, key = jax.random.split(rng)
    tok = jnp.where(done, pad, _sample_token(logits, key, temperature, top_p))
    chunk = _token_chunk(tok, p + i, next_pos + i, segment, cfg.patch_dim)
    if use_cache:
      out, state = model.apply({"params": params}, chunk, state, start=p + i, logits=True, flow=False,
                               method=Tuna2.extend)
      logits = out.logits[:, 0]
    else:
      state = {k: jax.lax.dynamic_update_slice_in_dim(state[k], chunk[k].astype(state[k].dtype), p + i,
                                                       axis=state[k].ndim - 1 - (k == "patches"))
               for k in state}
      out = model.apply({"params": params}, state, logits=True, flow=False)
      logits = jax.lax.dynamic_index_in_dim(out.logits, p + i, axis=1, keepdims=False)
    return (state, logits, done | (tok == eos), rng), tok

  init = (state, first_logits, jnp.zeros((b,), bool), rng)
  _, toks = jax.lax.scan(step, init, jnp.arange(max_new_tokens))
  return toks.T


def generate_text(params, cfg: ModelConfig, prompt_tokens: Prompts, *,
                  images: Sequence[Sequence[np.ndarray]] | None = None, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                  special: SpecialTokens = SPECIAL, use_cache: bool = True) -> list[list[int]]:
  """Continues each prompt (batched); returns the new ids of each row, up to and without EOS.

  images[i]: the understanding images of prompt i, placed at its `special.image` placeholders (or first).
  temperature 0 is greedy; top_p < 1 is nucleus sampling. use_cache=False recomputes the whole row per
  token (the reference the cache is tested against).
  """
  prompts = _as_batch(prompt_tokens)
  images = images or [[] for _ in prompts]
  docs = [understanding_document(p, ims, special) for p, ims in zip(prompts, images, strict=True)]
  rows = {k: jnp.asarray(v) for k, v in pack_left(docs, patch_size=cfg.patch_size, special=special).items()}
  toks = np.asarray(_decode(params, rows, jax.random.key(seed), cfg=cfg, max_new_tokens=max_new_tokens,
                            temperature=float(temperature), top_p=float(top_p), eos=special.eos,
                            pad=special.pad, use_cache=use_cache))
  out = []
  for row in toks.tolist():
    out.append(row[:row.index(special.eos)] if special.eos in row else row)
  return out


# ----------------------------------------------------------------------------------------------------
# Images.


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "sampler", "guided", "cfg_scale", "cfg_interval",
                                             "time_shift", "t_eps", "use_cache"))
def sample_patches(params, rows, z0, *, cfg: ModelConfig, steps: int, sampler: str, guided: bool,
                   cfg_scale: float, cfg_interval: tuple[float, float], time_shift: float, t_eps: float,
                   use_cache: bool) -> jax.Array:
  """Integrates the flow ODE for the target spans at the end of `rows` -> clean patches [B, N, p*p*3].

  rows: [R, P + 1 + N] (prefix, TIME, N patches), R = B (conditional) or 2B (conditional rows, then
  unconditional rows, when `guided`). z0: [B, N, p*p*3] noise shared by both branches.
  """
  model = Tuna2(cfg)
  r, length = rows["tokens"].shape
  b, n, e = z0.shape
  p = length - n - 1
  prefix, span = _chunk(rows, 0, p), _chunk(rows, p, length)
  clean = normalize_pixels(rows["patches"])
  if use_cache:
    cache = init_cache(cfg, r, length)
    _, cache = model.apply({"params": params}, prefix, cache, start=0, logits=False, method=Tuna2.extend)

  def x_pred_fn(z, t):
    zz = jnp.concatenate([z, z]) if guided else z
    span_pixels = jnp.concatenate([jnp.zeros((r, 1, e)), zz], 1)
    if use_cache:
      out, _ = model.apply({"params": params}, span, cache, start=p, pixels=span_pixels,
                           t=jnp.full((r, n + 1), t), logits=False, method=Tuna2.extend)
      x = out.x_pred[:, 1:]
    else:
      pixels = jnp.concatenate([clean[:, :p], span_pixels], 1)
      tt = jnp.concatenate([jnp.ones((r, p)), jnp.full((r, n + 1), t)], 1)
      x = model.apply({"params": params}, rows, pixels=pixels, t=tt, logits=False).x_pred[:, p + 1:]
    return flow.guide(x[:b], x[b:], cfg_scale, t, cfg_interval) if guided else x

  return flow.sample_ode(x_pred_fn, z0, steps=steps, sampler=sampler, shift=time_shift, t_eps=t_eps)


def generate_image(params, cfg: ModelConfig, prompt_tokens: Prompts, *, height: int, width: int,
                   steps: int = 50, cfg_scale: float = 3.0, sampler: str = "euler", seed: int = 0,
                   source_image: np.ndarray | None = None, cfg_interval: tuple[float, float] = (0.0, 1.0),
                   time_shift: float = 1.0, noise_scale: float = 2.0, t_eps: float = 0.05,
                   special: SpecialTokens = SPECIAL, use_cache: bool = True) -> np.ndarray:
  """Images uint8 [B, height, width, 3] for a batch of prompts (editing when `source_image` is given).

  Defaults follow the release: Euler, 50 uniform steps from t = 0, z0 = 2 N(0, I), CFG 3 on x̂ (it uses 2
  for editing). The unconditional branch is the bare [BOS] (plus the source when editing), run in the same
  batch; cfg_scale 1 skips it. Any height and width that are multiples of the patch size.
  """
  ps = cfg.patch_size
  if height % ps or width % ps:
    raise ValueError(f"height {height} and width {width} must be multiples of the patch size {ps}")
  prompts = _as_batch(prompt_tokens)
  guided = cfg_scale != 1.0
  docs = [generation_document(p, height, width, special, source_image) for p in prompts]
  if guided:
    docs += [generation_document([], height, width, special, source_image) for _ in prompts]
  rows = {k: jnp.asarray(v) for k, v in
          pack_left(docs, patch_size=ps, special=special, drop_last=1).items()}  # the EOI is not needed
  n = (height // ps) * (width // ps)
  z0 = noise_scale * jax.random.normal(jax.random.key(seed), (len(prompts), n, cfg.patch_dim))
  x = sample_patches(params, rows, z0, cfg=cfg, steps=steps, sampler=sampler, guided=guided,
                     cfg_scale=float(cfg_scale), cfg_interval=tuple(map(float, cfg_interval)),
                     time_shift=float(time_shift), t_eps=float(t_eps), use_cache=use_cache)
  return np.asarray(sequence.unpatchify(denormalize_pixels(x), (height // ps, width // ps), ps))


def reconstruct(params, cfg: ModelConfig, image: np.ndarray, *, steps: int = 50, sampler: str = "euler",
                seed: int = 0, noise_scale: float = 2.0,
                special: SpecialTokens = SPECIAL) -> np.ndarray:
  """The image regenerated from itself: `[BOS] [image] [target]` with no instruction, no guidance.

  An editing document with an empty instruction; compare with `psnr`.
  """
  image = np.asarray(image, np.uint8)
  return generate_image(params, cfg, [[]], height=image.shape[0], width=image.shape[1], steps=steps,
                        cfg_scale=1.0, sampler=sampler, seed=seed, source_image=image,
                        noise_scale=noise_scale, special=special)[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """Peak signal-to-noise ratio in dB of two uint8 images."""
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
  return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


# ----------------------------------------------------------------------------------------------------
# Command line.


def load_checkpoint(path: str):
  """(cfg, params) of a training workdir, a native export or an HF Qwen2 directory (`from_pretrained`)."""
  from tuna2_jax import api  # noqa: PLC0415  (api builds on this module)

  model = api.from_pretrained(path)
  return model.config, model.params


def _read_png(path: str) -> np.ndarray:
  from PIL import Image as PILImage  # noqa: PLC0415

  return np.asarray(PILImage.open(path).convert("RGB"))


def _write_png(path: str, pixels: np.ndarray) -> None:
  from PIL import Image as PILImage  # noqa: PLC0415

  PILImage.fromarray(pixels).save(path)


def main(argv: list[str] | None = None) -> None:
  from tuna2_jax.input import tokenizer as tokenizer_lib  # noqa: PLC0415

  parser = argparse.ArgumentParser(prog="python -m tuna2_jax.sample", description=__doc__.split("\n")[0])
  parser.add_argument("mode", choices=("text", "image", "edit"))
  parser.add_argument("--ckpt", required=True, help="a training workdir, a native export or an HF Qwen2 dir")
  parser.add_argument("--tokenizer", default="byte", help="byte | hf:<path to tokenizer.json>")
  parser.add_argument("--prompt", default="")
  parser.add_argument("--image", action="append", default=[], help="input PNG (text: any number; edit: one)")
  parser.add_argument("--out", default="", help="output PNG (image, edit) or text file (text)")
  parser.add_argument("--height", type=int, default=0, help="default: the source image's, else 16 patches")
  parser.add_argument("--width", type=int, default=0)
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--cfg_scale", type=float, default=None, help="default 3 (image), 2 (edit)")
  parser.add_argument("--sampler", default="euler", choices=("euler", "heun"))
  parser.add_argument("--time_shift", type=float, default=1.0)
  parser.add_argument("--noise_scale", type=float, default=2.0)
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.0)
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  cfg, params = load_checkpoint(args.ckpt)
  tok = tokenizer_lib.tokenizer_from_name(args.tokenizer)
  ids = tok.encode(args.prompt) if args.prompt else []
  images = [_read_png(p) for p in args.image]
  if args.mode == "text":
    out = generate_text(params, cfg, [ids], images=[images], max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed, special=tok.special)
    text = tok.decode(out[0])
    if args.out:
      with open(args.out, "w") as f:
        f.write(text + "\n")
    print(text)
    return
  source = None
  if args.mode == "edit":
    if len(images) != 1:
      raise SystemExit("edit needs exactly one --image")
    source = images[0]
  h = args.height or (source.shape[0] if source is not None else 16 * cfg.patch_size)
  w = args.width or (source.shape[1] if source is not None else 16 * cfg.patch_size)
  scale = args.cfg_scale if args.cfg_scale is not None else (2.0 if source is not None else 3.0)
  pixels = generate_image(params, cfg, [ids], height=h, width=w, steps=args.steps, cfg_scale=scale,
                          sampler=args.sampler, seed=args.seed, source_image=source,
                          time_shift=args.time_shift, noise_scale=args.noise_scale, special=tok.special)[0]
  out = args.out or f"{args.mode}.png"
  _write_png(out, pixels)
  print(f"wrote {out} ({h}x{w})")


if __name__ == "__main__":
  main()
