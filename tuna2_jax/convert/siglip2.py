"""Hugging Face SigLIP / SigLIP2 vision towers -> Tuna-R's `VisionEncoder` params (safetensors, no torch).

Reads a `save_pretrained` directory of `SiglipVisionModel` (Conv2d patch embedding; the format of the
fixed-res SigLIP2 checkpoints such as So400M/16-384, and the class the release's Tuna-R wraps) or
`Siglip2VisionModel` (NaFlex: Linear patch embedding of (row, col, channel) patches), also inside a full
`SiglipModel`. The layers past `model.vision_feature_layer`, the post-LayerNorm and the pooling head are not
used and are reported.

Also holds the torch-layout table machinery that `tuna2_jax.convert.official` reuses: an explicit list of
(torch name, our flat name, layout) entries, converted both ways with shape checks that name the tensor.

  python -m tuna2_jax.convert.siglip2 --hf_dir=DIR --out=FILE.safetensors [--feature_layer=-2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from tuna2_jax import sequence
from tuna2_jax.convert.hf_qwen2 import ConversionError, Params, PathLike, flatten, unflatten
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.vision_encoder import VisionEncoder

# ----------------------------------------------------------------------------------------------------
# Reading safetensors. safetensors.numpy cannot return BF16 (numpy has no bfloat16), and torch checkpoints
# are usually BF16: the format is simple enough to map directly, with ml_dtypes' bfloat16.

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
  """Every tensor of one .safetensors file as a read-only memory map (nothing is copied until used)."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  # np.memmap refuses an empty range (a file of empty tensors only)
  empty = pathlib.Path(path).stat().st_size == 8 + n
  data = np.zeros(0, np.uint8) if empty else np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    out[name] = data[begin:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def read_tensors(path: PathLike) -> dict[str, np.ndarray]:
  """A .safetensors file, or a directory of model.safetensors or of model.safetensors.index.json's shards."""
  path = pathlib.Path(path)
  if path.is_file():
    return read_safetensors(path)
  index = path / "model.safetensors.index.json"
  if index.is_file():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (path / "model.safetensors").is_file():
    files = ["model.safetensors"]
  else:
    raise ConversionError(f"{path}: neither a .safetensors file nor a directory with model.safetensors "
                          "or model.safetensors.index.json")
  tensors: dict[str, np.ndarray] = {}
  for f in files:
    tensors.update(read_safetensors(path / f))
  return tensors


# ----------------------------------------------------------------------------------------------------
# Torch layouts <-> ours. Torch Linear weights are [out, in]; our kernels are [in..., out...].

# layout -> the torch shape of a tensor whose shape in our tree is `s`
_TORCH_SHAPE = {
    "same": lambda s: tuple(s),
    "flat": lambda s: (math.prod(s),),                                  # biases of [H, hd]
    "linear1": lambda s: (math.prod(s[1:]), s[0]),                      # [in, out...]
    "linear2": lambda s: (s[-1], math.prod(s[:-1])),                    # [H, hd, out]
    "conv": lambda s: (s[1], 3, math.isqrt(s[0] // 3), math.isqrt(s[0] // 3)),  # [p*p*3, D] <- Conv2d
    "grid": lambda s: (s[0] * s[1], s[2]),                              # [G, G, D] <- [G*G, D]
    "token": lambda s: (1, 1, *s),                                      # [D] <- [1, 1, D]
}


def to_ours(x: np.ndarray, layout: str, shape: Sequence[int]) -> np.ndarray:
  """A torch tensor (already checked to have `_TORCH_SHAPE[layout](shape)`) in our layout `shape`."""
  if layout in ("linear1", "linear2"):
    return x.T.reshape(shape)
  if layout == "conv":  # [D, C, p1, p2] -> [(p1, p2, C), D]: our patches flatten (row, col, channel)
    return x.transpose(2, 3, 1, 0).reshape(shape)
  return x.reshape(shape)


def to_torch(x: np.ndarray, layout: str) -> np.ndarray:
  """Inverse of `to_ours`."""
  shape = _TORCH_SHAPE[layout](x.shape)
  if layout == "linear1":
    return x.reshape(x.shape[0], -1).T
  if layout == "linear2":
    return x.reshape(-1, x.shape[-1]).T
  if layout == "conv":
    d, c, p, _ = shape
    return x.reshape(p, p, c, d).transpose(3, 2, 0, 1)
  return x.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor: torch name, our flat name, layout; `index` selects a layer of a scanned (stacked) param."""
  torch: str
  ours: str
  layout: str
  index: int | None = None


def join(*parts: str) -> str:
  """Our flat name from parts, skipping empty ones."""
  return "/".join(p for p in parts if p)


def layer_name(prefix: str, i: int, rel: str, scan: bool) -> tuple[str, int | None]:
  """Our flat name and stack index of layer i's `rel` under `prefix` (scanned: layers, else layers_i)."""
  return (join(prefix, "layers", rel), i) if scan else (join(prefix, f"layers_{i}", rel), None)


def apply_table(entries: Iterable[Entry], tensors: Mapping[str, np.ndarray], base: Mapping[str, Any], *,
                where: str) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
  """Writes the tensors the entries name into a copy of `base` (flat, our layout).

  Returns (params, loaded torch names, absent torch names). An absent tensor leaves `base`'s value; a tensor
  whose shape disagrees raises ConversionError naming it and both shapes.
  """
  out = {n: np.array(x) for n, x in base.items()}
  loaded, absent = [], []
  for e in entries:
    if e.ours not in out:
      raise ConversionError(f"{where}: table names {e.ours!r} (for {e.torch!r}), which the model lacks")
    target = out[e.ours] if e.index is None else out[e.ours][e.index]
    if e.torch not in tensors:
      absent.append(e.torch)
      continue
    x = np.asarray(tensors[e.torch])
    want = _TORCH_SHAPE[e.layout](target.shape)
    if tuple(x.shape) != want:
      raise ConversionError(f"{where}: tensor {e.torch!r} has shape {tuple(x.shape)}, expected {want} "
                            f"(our {e.ours!r}{'' if e.index is None else f'[{e.index}]'} "
                            f"{tuple(target.shape)})")
    value = to_ours(x, e.layout, target.shape).astype(target.dtype)
    if e.index is None:
      out[e.ours] = value
    else:
      out[e.ours][e.index] = value
    loaded.append(e.torch)
  return out, loaded, absent


def export_table(entries: Iterable[Entry], flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our flat params -> {torch name: tensor} for every entry."""
  out = {}
  for e in entries:
    x = np.asarray(flat[e.ours])
    out[e.torch] = np.ascontiguousarray(to_torch(x if e.index is None else x[e.index], e.layout))
  return out


# ----------------------------------------------------------------------------------------------------
# SigLIP's names.

# (our name inside a ViT layer, torch name inside encoder.layers.{i}, layout)
_LAYER = (
    ("ln1/scale", "layer_norm1.weight", "same"),
    ("ln1/bias", "layer_norm1.bias", "same"),
    ("q/kernel", "self_attn.q_proj.weight", "linear1"),
    ("q/bias", "self_attn.q_proj.bias", "flat"),
    ("k/kernel", "self_attn.k_proj.weight", "linear1"),
    ("k/bias", "self_attn.k_proj.bias", "flat"),
    ("v/kernel", "self_attn.v_proj.weight", "linear1"),
    ("v/bias", "self_attn.v_proj.bias", "flat"),
    ("o/kernel", "self_attn.out_proj.weight", "linear2"),
    ("o/bias", "self_attn.out_proj.bias", "same"),
    ("ln2/scale", "layer_norm2.weight", "same"),
    ("ln2/bias", "layer_norm2.bias", "same"),
    ("fc1/kernel", "mlp.fc1.weight", "linear1"),
    ("fc1/bias", "mlp.fc1.bias", "same"),
    ("fc2/kernel", "mlp.fc2.weight", "linear1"),
    ("fc2/bias", "mlp.fc2.bias", "same"),
)


def siglip_table(cfg: ModelConfig, *, torch_prefix: str = "", ours: str = "",
                 conv: bool = True) -> list[Entry]:
  """Entries of the embeddings and the kept ViT layers. conv: SigLIP's Conv2d patch kernel, else a Linear."""
  out = [Entry(f"{torch_prefix}embeddings.patch_embedding.weight", join(ours, "patch_embed/kernel"),
               "conv" if conv else "linear1"),
         Entry(f"{torch_prefix}embeddings.patch_embedding.bias", join(ours, "patch_embed/bias"), "same"),
         Entry(f"{torch_prefix}embeddings.position_embedding.weight", join(ours, "pos_embed"), "grid")]
  for i in range(cfg.vision_kept_layers):
    for rel, name, layout in _LAYER:
      our_name, index = layer_name(ours, i, rel, cfg.scan_layers)
      out.append(Entry(f"{torch_prefix}encoder.layers.{i}.{name}", our_name, layout, index))
  return out


# ----------------------------------------------------------------------------------------------------
# Config.

def vision_fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
  """ModelConfig vision fields (and patch_size) from a SigLIP / SigLIP2 config.json (vision or full model)."""
  kind = hf.get("model_type")
  if kind in ("siglip", "siglip2"):
    hf, kind = hf["vision_config"], f"{kind}_vision_model"
  if kind not in ("siglip_vision_model", "siglip2_vision_model"):
    raise ConversionError(f"config.json: model_type={hf.get('model_type')!r}, expected a SigLIP / SigLIP2 "
                          "vision model")
  if hf.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
    raise ConversionError(f"config.json: hidden_act={hf['hidden_act']!r} unsupported (gelu_pytorch_tanh)")
  if hf.get("num_channels", 3) != 3:
    raise ConversionError(f"config.json: num_channels={hf['num_channels']} unsupported (RGB only)")
  patch = int(hf.get("patch_size", 16))
  if kind == "siglip2_vision_model":
    grid = math.isqrt(int(hf.get("num_patches", 256)))
  else:
    grid = int(hf.get("image_size", 224)) // patch
  return dict(vision_hidden_size=int(hf.get("hidden_size", 768)),
              vision_num_layers=int(hf.get("num_hidden_layers", 12)),
              vision_num_heads=int(hf.get("num_attention_heads", 12)),
              vision_mlp_dim=int(hf.get("intermediate_size", 3072)),
              vision_ln_eps=float(hf.get("layer_norm_eps", 1e-6)), vision_pos_grid=grid, patch_size=patch,
              # each class's own any-res resize: NaFlex bilinear+antialias, SigLIP interpolate_pos_encoding
              vision_pos_resize="bilinear" if kind == "siglip2_vision_model" else "bicubic")


def check_vision_config(cfg: ModelConfig, fields: Mapping[str, Any], where: str) -> None:
  """Raises ConversionError naming the first model field that disagrees with the checkpoint's config.json."""
  for name, value in fields.items():
    if name != "vision_pos_resize" and getattr(cfg, name) != value:
      raise ConversionError(f"{where}: model.{name}={getattr(cfg, name)!r} but config.json gives {value!r}")


# ----------------------------------------------------------------------------------------------------
# Import / export.

@dataclasses.dataclass(frozen=True)
class SiglipReport:
  loaded: tuple[str, ...]   # HF tensors placed into the encoder
  unused: tuple[str, ...]   # HF tensors the encoder has no place for (dropped layers, post-LN, head, text)
  conv: bool                # True: SigLIP's Conv2d patch kernel; False: SigLIP2 NaFlex's Linear

  def summary(self) -> str:
    return (f"{len(self.loaded)} tensors loaded ({'Conv2d' if self.conv else 'Linear'} patch kernel); "
            f"unused {len(self.unused)}: {list(self.unused[:6])}{' ...' if len(self.unused) > 6 else ''}")


def encoder_shapes(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat name -> shape of every VisionEncoder parameter (no allocation)."""
  batch = sequence.text_batch(np.zeros((1, 1), np.int32), cfg.patch_size)
  pixels = np.zeros((1, 1, cfg.patch_dim), np.float32)
  fields = {k: batch[k] for k in ("modality", "image_ids", "attn_end", "positions")}
  init = lambda key: nn.meta.unbox(VisionEncoder(cfg).init(key, pixels, **fields)["params"])
  return flatten(jax.eval_shape(init, jax.random.key(0)))


def _torch_prefix(tensors: Mapping[str, np.ndarray], where: str) -> str:
  key = "embeddings.patch_embedding.weight"
  found = sorted(n[: -len(key)] for n in tensors if n.endswith(key) and "text_model" not in n)
  if len(found) != 1:
    raise ConversionError(f"{where}: expected one tensor '*{key}' (a SigLIP vision tower), found {found}")
  return found[0]


def import_state(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, *,
                 where: str = "state") -> tuple[Params, SiglipReport]:
  """HF SigLIP / SigLIP2 vision tensors -> the VisionEncoder params tree (errors name the tensor)."""
  prefix = _torch_prefix(tensors, where)
  conv = tensors[f"{prefix}embeddings.patch_embedding.weight"].ndim == 4
  shapes = encoder_shapes(cfg)
  base = {n: np.zeros(s.shape, s.dtype) for n, s in shapes.items()}
  entries = siglip_table(cfg, torch_prefix=prefix, conv=conv)
  flat, loaded, absent = apply_table(entries, tensors, base, where=where)
  if absent:
    raise ConversionError(f"{where}: missing tensor {absent[0]!r} ({len(absent)} missing)")
  unused = tuple(sorted(set(tensors) - set(loaded)))
  return unflatten(flat), SiglipReport(loaded=tuple(loaded), unused=unused, conv=conv)


def import_siglip(hf_dir: PathLike, cfg: ModelConfig) -> tuple[Params, SiglipReport]:
  """Loads a SigLIP / SigLIP2 save_pretrained directory into VisionEncoder params.

  `cfg`'s vision fields and patch_size must match config.json (see `vision_fields_from_hf`); the params go
  under `vision/encoder` of a Tuna-R model (`merge_encoder`).
  """
  hf_dir = pathlib.Path(hf_dir)
  if not (hf_dir / "config.json").is_file():
    raise ConversionError(f"{hf_dir}: no config.json")
  fields = vision_fields_from_hf(json.loads((hf_dir / "config.json").read_text()))
  check_vision_config(cfg, fields, str(hf_dir))
  return import_state(read_tensors(hf_dir), cfg, where=str(hf_dir))


def export_state(params: Params, cfg: ModelConfig, *, conv: bool = True,
                 torch_prefix: str = "") -> dict[str, np.ndarray]:
  """VisionEncoder params -> HF tensors of the kept layers (the inverse of `import_state`)."""
  return export_table(siglip_table(cfg, torch_prefix=torch_prefix, conv=conv), flatten(params))


ENCODER_PATH = ("vision", "encoder")  # where Tuna2 keeps the VisionEncoder params (variant "tuna_r")


def merge_encoder(params: Params, encoder: Params) -> Params:
  """A copy of the Tuna-R params tree with `vision/encoder` replaced by `encoder` (shapes checked)."""
  old = flatten(params[ENCODER_PATH[0]][ENCODER_PATH[1]])
  new = flatten(encoder)
  for name, x in old.items():
    if name not in new or tuple(np.shape(new[name])) != tuple(np.shape(x)):
      got = tuple(np.shape(new[name])) if name in new else "absent"
      raise ConversionError(f"merge_encoder: vision/encoder/{name} is {got}, expected {tuple(np.shape(x))}")
  out = dict(params)
  out[ENCODER_PATH[0]] = {**params[ENCODER_PATH[0]], ENCODER_PATH[1]: encoder}
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m tuna2_jax.convert.siglip2",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--hf_dir", required=True)
  parser.add_argument("--out", required=True, help="a .safetensors file of the flat VisionEncoder params")
  parser.add_argument("--feature_layer", type=int, default=-2)
  parser.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=True)
  args = parser.parse_args(argv)
  fields = vision_fields_from_hf(json.loads((pathlib.Path(args.hf_dir) / "config.json").read_text()))
  cfg = ModelConfig.from_dict(dict(fields, variant="tuna_r", vision_feature_layer=args.feature_layer,
                                   scan_layers=args.scan_layers))
  params, report = import_siglip(args.hf_dir, cfg)
  save_file({n: np.ascontiguousarray(x) for n, x in flatten(params).items()}, args.out)
  print(f"{args.hf_dir} -> {args.out} ({fields}): {report.summary()}")


if __name__ == "__main__":
  main()
