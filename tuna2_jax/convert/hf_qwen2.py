"""Hugging Face Qwen2 / Qwen2.5 <-> Tuna-2 weights, and the native exported checkpoint format.

Import reads a `save_pretrained` directory (config.json + model.safetensors, or shards listed in
model.safetensors.index.json) into the param tree of `tuna2_jax.model.tuna2.Tuna2`; the parameters Tuna-2 adds
to the text backbone (patch_embed, time_embed) are initialised fresh from a seed and reported as such.
Export writes the text backbone back as a directory `transformers.Qwen2ForCausalLM.from_pretrained` loads.
Only `safetensors.numpy` touches files: no torch, no pickle.

The native format is a directory with `config.json` (the ModelConfig fields) and `params.safetensors`
(flat names such as `decoder/layers/attn/q/kernel`; scanned layers are stacked on a leading axis).

  python -m tuna2_jax.convert.hf_qwen2 import --hf_dir=DIR --out=DIR [--seed=0] [--no-scan_layers]
  python -m tuna2_jax.convert.hf_qwen2 export --ckpt=DIR --out=DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from tuna2_jax import sequence
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.tuna2 import Tuna2

Params = dict[str, Any]  # the nested "params" collection of Tuna2, plain arrays (no logical boxes)
PathLike = str | pathlib.Path
NATIVE_PARAMS = "params.safetensors"
_SEP = "/"


class ConversionError(ValueError):
  """A checkpoint that does not match its config or the model; the message names the tensor."""


@dataclasses.dataclass(frozen=True)
class ImportReport:
  loaded: tuple[str, ...]       # our param names filled from HF tensors
  initialized: tuple[str, ...]  # our param names initialised fresh (the multimodal additions)
  ignored: tuple[str, ...]      # HF tensors not used (rotary caches, a tied lm_head copy)
  seed: int

  def summary(self) -> str:
    new = ", ".join(sorted({n.split(_SEP)[0] for n in self.initialized})) or "none"
    return (f"{len(self.loaded)} tensors from HF; initialised fresh (seed {self.seed}): {new} "
            f"({len(self.initialized)} tensors); ignored: {list(self.ignored) or 'none'}")


# ----------------------------------------------------------------------------------------------------
# Config.

# ModelConfig fields that config.json determines; the rest (patch_size, dtype, attention, ...) may be set.
_HF_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
              "rope_theta", "rms_eps", "tie_embeddings", "qkv_bias")


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """A ModelConfig from a Qwen2 config.json; `overrides` set the fields HF does not have."""
  if hf.get("model_type") != "qwen2":
    raise ConversionError(f"config.json: model_type={hf.get('model_type')!r}, expected 'qwen2'")
  if hf.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"config.json: hidden_act={hf['hidden_act']!r} unsupported (SwiGLU uses 'silu')")
  if hf.get("use_sliding_window"):
    raise ConversionError("config.json: use_sliding_window=true is unsupported (full attention only)")
  # transformers >= 5 keeps RoPE in rope_parameters; older files have rope_theta / rope_scaling on top.
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise ConversionError(f"config.json: rope_type={rope_type!r} unsupported (only 'default' RoPE)")
  heads = int(hf["num_attention_heads"])
  fields = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
      num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, mlp_dim=hf["intermediate_size"],
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=True)
  clash = sorted(set(overrides) & set(_HF_FIELDS))
  if clash:
    raise ConversionError(f"override(s) {clash} are fixed by config.json")
  return ModelConfig.from_dict({**fields, **overrides})


def hf_config(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
  """The config.json of a Qwen2ForCausalLM with the text backbone of `cfg`."""
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  return {
      "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "use_sliding_window": False,
      # Both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta.
      "rope_parameters": rope, "rope_theta": cfg.rope_theta, "dtype": dtype, "torch_dtype": dtype,
  }


# ----------------------------------------------------------------------------------------------------
# Per-layer name and layout table. HF Linear weights are [out, in]; our kernels are [in..., out...].

def _to_ours(kind: str, cfg: ModelConfig) -> Callable[[np.ndarray], np.ndarray]:
  d, hd = cfg.hidden_size, cfg.head_dim
  heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads, "v": cfg.num_kv_heads}
  if kind in ("q_kernel", "k_kernel", "v_kernel"):   # [H*hd, D] -> [D, H, hd]
    return lambda w: w.T.reshape(d, heads[kind[0]], hd)
  if kind in ("q_bias", "k_bias", "v_bias"):         # [H*hd] -> [H, hd]
    return lambda w: w.reshape(heads[kind[0]], hd)
  if kind == "o_kernel":                             # [D, Hq*hd] -> [Hq, hd, D]
    return lambda w: w.T.reshape(cfg.num_heads, hd, d)
  if kind == "linear":
    return lambda w: w.T
  return lambda w: w                                 # norm scales, embeddings


def _to_hf(kind: str, cfg: ModelConfig) -> Callable[[np.ndarray], np.ndarray]:
  if kind.endswith("_bias"):
    return lambda x: x.reshape(-1)
  if kind in ("q_kernel", "k_kernel", "v_kernel"):   # [D, H, hd] -> [H*hd, D]
    return lambda x: x.reshape(x.shape[0], -1).T
  if kind == "o_kernel":                             # [Hq, hd, D] -> [D, Hq*hd]
    return lambda x: x.reshape(-1, x.shape[-1]).T
  if kind == "linear":
    return lambda x: x.T
  return lambda x: x


# (our name inside a decoder layer, HF name inside model.layers.{i}, layout kind)
_LAYER = (
    ("attn_norm/scale", "input_layernorm.weight", "same"),
    ("attn/q/kernel", "self_attn.q_proj.weight", "q_kernel"),
    ("attn/q/bias", "self_attn.q_proj.bias", "q_bias"),
    ("attn/k/kernel", "self_attn.k_proj.weight", "k_kernel"),
    ("attn/k/bias", "self_attn.k_proj.bias", "k_bias"),
    ("attn/v/kernel", "self_attn.v_proj.weight", "v_kernel"),
    ("attn/v/bias", "self_attn.v_proj.bias", "v_bias"),
    ("attn/o/kernel", "self_attn.o_proj.weight", "o_kernel"),
    ("mlp_norm/scale", "post_attention_layernorm.weight", "same"),
    ("mlp/gate/kernel", "mlp.gate_proj.weight", "linear"),
    ("mlp/up/kernel", "mlp.up_proj.weight", "linear"),
    ("mlp/down/kernel", "mlp.down_proj.weight", "linear"),
)
_TOP = (("embed/embedding", "model.embed_tokens.weight", "same"),
        ("decoder/final_norm/scale", "model.norm.weight", "same"),
        ("lm_head/kernel", "lm_head.weight", "linear"))


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor of the matching Qwen2ForCausalLM and its shape."""
  d, q, kv, f, v = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                    cfg.mlp_dim, cfg.vocab_size)
  per_layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
               "self_attn.q_proj.weight": (q, d), "self_attn.q_proj.bias": (q,),
               "self_attn.k_proj.weight": (kv, d), "self_attn.k_proj.bias": (kv,),
               "self_attn.v_proj.weight": (kv, d), "self_attn.v_proj.bias": (kv,),
               "self_attn.o_proj.weight": (d, q), "mlp.gate_proj.weight": (f, d),
               "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f)}
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (v, d)
  for i in range(cfg.num_layers):
    shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
  return shapes


def _pairs(cfg: ModelConfig) -> list[tuple[str, str, str, int | None]]:
  """(our flat name, HF name, layout kind, layer index or None) for every backbone tensor."""
  out = [(ours, hf, kind, None) for ours, hf, kind in _TOP
         if ours != "lm_head/kernel" or not cfg.tie_embeddings]
  for i in range(cfg.num_layers):
    out += [(rel, f"model.layers.{i}.{hf}", kind, i) for rel, hf, kind in _LAYER
            if cfg.qkv_bias or not kind.endswith("_bias")]
  return out


def _layer_prefix(cfg: ModelConfig, i: int) -> str:
  return "decoder/layers" if cfg.scan_layers else f"decoder/layers_{i}"


# ----------------------------------------------------------------------------------------------------
# Flat trees, expected shapes, fresh multimodal parameters.

def flatten(params: Mapping[str, Any]) -> dict[str, Any]:
  """Nested params -> {"decoder/layers/attn/q/kernel": array}."""
  flat = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat[_SEP.join(str(getattr(k, "key", k)) for k in path)] = x
  return flat


def unflatten(flat: Mapping[str, Any]) -> Params:
  tree: Params = {}
  for name, x in flat.items():
    *parents, leaf = name.split(_SEP)
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return tree


def _init_fn(cfg: ModelConfig) -> Callable[[jax.Array], Params]:
  batch = sequence.text_batch(np.zeros((1, 1), np.int32), cfg.patch_size)
  return lambda key: nn.meta.unbox(Tuna2(cfg).init(key, batch)["params"])


@functools.lru_cache(maxsize=16)
def _expected_shapes(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  return flatten(jax.eval_shape(_init_fn(cfg), jax.random.key(0)))


def expected_shapes(cfg: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat name -> shape/dtype of every parameter of Tuna2(cfg), without allocating."""
  return dict(_expected_shapes(cfg))


@functools.lru_cache(maxsize=8)  # keeps the compiled init: re-importing a model skips the compile
def _fresh_fn(cfg: ModelConfig, names: tuple[str, ...]) -> Callable[[jax.Array], dict[str, jax.Array]]:
  init = _init_fn(cfg)
  return jax.jit(lambda key: {n: x for n, x in flatten(init(key)).items() if n in names})


def _fresh(cfg: ModelConfig, names: list[str], seed: int) -> dict[str, np.ndarray]:
  """Tuna2's own initialisation of `names` for `seed`; XLA prunes the init of everything else."""
  out = _fresh_fn(cfg, tuple(sorted(names)))(jax.random.key(seed))
  return {n: np.asarray(x) for n, x in out.items()}


def check_params(cfg: ModelConfig, flat: Mapping[str, Any], where: str) -> None:
  """Raises ConversionError naming the first missing, extra or mis-shaped tensor."""
  want = expected_shapes(cfg)
  for name, spec in want.items():
    if name not in flat:
      raise ConversionError(f"{where}: missing tensor {name!r} (expected shape {tuple(spec.shape)})")
    if tuple(flat[name].shape) != tuple(spec.shape):
      raise ConversionError(f"{where}: tensor {name!r} has shape {tuple(flat[name].shape)}, "
                            f"expected {tuple(spec.shape)}")
  extra = sorted(set(flat) - set(want))
  if extra:
    raise ConversionError(f"{where}: unexpected tensor(s) {extra} not in the model")


# ----------------------------------------------------------------------------------------------------
# HF import / export.

def _read_json(path: pathlib.Path) -> dict[str, Any]:
  if not path.is_file():
    raise ConversionError(f"{path.parent}: no {path.name}")
  return json.loads(path.read_text())


def read_hf_tensors(hf_dir: PathLike) -> dict[str, np.ndarray]:
  """All tensors of a save_pretrained directory (one file, or the shards of the index)."""
  hf_dir = pathlib.Path(hf_dir)
  index = hf_dir / "model.safetensors.index.json"
  if index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (hf_dir / "model.safetensors").exists():
    files = ["model.safetensors"]
  else:
    raise ConversionError(f"{hf_dir}: neither model.safetensors nor model.safetensors.index.json")
  tensors: dict[str, np.ndarray] = {}
  for f in files:
    tensors.update(load_file(hf_dir / f))
  return tensors


def import_hf(hf_dir: PathLike, *, seed: int = 0, dtype: str | None = None,
              **overrides: Any) -> tuple[ModelConfig, Params, ImportReport]:
  """Loads a Qwen2 save_pretrained directory. dtype: run the model in it (params cast, cfg follows).

  `overrides` set ModelConfig fields config.json does not fix (scan_layers, patch_size, attention, ...).
  """
  hf_dir = pathlib.Path(hf_dir)
  if dtype:
    overrides.update(dtype=dtype, param_dtype=dtype)
  cfg = config_from_hf(_read_json(hf_dir / "config.json"), **overrides)
  tensors = read_hf_tensors(hf_dir)
  want = _hf_shapes(cfg)
  for name, shape in want.items():
    if name not in tensors:
      raise ConversionError(f"{hf_dir}: missing tensor {name!r} (expected shape {shape} from config.json)")
    if tuple(tensors[name].shape) != shape:
      raise ConversionError(f"{hf_dir}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected "
                            f"{shape} from config.json")
  ignored = sorted(n for n in tensors if n not in want)
  for name in ignored:
    if name == "lm_head.weight" and cfg.tie_embeddings:
      if not np.array_equal(tensors[name], tensors["model.embed_tokens.weight"]):
        raise ConversionError(f"{hf_dir}: tie_word_embeddings=true but lm_head.weight differs from "
                              "model.embed_tokens.weight")
    elif not name.endswith("rotary_emb.inv_freq"):  # old checkpoints store the RoPE cache
      raise ConversionError(f"{hf_dir}: unexpected tensor {name!r} {tuple(tensors[name].shape)} "
                            "(not part of a Qwen2 text model with this config.json)")

  param_dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  flat: dict[str, np.ndarray] = {}
  layers: dict[str, list[np.ndarray]] = {}
  for ours, hf, kind, i in _pairs(cfg):
    x = np.ascontiguousarray(_to_ours(kind, cfg)(tensors[hf]).astype(param_dtype))
    if i is None:
      flat[ours] = x
    elif cfg.scan_layers:
      layers.setdefault(f"decoder/layers/{ours}", []).append(x)
    else:
      flat[f"decoder/layers_{i}/{ours}"] = x
  flat.update({n: np.stack(xs) for n, xs in layers.items()})
  new = sorted(set(expected_shapes(cfg)) - set(flat))
  flat.update(_fresh(cfg, new, seed))
  check_params(cfg, flat, str(hf_dir))
  report = ImportReport(loaded=tuple(sorted(set(flat) - set(new))), initialized=tuple(new),
                        ignored=tuple(ignored), seed=seed)
  return cfg, unflatten(flat), report


def export_hf(out_dir: PathLike, cfg: ModelConfig, params: Params) -> tuple[str, ...]:
  """Writes the text backbone as config.json + model.safetensors for Qwen2ForCausalLM.from_pretrained.

  Returns the names of the parameters Qwen2 has no place for (patch_embed, time_embed, ...).
  """
  flat = {n: np.asarray(x) for n, x in flatten(params).items()}
  check_params(cfg, flat, "export")
  tensors, used = {}, set()
  for ours, hf, kind, i in _pairs(cfg):
    name = ours if i is None else f"{_layer_prefix(cfg, i)}/{ours}"
    x = flat[name][i] if i is not None and cfg.scan_layers else flat[name]
    tensors[hf] = np.ascontiguousarray(_to_hf(kind, cfg)(x))
    used.add(name)
  if not cfg.qkv_bias:  # Qwen2 always has q/k/v biases: zeros are the exact equivalent
    for name, shape in _hf_shapes(cfg).items():
      if name.endswith("_proj.bias"):
        tensors[name] = np.zeros(shape, tensors["model.embed_tokens.weight"].dtype)
  dtype = tensors["model.embed_tokens.weight"].dtype.name
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2) + "\n")
  save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
  return tuple(sorted(set(flat) - used))


# ----------------------------------------------------------------------------------------------------
# Native format.

def save_native(out_dir: PathLike, cfg: ModelConfig, params: Params) -> None:
  """config.json (ModelConfig fields) + params.safetensors (flat names) in `out_dir`."""
  flat = {n: np.ascontiguousarray(np.asarray(x)) for n, x in flatten(params).items()}
  check_params(cfg, flat, "save_native")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
  save_file(flat, out_dir / NATIVE_PARAMS, metadata={"format": "tuna2_native"})


def load_native(ckpt_dir: PathLike, dtype: str | None = None) -> tuple[ModelConfig, Params]:
  """Reads a save_native directory. dtype: run the model in it (params cast, cfg follows)."""
  ckpt_dir = pathlib.Path(ckpt_dir)
  cfg = ModelConfig.from_dict(_read_json(ckpt_dir / "config.json"))
  flat = load_file(ckpt_dir / NATIVE_PARAMS)
  check_params(cfg, flat, str(ckpt_dir))
  if dtype:
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    flat = {n: x.astype(jax.numpy.dtype(dtype)) for n, x in flat.items()}
  return cfg, unflatten(flat)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m tuna2_jax.convert.hf_qwen2",
                                   description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="HF Qwen2 directory -> native checkpoint")
  imp.add_argument("--hf_dir", required=True)
  imp.add_argument("--out", required=True)
  imp.add_argument("--seed", type=int, default=0, help="seed of the fresh multimodal parameters")
  imp.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=True)
  imp.add_argument("--patch_size", type=int, default=ModelConfig.patch_size)
  exp = sub.add_parser("export", help="native checkpoint -> HF Qwen2 directory (text backbone)")
  exp.add_argument("--ckpt", required=True)
  exp.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  if args.command == "import":
    cfg, params, report = import_hf(args.hf_dir, seed=args.seed, scan_layers=args.scan_layers,
                                    patch_size=args.patch_size)
    save_native(args.out, cfg, params)
    print(f"imported {args.hf_dir} -> {args.out}: {report.summary()}")
  else:
    cfg, params = load_native(args.ckpt)
    left_out = export_hf(args.out, cfg, params)
    print(f"exported the text backbone of {args.ckpt} -> {args.out}; left out: "
          f"{sorted({n.split(_SEP)[0] for n in left_out}) or 'nothing'} ({len(left_out)} tensors)")


if __name__ == "__main__":
  main()
