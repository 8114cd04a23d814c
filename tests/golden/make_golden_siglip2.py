"""Golden fixtures for Tuna-R's vision encoder: random-weight HF SigLIP vision towers and their hidden states.

Runs in the parity venv (torch + transformers), never imports tuna2_jax, needs no network:

  .venv-parity/bin/python tests/golden/make_golden_siglip2.py --out=tests/golden

Two fixtures, because two HF classes matter and they resize the learned position table differently:

- `siglip2_naflex`: `Siglip2VisionModel` (NaFlex). Linear patch embedding of pre-patchified pixels in (row,
  col, channel) order, position table resized to each image's grid with `bilinear` + antialias. Our default
  path; its resize is matched exactly (both sides compute the same separable triangle-filter weights).
- `siglip_fixed`: `SiglipVisionModel`, the class the official Tuna-R wraps (`SiglipVisionTransformer` called
  with `interpolate_pos_encoding=True`; the So400M/16 SigLIP2 checkpoint ships in this format): Conv2d patch
  embedding, position table resized with torch's `bicubic` (a = -0.75, align_corners=False): our
  `vision_pos_resize="bicubic"`.

Both use odd grids on purpose: a 4 x 4 position table read at 3 x 5 and 6 x 2 patches exercises downsampling
and upsampling on each axis. Writes `OUT/<name>/` (save_pretrained: config.json + model.safetensors) and
`OUT/<name>/golden.safetensors` holding, per input i, `pixels_i` float32 [N_i, p*p*3] (our patch layout:
raster patches, (row, col, channel) inside), `grid_i` int32 [2], and `hidden_i` float32 [N_i, D] = HF
`hidden_states[-2]` (the output of all layers but the last: the release's feature layer -2, no
post-LayerNorm).
"""

from __future__ import annotations

import argparse
import pathlib

import torch
from safetensors.torch import save_file
from transformers import Siglip2VisionConfig, Siglip2VisionModel, SiglipVisionConfig, SiglipVisionModel

PATCH = 4
GRIDS = ((3, 5), (6, 2))
COMMON = dict(hidden_size=48, intermediate_size=88, num_hidden_layers=3, num_attention_heads=3,
              patch_size=PATCH, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", attention_dropout=0.0)


def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Weights at a scale that keeps activations O(1); norms and biases away from their 1 / 0 defaults."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "layer_norm" in name or "layernorm" in name:
        p.copy_((1.0 + 0.2 * noise) if name.endswith("weight") else 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.3 * noise)
      elif "position_embedding" in name:
        p.copy_(0.5 * noise)
      else:  # Linear [out, in] or Conv2d [out, c, p, p]: unit-variance outputs for unit-variance inputs
        p.copy_(noise / p[0].numel() ** 0.5)


def to_patches(image: torch.Tensor) -> torch.Tensor:
  """[C, H, W] -> [(H/p)*(W/p), p*p*C]: raster patches, (row, col, channel) inside (Siglip2's processor)."""
  c, h, w = image.shape
  x = image.reshape(c, h // PATCH, PATCH, w // PATCH, PATCH).permute(1, 3, 2, 4, 0)
  return x.reshape((h // PATCH) * (w // PATCH), PATCH * PATCH * c)


def make_naflex(out: pathlib.Path, seed: int) -> None:
  torch.manual_seed(seed)
  cfg = Siglip2VisionConfig(**COMMON, num_patches=16, attn_implementation="eager", dtype="float32")
  model = Siglip2VisionModel(cfg).eval()
  gen = torch.Generator().manual_seed(seed)
  randomize_(model, gen)
  images = [torch.rand(3, h * PATCH, w * PATCH, generator=gen) * 2 - 1 for h, w in GRIDS]
  patches = [to_patches(im) for im in images]
  n_max = max(p.shape[0] for p in patches)
  # One padded batch: both images in one call, so HF's per-image resize and padding mask are exercised.
  pixel_values = torch.zeros(len(images), n_max, PATCH * PATCH * 3)
  mask = torch.zeros(len(images), n_max, dtype=torch.long)
  for i, p in enumerate(patches):
    pixel_values[i, :p.shape[0]], mask[i, :p.shape[0]] = p, 1
  shapes = torch.tensor(GRIDS, dtype=torch.long)
  with torch.no_grad():
    out_hf = model(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes,
                   output_hidden_states=True)
  hidden = out_hf.hidden_states[-2]
  tensors = {}
  for i, p in enumerate(patches):
    tensors[f"pixels_{i}"] = p.contiguous()
    tensors[f"grid_{i}"] = torch.tensor(GRIDS[i], dtype=torch.int32)
    tensors[f"hidden_{i}"] = hidden[i, :p.shape[0]].float().contiguous()
  _save(model, tensors, out / "siglip2_naflex")


def make_fixed(out: pathlib.Path, seed: int) -> None:
  torch.manual_seed(seed)
  cfg = SiglipVisionConfig(**COMMON, image_size=4 * PATCH, attn_implementation="eager", dtype="float32")
  model = SiglipVisionModel(cfg).eval()
  gen = torch.Generator().manual_seed(seed)
  randomize_(model, gen)
  tensors = {}
  for i, (h, w) in enumerate(GRIDS + ((4, 4),)):  # (4, 4): the table's own grid, no resize
    image = torch.rand(3, h * PATCH, w * PATCH, generator=gen) * 2 - 1
    with torch.no_grad():
      out_hf = model(pixel_values=image[None], interpolate_pos_encoding=True, output_hidden_states=True)
    tensors[f"pixels_{i}"] = to_patches(image).contiguous()
    tensors[f"grid_{i}"] = torch.tensor((h, w), dtype=torch.int32)
    tensors[f"hidden_{i}"] = out_hf.hidden_states[-2][0].float().contiguous()
  _save(model, tensors, out / "siglip_fixed")


def _save(model: torch.nn.Module, tensors: dict[str, torch.Tensor], d: pathlib.Path) -> None:
  d.mkdir(parents=True, exist_ok=True)
  model.save_pretrained(d, safe_serialization=True)
  save_file(tensors, str(d / "golden.safetensors"))
  hidden = [v for k, v in tensors.items() if k.startswith("hidden")]
  print(f"{d.name}: {sum(p.numel() for p in model.parameters())} params, "
        f"hidden {[tuple(h.shape) for h in hidden]}, |hidden| max {max(h.abs().max() for h in hidden):.3f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  torch.set_default_dtype(torch.float32)
  make_naflex(pathlib.Path(args.out), args.seed + 10)
  make_fixed(pathlib.Path(args.out), args.seed + 11)


if __name__ == "__main__":
  main()
