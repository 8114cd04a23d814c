"""The official-release loader: a state dict with the release's names (random arrays, tiny shapes) lands where
the table says, checked by re-deriving each layout from how the release's modules use the tensor."""

from __future__ import annotations

import dataclasses
import functools
import json
import struct

import einops
import ml_dtypes
import numpy as np
import pytest

from tuna2_jax import sequence
from tuna2_jax.convert import official
from tuna2_jax.convert.hf_qwen2 import ConversionError, expected_shapes, flatten, unflatten

BASE = dict(vocab_size=37, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
            tie_embeddings=False, patch_size=4, time_embed_dim=16, unpatchify="raster_chunks",
            flow_layers=2, flow_heads=4, flow_kv_heads=2, flow_head_dim=8, flow_mlp_dim=40,
            vision_hidden_size=24, vision_num_layers=3, vision_num_heads=2, vision_mlp_dim=40,
            vision_pos_grid=3)
VARIANTS = ("tuna2", "tuna_r")


@functools.cache
def config(variant: str, scan_layers: bool = True) -> official.ModelConfig:
  return official.ModelConfig.from_dict(dict(BASE, variant=variant, scan_layers=scan_layers))


def release_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """The release's inner-model tensors for cfg, written from its module definitions (not from our table)."""
  d, p, v = cfg.hidden_size, cfg.patch_size, cfg.vocab_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  s = {"tuna.model.embed_tokens.weight": (v, d), "tuna.model.norm.weight": (d,),
       "tuna.lm_head.weight": (v, d),
       "time_embed.mlp.0.weight": (d, cfg.time_embed_dim), "time_embed.mlp.0.bias": (d,),
       "time_embed.mlp.2.weight": (d, d), "time_embed.mlp.2.bias": (d,), "mask_token": (1, 1, d),
       "diffusion_head_b.norm_final.weight": (d,), "diffusion_head_b.adaLN_modulation.1.weight": (2 * d, d),
       "diffusion_head_b.adaLN_modulation.1.bias": (2 * d,), "diffusion_head_b.linear.weight": (p * p * 3, d),
       "diffusion_head_b.linear.bias": (p * p * 3,)}
  for i in range(cfg.num_layers):
    pre = f"tuna.model.layers.{i}."
    s.update({pre + "input_layernorm.weight": (d,), pre + "post_attention_layernorm.weight": (d,),
              pre + "self_attn.q_proj.weight": (q, d), pre + "self_attn.q_proj.bias": (q,),
              pre + "self_attn.k_proj.weight": (kv, d), pre + "self_attn.k_proj.bias": (kv,),
              pre + "self_attn.v_proj.weight": (kv, d), pre + "self_attn.v_proj.bias": (kv,),
              pre + "self_attn.o_proj.weight": (d, q), pre + "mlp.gate_proj.weight": (cfg.mlp_dim, d),
              pre + "mlp.up_proj.weight": (cfg.mlp_dim, d), pre + "mlp.down_proj.weight": (d, cfg.mlp_dim)})
  hq, hkv, f = cfg.flow_heads * cfg.flow_head_dim, cfg.flow_kv_heads * cfg.flow_head_dim, cfg.flow_mlp_dim
  for i in range(cfg.flow_layers):
    pre = f"diffusion_head_a.{i}."
    s.update({pre + "adaLN_modulation.1.weight": (6 * d, d), pre + "adaLN_modulation.1.bias": (6 * d,),
              pre + "input_layernorm.weight": (d,), pre + "post_attention_layernorm.weight": (d,),
              pre + "self_attn.q_proj.weight": (hq, d), pre + "self_attn.k_proj.weight": (hkv, d),
              pre + "self_attn.v_proj.weight": (hkv, d), pre + "self_attn.o_proj.weight": (d, hq),
              pre + "self_attn.q_norm.weight": (cfg.flow_head_dim,),
              pre + "self_attn.k_norm.weight": (cfg.flow_head_dim,),
              pre + "mlp.gate_proj.weight": (f, d), pre + "mlp.up_proj.weight": (f, d),
              pre + "mlp.down_proj.weight": (d, f)})
  if cfg.variant == "tuna2":
    s.update({"vision_encoder.patch_embedding.weight": (d, 3, p, p),
              "vision_encoder.patch_embedding.bias": (d,), "vision_encoder.norm.weight": (d,)})
    return s
  dv, g, fv = cfg.vision_hidden_size, cfg.vision_pos_grid, cfg.vision_mlp_dim
  s.update({"vision_model.embeddings.patch_embedding.weight": (dv, 3, p, p),
            "vision_model.embeddings.patch_embedding.bias": (dv,),
            "vision_model.embeddings.position_embedding.weight": (g * g, dv),
            "siglip_proj.0.weight": (dv,), "siglip_proj.1.weight": (d, dv), "siglip_proj.1.bias": (d,),
            "siglip_proj.3.weight": (d, d), "siglip_proj.3.bias": (d,)})
  for i in range(cfg.vision_num_layers - 1):  # the release truncates the encoder to feature layer -2
    pre = f"vision_model.encoder.layers.{i}."
    for ln in ("layer_norm1", "layer_norm2"):
      s.update({pre + ln + ".weight": (dv,), pre + ln + ".bias": (dv,)})
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      s.update({pre + f"self_attn.{proj}.weight": (dv, dv), pre + f"self_attn.{proj}.bias": (dv,)})
    s.update({pre + "mlp.fc1.weight": (fv, dv), pre + "mlp.fc1.bias": (fv,), pre + "mlp.fc2.weight": (dv, fv),
              pre + "mlp.fc2.bias": (dv,)})
  return s


def release_state(cfg, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {n: rng.standard_normal(s).astype(np.float32) for n, s in release_shapes(cfg).items()}


def init(variant: str, scan_layers: bool = True):
  return _init(variant, scan_layers)


@functools.cache
def _init(variant: str, scan_layers: bool):
  """Random params of the model's shapes: what a partial checkpoint leaves in place (no init compile)."""
  rng = np.random.default_rng(5)
  shapes = expected_shapes(config(variant, scan_layers))
  return unflatten({n: rng.standard_normal(s.shape).astype(s.dtype) for n, s in shapes.items()})


def load(variant: str, state, scan_layers: bool = True, **kw):
  return official.load_official(state, config(variant, scan_layers), init(variant, scan_layers), **kw)


def layer(flat, name: str, i: int, cfg):
  """Layer i of a (scanned or unscanned) param: `name` like 'decoder/layers/attn/q/kernel'."""
  prefix, rel = name.split("/layers/")
  return flat[name][i] if cfg.scan_layers else flat[f"{prefix}/layers_{i}/{rel}"]


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_values_land_where_the_release_uses_them(variant: str, scan_layers: bool):
  cfg = config(variant, scan_layers)
  state = release_state(cfg)
  params, report = load(variant, state, scan_layers)
  assert report.missing == () and report.unmapped == ()
  assert sorted(report.loaded) == sorted(state)
  flat = {n: np.asarray(x) for n, x in flatten(params).items()}
  rng = np.random.default_rng(1)
  d = cfg.hidden_size

  # Decoder layer 1: q_proj(x) per head, o_proj over concatenated heads.
  x = rng.standard_normal(d).astype(np.float32)
  pre = "tuna.model.layers.1.self_attn."
  w, b = state[pre + "q_proj.weight"], state[pre + "q_proj.bias"]
  ours = np.einsum("d,dhk->hk", x, layer(flat, "decoder/layers/attn/q/kernel", 1, cfg))
  ours += layer(flat, "decoder/layers/attn/q/bias", 1, cfg)
  np.testing.assert_allclose(ours.reshape(-1), w @ x + b, rtol=1e-5, atol=1e-5)
  a = rng.standard_normal((cfg.num_heads, cfg.head_dim)).astype(np.float32)
  np.testing.assert_allclose(np.einsum("hk,hkd->d", a, layer(flat, "decoder/layers/attn/o/kernel", 1, cfg)),
                             state[pre + "o_proj.weight"] @ a.reshape(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(flat["lm_head/kernel"].T, state["tuna.lm_head.weight"])
  np.testing.assert_array_equal(flat["embed/embedding"], state["tuna.model.embed_tokens.weight"])

  # Flow head layer 1: adaLN chunk j = (shift, scale, gate, shift, scale, gate)[j] of the 6*D Linear.
  c = rng.standard_normal(d).astype(np.float32)
  pre = "diffusion_head_a.1.adaLN_modulation.1."
  full = state[pre + "weight"] @ c + state[pre + "bias"]
  kern = layer(flat, "flow_head/layers/adaln/kernel", 1, cfg)
  bias = layer(flat, "flow_head/layers/adaln/bias", 1, cfg)
  for j, chunk in enumerate(np.split(full, 6)):
    np.testing.assert_allclose(c @ kern[:, j, :] + bias[j], chunk, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(layer(flat, "flow_head/layers/attn/k_norm/scale", 1, cfg),
                                state["diffusion_head_a.1.self_attn.k_norm.weight"])
  h = rng.standard_normal(d).astype(np.float32)
  want = state["diffusion_head_b.linear.weight"] @ h + state["diffusion_head_b.linear.bias"]
  np.testing.assert_allclose(h @ flat["flow_head/out/kernel"] + flat["flow_head/out/bias"], want,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(flat["mask_token"], state["mask_token"][0, 0])
  t_feat = rng.standard_normal(cfg.time_embed_dim).astype(np.float32)
  np.testing.assert_allclose(t_feat @ flat["time_embed/fc1/kernel"],
                             state["time_embed.mlp.0.weight"] @ t_feat, rtol=1e-5, atol=1e-5)

  # The patch kernel: the release's Conv2d on a [3, p, p] patch == our linear map of the patchified patch.
  p = cfg.patch_size
  image = rng.standard_normal((p, p, 3)).astype(np.float32)                 # [H, W, C]
  if variant == "tuna2":
    conv_w = state["vision_encoder.patch_embedding.weight"]
    conv_b = state["vision_encoder.patch_embedding.bias"]
    kernel, kbias = flat["patch_embed/proj/kernel"], flat["patch_embed/proj/bias"]
  else:
    conv_w = state["vision_model.embeddings.patch_embedding.weight"]
    conv_b = state["vision_model.embeddings.patch_embedding.bias"]
    kernel, kbias = flat["vision/encoder/patch_embed/kernel"], flat["vision/encoder/patch_embed/bias"]
  conv = np.einsum("dcij,ijc->d", conv_w, image) + conv_b
  np.testing.assert_allclose(sequence.patchify(image, p)[0] @ kernel + kbias, conv, rtol=1e-5, atol=1e-5)
  if variant == "tuna_r":
    g = cfg.vision_pos_grid
    table = flat["vision/encoder/pos_embed"]
    pos = state["vision_model.embeddings.position_embedding.weight"]
    for r, col in ((0, 1), (2, 0), (1, 2)):  # row-major position ids, as SigLIP's reshape(G, G, D)
      np.testing.assert_array_equal(table[r, col], pos[r * g + col])
    xv = rng.standard_normal(cfg.vision_hidden_size).astype(np.float32)
    w = state["vision_model.encoder.layers.1.self_attn.out_proj.weight"]
    o = layer(flat, "vision/encoder/layers/o/kernel", 1, cfg)
    np.testing.assert_allclose(np.einsum("hk,hkd->d", xv.reshape(o.shape[:2]), o), w @ xv,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xv @ flat["vision/connector/fc1/kernel"], state["siglip_proj.1.weight"] @ xv,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(flat["vision/connector/norm/scale"], state["siglip_proj.0.weight"])


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_exact(variant: str, scan_layers: bool):
  cfg = config(variant, scan_layers)
  state = release_state(cfg, seed=2)
  params, _ = load(variant, state, scan_layers)
  back = official.to_official(params, cfg)
  assert sorted(back) == sorted(state)
  for n in state:
    assert back[n].dtype == state[n].dtype and np.array_equal(back[n], state[n]), n
  again, _ = load(variant, back, scan_layers)
  fa, fb = flatten(params), flatten(again)
  assert sorted(fa) == sorted(fb) and all(np.array_equal(fa[n], fb[n]) for n in fa)


def test_every_parameter_is_in_the_table():
  for variant in VARIANTS:
    for scan in (True, False):
      cfg = config(variant, scan)
      ours = set(flatten(init(variant, scan)))
      assert {e.ours for e in official.official_table(cfg)} == ours


def test_partial_checkpoint_report_and_errors(tmp_path):
  cfg = config("tuna2")
  state = release_state(cfg, seed=3)
  # The foundation checkpoint drops some layers; extra tensors (e.g. a RoPE cache) are reported, not loaded.
  partial = {n: x for n, x in state.items() if not n.startswith("diffusion_head_a.1.")}
  partial = {f"tuna_model.{n}": x for n, x in partial.items()}
  partial["tuna_model.time_embed.extra"] = np.ones(2, np.float32)
  params, report = load("tuna2", partial)
  assert sorted(report.missing) == sorted(n for n in state if n.startswith("diffusion_head_a.1."))
  assert report.unmapped == ("time_embed.extra",)
  flat, fresh = flatten(params), flatten(init("tuna2"))
  up = "flow_head/layers/mlp/up/kernel"
  np.testing.assert_array_equal(flat[up][1], fresh[up][1])
  np.testing.assert_array_equal(flat[up][0], state["diffusion_head_a.0.mlp.up_proj.weight"].T)
  with pytest.raises(ConversionError, match="strict"):
    load("tuna2", partial, strict=True)
  bad = dict(state, **{"diffusion_head_a.0.mlp.up_proj.weight": np.zeros((41, 32), np.float32)})
  with pytest.raises(ConversionError, match=r"head_a\.0\.mlp\.up_proj\.weight.*\(41, 32\).*\(40, 32\)"):
    load("tuna2", bad)
  with pytest.raises(ConversionError, match="model.unpatchify"):
    official.load_official(state, dataclasses.replace(cfg, unpatchify="spatial"), init("tuna2"))


def write_bf16_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
  """A BF16 .safetensors file written by hand from the format spec (safetensors.numpy cannot write BF16)."""
  header, blobs, offset = {}, [], 0
  for name, x in tensors.items():
    raw = x.astype(ml_dtypes.bfloat16).tobytes()
    header[name] = {"dtype": "BF16", "shape": list(x.shape), "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_reads_a_bf16_file(tmp_path):
  cfg = config("tuna2")
  state = release_state(cfg, seed=4)
  write_bf16_safetensors(tmp_path / "model.safetensors", state)
  params, report = load("tuna2", tmp_path / "model.safetensors")
  assert report.missing == () and report.unmapped == ()
  flat = flatten(params)
  assert flat["embed/embedding"].dtype == np.float32  # cast to the model's param dtype
  want = einops.rearrange(state["vision_encoder.patch_embedding.weight"], "d c i j -> (i j c) d")
  np.testing.assert_array_equal(flat["patch_embed/proj/kernel"],
                                want.astype(ml_dtypes.bfloat16).astype(np.float32))
