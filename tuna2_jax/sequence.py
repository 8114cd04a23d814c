"""The packed multimodal example: the one contract between input, model and kernels.

A row of length L packs several documents. Each document is a list of parts: text (token ids) or an image
(H x W x 3 uint8, any size that is a multiple of the patch size) that is either read ("understand") or drawn
("generate"). An image becomes the span ``[BOI] [TIME] [P_1 ... P_N] [EOI]``.

Field contract (per row; a batch adds a leading B), see DESIGN.md:
  tokens int32 [L], modality int8 [L], segment_ids int32 [L], attn_end int32 [L], positions int32 [3, L],
  patches uint8 [L, p*p*3], image_ids int32 [L], image_role int8 [L], text_loss float32 [L].

Attention rule: allowed(q, k) = seg[q] == seg[k] != 0 and k <= attn_end[q].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import einops
import numpy as np

# modality codes
PAD, TEXT, TIME, PATCH = 0, 1, 2, 3
# image_role codes
NO_ROLE, UNDERSTAND, GENERATE = 0, 1, 2
ROLE_CODES = {"understand": UNDERSTAND, "generate": GENERATE}

FIELDS = ("tokens", "modality", "segment_ids", "attn_end", "positions", "patches", "image_ids",
          "image_role", "text_loss")


class SequenceError(ValueError):
  """A document or row that does not fit the packed-sequence contract."""


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Ids of the structural tokens; the tokenizer owns the actual values."""
  pad: int = 0
  bos: int = 1
  eos: int = 2
  boi: int = 3
  eoi: int = 4
  image: int = 5  # placeholder id written at TIME and patch positions


@dataclasses.dataclass(frozen=True)
class Text:
  """Token ids; `loss` marks whether the model is trained to predict them."""
  ids: Sequence[int] | np.ndarray
  loss: bool = True


@dataclasses.dataclass(frozen=True)
class Image:
  """An H x W x 3 uint8 image, read (understand) or drawn (generate)."""
  pixels: np.ndarray
  role: Literal["understand", "generate"] = "understand"


Part = Text | Image
Document = Sequence[Part]


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
  """[H, W, C] -> [(H/p)*(W/p), p*p*C], patches in raster order, pixels (row, col, channel) inside."""
  return einops.rearrange(image, "(h p1) (w p2) c -> (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(patches: np.ndarray, grid_hw: tuple[int, int], patch_size: int) -> np.ndarray:
  """Inverse of `patchify` (works on NumPy and jax arrays, with leading batch axes)."""
  h, w = grid_hw
  return einops.rearrange(patches, "... (h w) (p1 p2 c) -> ... (h p1) (w p2) c",
                          h=h, w=w, p1=patch_size, p2=patch_size)


def image_span_length(height: int, width: int, patch_size: int) -> int:
  """Tokens an image takes in a row: BOI + TIME + patches + EOI."""
  return (height // patch_size) * (width // patch_size) + 3


def document_length(doc: Document, patch_size: int) -> int:
  return sum(len(p.ids) if isinstance(p, Text) else
             image_span_length(*p.pixels.shape[:2], patch_size) for p in doc)


def _check_document(doc: Document, patch_size: int, where: str) -> None:
  if not doc:
    raise SequenceError(f"{where}: empty document")
  for j, part in enumerate(doc):
    if isinstance(part, Text):
      if len(part.ids) == 0:
        raise SequenceError(f"{where}, part {j}: empty text part")
      continue
    if not isinstance(part, Image):
      raise SequenceError(f"{where}, part {j}: expected Text or Image, got {type(part).__name__}")
    px = part.pixels
    if px.ndim != 3 or px.shape[2] != 3 or px.dtype != np.uint8:
      raise SequenceError(f"{where}, part {j}: image must be uint8 [H, W, 3], got {px.dtype} {px.shape}")
    if px.shape[0] % patch_size or px.shape[1] % patch_size or min(px.shape[:2]) == 0:
      raise SequenceError(f"{where}, part {j}: image size {px.shape[0]}x{px.shape[1]} is not a positive "
                          f"multiple of the patch size {patch_size}; resize it first")
    if part.role not in ROLE_CODES:
      raise SequenceError(f"{where}, part {j}: image role {part.role!r} not in {sorted(ROLE_CODES)}")
    if part.role == "generate" and j != len(doc) - 1 and any(isinstance(p, Text) for p in doc[j + 1:]):
      # Later text would attend to the noised target (the mask forbids nothing else): keep targets last.
      raise SequenceError(f"{where}, part {j}: a generation target must be the last part of its document "
                          f"(text after it would see its noise)")


def empty_row(seq_len: int, patch_size: int) -> dict[str, np.ndarray]:
  """An all-padding row with every field of the contract."""
  return dict(
      tokens=np.zeros(seq_len, np.int32),
      modality=np.zeros(seq_len, np.int8),
      segment_ids=np.zeros(seq_len, np.int32),
      attn_end=np.arange(seq_len, dtype=np.int32),
      positions=np.zeros((3, seq_len), np.int32),
      patches=np.zeros((seq_len, patch_size * patch_size * 3), np.uint8),
      image_ids=np.zeros(seq_len, np.int32),
      image_role=np.zeros(seq_len, np.int8),
      text_loss=np.zeros(seq_len, np.float32),
  )


def pack_documents(docs: Sequence[Document], *, seq_len: int, patch_size: int,
                   special: SpecialTokens = SpecialTokens()) -> dict[str, np.ndarray]:
  """Packs documents, in order, into one row of `seq_len` tokens (padding at the end)."""
  row = empty_row(seq_len, patch_size)
  row["tokens"][:] = special.pad
  loss_target = np.zeros(seq_len, bool)  # position i is a text token the model is trained to predict
  cursor, image_id = 0, 0
  for d, doc in enumerate(docs):
    where = f"document {d}"
    _check_document(doc, patch_size, where)
    n = document_length(doc, patch_size)
    if cursor + n > seq_len:
      raise SequenceError(f"{where}: {n} tokens do not fit; row holds {seq_len}, {seq_len - cursor} left")
    start, seg = cursor, d + 1
    for part in doc:
      if isinstance(part, Text):
        ids = np.asarray(part.ids, np.int32)
        sl = slice(cursor, cursor + len(ids))
        row["tokens"][sl], row["modality"][sl] = ids, TEXT
        row["attn_end"][sl] = np.arange(sl.start, sl.stop)
        loss_target[sl] = part.loss
        cursor = sl.stop
        continue
      image_id += 1
      h, w = part.pixels.shape[0] // patch_size, part.pixels.shape[1] // patch_size
      boi, time_slot, first, last = cursor, cursor + 1, cursor + 2, cursor + 1 + h * w
      eoi = last + 1
      row["tokens"][boi], row["tokens"][eoi] = special.boi, special.eoi
      row["modality"][[boi, eoi]] = TEXT
      row["attn_end"][[boi, eoi]] = [boi, eoi]
      span = slice(time_slot, last + 1)  # TIME + patches: bidirectional inside, causal to the past
      row["tokens"][span] = special.image
      row["modality"][time_slot], row["modality"][first:last + 1] = TIME, PATCH
      row["attn_end"][span] = last
      row["image_ids"][span] = image_id
      row["image_role"][span] = ROLE_CODES[part.role]
      row["patches"][first:last + 1] = patchify(part.pixels, patch_size)
      grid = np.indices((h, w)).reshape(2, -1)
      row["positions"][1:, first:last + 1] = grid
      cursor = eoi + 1
    row["segment_ids"][start:cursor] = seg
    row["positions"][0, start:cursor] = np.arange(cursor - start)
  # The loss at position i predicts token i + 1: only for trained text inside the same document.
  same_doc = (row["segment_ids"][1:] == row["segment_ids"][:-1]) & (row["segment_ids"][1:] > 0)
  row["text_loss"][:-1] = (loss_target[1:] & same_doc).astype(np.float32)
  return row


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Rows -> a batch with a leading B axis (positions become [B, 3, L])."""
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def dense_mask(segment_ids, attn_end):
  """The boolean attention mask [..., L, L] of the contract, for references and small shapes."""
  xp = _namespace(segment_ids)
  seg_q, seg_k = segment_ids[..., :, None], segment_ids[..., None, :]
  k_idx = xp.arange(segment_ids.shape[-1])
  return (seg_q == seg_k) & (seg_q != 0) & (k_idx[None, :] <= attn_end[..., :, None])


def mrope_positions(positions, attn_end, modality):
  """Qwen2-VL M-RoPE (t, h, w) positions [..., 3, L] derived from the contract's fields.

  Text and TIME advance every axis by one; the patches of an image share t = the position of its first
  patch, with h = t + row and w = t + col; the token after the image continues at t + max(grid_h, grid_w).
  Without images this equals the 1-D position on all three axes.
  """
  xp = _namespace(positions)
  pos, row, col = positions[..., 0, :], positions[..., 1, :], positions[..., 2, :]
  length = pos.shape[-1]
  is_patch = modality == PATCH
  is_last_patch = is_patch & (attn_end == xp.arange(length))
  advance = xp.where(is_patch, xp.where(is_last_patch, xp.maximum(row, col) + 1, 0), 1)
  csum = xp.cumsum(advance, axis=-1) - advance  # exclusive prefix sum
  # Restart at each document: its first index is i - pos[i].
  doc_start = xp.arange(length) - pos
  t = csum - xp.take_along_axis(csum, doc_start, axis=-1)
  return xp.stack([t, t + row * is_patch, t + col * is_patch], axis=-2)


def _namespace(x):
  if isinstance(x, np.ndarray):
    return np
  import jax.numpy as jnp  # noqa: PLC0415  (keeps the data path free of jax)
  return jnp


def text_batch(tokens: np.ndarray, patch_size: int) -> dict[str, np.ndarray]:
  """A contract batch for plain text [B, L]: one causal document per row, no images, no padding."""
  tokens = np.asarray(tokens, np.int32)
  b, l = tokens.shape
  batch = stack_rows([empty_row(l, patch_size)] * b)
  batch["tokens"] = tokens
  batch["modality"][:] = TEXT
  batch["segment_ids"][:] = 1
  batch["positions"][:, 0] = np.arange(l)
  batch["text_loss"][:, :-1] = 1.0
  return batch


_DTYPES = dict(tokens=np.int32, modality=np.int8, segment_ids=np.int32, attn_end=np.int32, positions=np.int32,
               patches=np.uint8, image_ids=np.int32, image_role=np.int8, text_loss=np.float32)


def validate_row(row: dict[str, np.ndarray], *, patch_size: int,
                 special: SpecialTokens | None = None) -> None:
  """Checks one row (no batch axis) against every rule of the contract; raises SequenceError naming the rule.

  For rows from any source (a custom pipeline, a converted dataset) before they reach the model.
  """
  def require(ok, message: str) -> None:
    if not bool(np.all(ok)):
      raise SequenceError(f"row violates the contract: {message}")

  require(set(row) == set(FIELDS), f"fields {sorted(row)} != {sorted(FIELDS)}")
  length = row["tokens"].shape[0]
  shapes = dict(positions=(3, length), patches=(length, patch_size * patch_size * 3))
  for k in FIELDS:
    require(row[k].shape == shapes.get(k, (length,)), f"{k} has shape {row[k].shape}")
    require(row[k].dtype == _DTYPES[k], f"{k} has dtype {row[k].dtype}, expected {np.dtype(_DTYPES[k])}")
  seg, mod, end, pos = row["segment_ids"], row["modality"], row["attn_end"], row["positions"]
  idx = np.arange(length)
  pad = seg == 0
  require(pad == (mod == PAD), "padding (segment 0) and modality 0 disagree")
  n_real = int((~pad).sum())
  require(~pad[:n_real], "padding only at the end of the row")
  require(np.diff(seg[:n_real]) >= 0, "documents are contiguous with increasing segment ids")
  require((end >= idx) & (end < length), "attn_end inside [i, L)")
  require(seg[end] == seg, "attn_end stays inside the query's document")
  require(end[mod == TEXT] == idx[mod == TEXT], "text positions are causal (attn_end = i)")
  require(row["patches"][mod != PATCH] == 0, "pixels only at patch positions")
  require(row["text_loss"][pad] == 0, "no loss on padding")
  doc_start = idx - pos[0]
  require((doc_start >= 0) & (seg[np.maximum(doc_start, 0)] == seg),
          "positions[0] counts from the document start")
  require((doc_start[~pad] == 0) | (seg[np.maximum(doc_start[~pad] - 1, 0)] != seg[~pad]),
          "positions[0] restarts at 0 in each document")
  ids = np.unique(row["image_ids"][row["image_ids"] > 0])
  require(ids == np.arange(1, len(ids) + 1), "image ids are 1..k in row order")
  require(row["image_role"][row["image_ids"] == 0] == NO_ROLE, "image_role only inside image spans")
  for i in ids:
    where = np.flatnonzero(row["image_ids"] == i)
    t, last = where[0], where[-1]
    require(where == np.arange(t, last + 1), f"image {i} is contiguous")
    require(last > t and mod[t] == TIME and (mod[t + 1:last + 1] == PATCH).all(),
            f"image {i} is a TIME slot followed by patches")
    require(0 < t and last + 1 < length and mod[t - 1] == TEXT and mod[last + 1] == TEXT,
            f"image {i} sits between BOI and EOI text tokens")
    if special is not None:
      require(row["tokens"][t - 1] == special.boi and row["tokens"][last + 1] == special.eoi,
              f"image {i} is wrapped in BOI / EOI")
    require(end[where] == last, f"image {i} is bidirectional inside (attn_end = its last patch)")
    roles = row["image_role"][where]
    require((roles == roles[0]) & np.isin(roles[0], (UNDERSTAND, GENERATE)), f"image {i} has one role")
    rows, cols = pos[1, t + 1:last + 1], pos[2, t + 1:last + 1]
    grid_w = cols.max() + 1
    require(rows * grid_w + cols == np.arange(last - t), f"image {i}'s patches are in raster order")
    if roles[0] == GENERATE:
      require(last + 2 >= length or seg[last + 2] != seg[t], f"generation target {i} is last in its document")
  loss = np.flatnonzero(row["text_loss"])
  require(loss < length - 1, "no loss at the last position")
  if len(loss):
    require((seg[loss] == seg[loss + 1]) & (mod[loss + 1] == TEXT), "loss only where the next token is text "
            "of the same document")
