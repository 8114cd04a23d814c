"""The official release's PyTorch state dict (facebookresearch/tuna-2, safetensors) <-> our Tuna2 params.

One explicit table maps every tensor of the release's inner model (`Tuna2Pixel` / `Tuna2RPixel`: the keys its
`load_checkpoint` gives `load_state_dict`, also accepted under `tuna_model.`) to our flat name and layout:

  tuna.model.embed_tokens, .layers.{i}.*, .norm; tuna.lm_head  -> embed, decoder/*, lm_head (Qwen2 names)
  vision_encoder.patch_embedding (Conv2d), .norm               -> patch_embed/proj ((row, col, ch) rows), norm
  vision_model.* (SigLIP, kept layers); siglip_proj.{0,1,3}    -> vision/encoder/*, vision/connector/*
  time_embed.mlp.{0,2}                                         -> time_embed/fc1, fc2
  diffusion_head_a.{i}.* (adaLN chunks: shift, scale, gate x2) -> flow_head/layers/*
  diffusion_head_b.{norm_final, adaLN_modulation.1, linear}    -> flow_head/final_norm, final_adaln, out
  mask_token [1, 1, D]                                         -> mask_token [D]

The release's output token k predicts p*p consecutive raster pixels, so its weights need
`model.unpatchify="raster_chunks"`. Its "foundation checkpoint" lacks some decoder and head layers:
tensors the table expects but the file lacks keep the values of the `params` passed in and are reported
(`missing`), as are file tensors the table has no place for (`unmapped`); a tensor whose shape disagrees is
an error naming it and both shapes. The vision_model.* rows exist for Tuna-R only, patch_embed for Tuna-2.

  python -m tuna2_jax.convert.official --ckpt=FILE.safetensors --config=configs/tuna2_7b.py --out=DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from tuna2_jax import sequence
from tuna2_jax.convert.hf_qwen2 import ConversionError, Params, PathLike, flatten, save_native, unflatten
from tuna2_jax.convert.siglip2 import Entry, apply_table, export_table, layer_name, read_tensors, siglip_table
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.tuna2 import Tuna2

# Prefixes a saved state dict may carry around the inner model's names (the training wrapper, DDP).
_WRAPPER_PREFIXES = ("tuna_model.", "module.")

# (our name inside a decoder layer, release name inside tuna.model.layers.{i}, layout)
_DECODER_LAYER = (
    ("attn_norm/scale", "input_layernorm.weight", "same"),
    ("attn/q/kernel", "self_attn.q_proj.weight", "linear1"),
    ("attn/q/bias", "self_attn.q_proj.bias", "flat"),
    ("attn/k/kernel", "self_attn.k_proj.weight", "linear1"),
    ("attn/k/bias", "self_attn.k_proj.bias", "flat"),
    ("attn/v/kernel", "self_attn.v_proj.weight", "linear1"),
    ("attn/v/bias", "self_attn.v_proj.bias", "flat"),
    ("attn/o/kernel", "self_attn.o_proj.weight", "linear2"),
    ("mlp_norm/scale", "post_attention_layernorm.weight", "same"),
    ("mlp/gate/kernel", "mlp.gate_proj.weight", "linear1"),
    ("mlp/up/kernel", "mlp.up_proj.weight", "linear1"),
    ("mlp/down/kernel", "mlp.down_proj.weight", "linear1"),
)
# (our name inside a flow-head layer, release name inside diffusion_head_a.{i}, layout). The adaLN Linear's
# 6*D outputs are chunk(6) = shift, scale, gate (attention), shift, scale, gate (MLP): our kernel [D, 6, D]
# holds chunk j at [:, j, :], so a plain transpose + reshape keeps the order.
_HEAD_LAYER = (
    ("adaln/kernel", "adaLN_modulation.1.weight", "linear1"),
    ("adaln/bias", "adaLN_modulation.1.bias", "flat"),
    ("attn_norm/scale", "input_layernorm.weight", "same"),
    ("attn/q/kernel", "self_attn.q_proj.weight", "linear1"),
    ("attn/k/kernel", "self_attn.k_proj.weight", "linear1"),
    ("attn/v/kernel", "self_attn.v_proj.weight", "linear1"),
    ("attn/o/kernel", "self_attn.o_proj.weight", "linear2"),
    ("attn/q_norm/scale", "self_attn.q_norm.weight", "same"),
    ("attn/k_norm/scale", "self_attn.k_norm.weight", "same"),
    ("mlp_norm/scale", "post_attention_layernorm.weight", "same"),
    ("mlp/gate/kernel", "mlp.gate_proj.weight", "linear1"),
    ("mlp/up/kernel", "mlp.up_proj.weight", "linear1"),
    ("mlp/down/kernel", "mlp.down_proj.weight", "linear1"),
)


def official_table(cfg: ModelConfig) -> list[Entry]:
  """Every tensor of the release's inner model for `cfg`: (release name, our flat name, layout, layer)."""
  scan = cfg.scan_layers
  t = [Entry("tuna.model.embed_tokens.weight", "embed/embedding", "same"),
       Entry("tuna.model.norm.weight", "decoder/final_norm/scale", "same")]
  if not cfg.tie_embeddings:
    t.append(Entry("tuna.lm_head.weight", "lm_head/kernel", "linear1"))
  for i in range(cfg.num_layers):
    for rel, name, layout in _DECODER_LAYER:
      if cfg.qkv_bias or not name.endswith("bias"):
        t.append(_layer_entry(f"tuna.model.layers.{i}.{name}", "decoder", i, rel, layout, scan))
  if cfg.variant == "tuna_r":
    t += siglip_table(cfg, torch_prefix="vision_model.", ours="vision/encoder", conv=True)
    t += [Entry("siglip_proj.0.weight", "vision/connector/norm/scale", "same"),
          Entry("siglip_proj.1.weight", "vision/connector/fc1/kernel", "linear1"),
          Entry("siglip_proj.1.bias", "vision/connector/fc1/bias", "same"),
          Entry("siglip_proj.3.weight", "vision/connector/fc2/kernel", "linear1"),
          Entry("siglip_proj.3.bias", "vision/connector/fc2/bias", "same")]
  else:
    t += [Entry("vision_encoder.patch_embedding.weight", "patch_embed/proj/kernel", "conv"),
          Entry("vision_encoder.patch_embedding.bias", "patch_embed/proj/bias", "same"),
          Entry("vision_encoder.norm.weight", "patch_embed/norm/scale", "same")]
  t += [Entry("time_embed.mlp.0.weight", "time_embed/fc1/kernel", "linear1"),
        Entry("time_embed.mlp.0.bias", "time_embed/fc1/bias", "same"),
        Entry("time_embed.mlp.2.weight", "time_embed/fc2/kernel", "linear1"),
        Entry("time_embed.mlp.2.bias", "time_embed/fc2/bias", "same"),
        Entry("mask_token", "mask_token", "token")]
  for i in range(cfg.flow_layers):
    for rel, name, layout in _HEAD_LAYER:
      t.append(_layer_entry(f"diffusion_head_a.{i}.{name}", "flow_head", i, rel, layout, scan))
  t += [Entry("diffusion_head_b.norm_final.weight", "flow_head/final_norm/scale", "same"),
        Entry("diffusion_head_b.adaLN_modulation.1.weight", "flow_head/final_adaln/kernel", "linear1"),
        Entry("diffusion_head_b.adaLN_modulation.1.bias", "flow_head/final_adaln/bias", "flat"),
        Entry("diffusion_head_b.linear.weight", "flow_head/out/kernel", "linear1"),
        Entry("diffusion_head_b.linear.bias", "flow_head/out/bias", "same")]
  return t


def _layer_entry(torch_name: str, prefix: str, i: int, rel: str, layout: str, scan: bool) -> Entry:
  ours, index = layer_name(prefix, i, rel, scan)
  return Entry(torch_name, ours, layout, index)


@dataclasses.dataclass(frozen=True)
class OfficialReport:
  loaded: tuple[str, ...]     # release tensors placed into our params
  missing: tuple[str, ...]    # release names the table expects but the file lacks (values kept from `params`)
  unmapped: tuple[str, ...]   # file tensors the table has no place for

  def summary(self) -> str:
    show = lambda names: f"{list(names[:6])}{' ...' if len(names) > 6 else ''}"
    return (f"{len(self.loaded)} tensors loaded; missing {len(self.missing)} (kept): {show(self.missing)}; "
            f"unmapped {len(self.unmapped)}: {show(self.unmapped)}")


def _strip_wrapper(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for name, x in tensors.items():
    for prefix in _WRAPPER_PREFIXES:
      if name.startswith(prefix):
        name = name[len(prefix):]
    out[name] = x
  return out


def init_params(cfg: ModelConfig, seed: int = 0) -> Params:
  """Fresh Tuna2(cfg) params (plain arrays): the values a partial release checkpoint leaves in place."""
  batch = sequence.text_batch(np.zeros((1, 1), np.int32), cfg.patch_size)
  return jax.jit(lambda key: nn.meta.unbox(Tuna2(cfg).init(key, batch)["params"]))(jax.random.key(seed))


def load_official(source: PathLike | Mapping[str, np.ndarray], cfg: ModelConfig, params: Params, *,
                  strict: bool = False) -> tuple[Params, OfficialReport]:
  """The release's state dict (a .safetensors file, a directory of shards, or name -> array) -> params.

  `params`: a Tuna2(cfg) params tree whose values stay where the release has no tensor (e.g. `init_params`).
  strict: raise on any missing or unmapped tensor instead of reporting it.
  """
  if cfg.unpatchify != "raster_chunks":
    raise ConversionError(f"model.unpatchify={cfg.unpatchify!r}: the release's flow head writes raster "
                          "chunks; set model.unpatchify='raster_chunks' to load its weights")
  where = "state dict" if isinstance(source, Mapping) else str(source)
  tensors = _strip_wrapper(source if isinstance(source, Mapping) else read_tensors(source))
  flat = {n: np.asarray(x) for n, x in flatten(params).items()}
  table = official_table(cfg)
  uncovered = sorted(set(flat) - {e.ours for e in table})
  if uncovered:  # the table must name every parameter of the model, or a load would silently skip it
    raise ConversionError(f"{where}: our parameter(s) {uncovered} have no entry in the release table")
  if cfg.tie_embeddings and "tuna.lm_head.weight" in tensors:
    if not np.array_equal(tensors["tuna.lm_head.weight"], tensors.get("tuna.model.embed_tokens.weight")):
      raise ConversionError(f"{where}: model.tie_embeddings=True but tuna.lm_head.weight differs from "
                            "tuna.model.embed_tokens.weight")
  out, loaded, missing = apply_table(table, tensors, flat, where=where)
  unmapped = sorted(set(tensors) - set(loaded) - ({"tuna.lm_head.weight"} if cfg.tie_embeddings else set()))
  report = OfficialReport(loaded=tuple(loaded), missing=tuple(missing), unmapped=tuple(unmapped))
  if strict and (missing or unmapped):
    raise ConversionError(f"{where}: strict load: {report.summary()}")
  return unflatten(out), report


def to_official(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Our params -> the release's names and layouts (the inverse of `load_official`)."""
  return export_table(official_table(cfg), {n: np.asarray(x) for n, x in flatten(params).items()})


def main(argv: list[str] | None = None) -> None:
  """python -m tuna2_jax.convert.official --ckpt=... --config=... --out=DIR (a native checkpoint)."""
  parser = argparse.ArgumentParser(prog="python -m tuna2_jax.convert.official",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--ckpt", required=True, help="the release's .safetensors file or shard directory")
  parser.add_argument("--config", required=True, help="configs/<name>.py[:arg] giving the model section")
  parser.add_argument("--out", required=True, help="native checkpoint directory (config.json + params)")
  parser.add_argument("--seed", type=int, default=0, help="init of the tensors the checkpoint lacks")
  parser.add_argument("--strict", action="store_true")
  args = parser.parse_args(argv)
  path, _, arg = args.config.partition(":")
  spec = importlib.util.spec_from_file_location("official_config", pathlib.Path(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  model: dict[str, Any] = module.get_config(arg or None).model.to_dict()
  cfg = ModelConfig.from_dict(dict(model, unpatchify="raster_chunks"))
  params, report = load_official(args.ckpt, cfg, init_params(cfg, args.seed), strict=args.strict)
  save_native(args.out, cfg, params)
  print(f"{args.ckpt} -> {args.out}: {report.summary()}")


if __name__ == "__main__":
  main()
