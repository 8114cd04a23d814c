"""HF SigLIP / SigLIP2 vision import against random-weight transformers fixtures (make_golden_siglip2.py).

The fixtures' images are packed into ONE contract row with text around them, so the check also covers the
per-image attention mask, the grid read from `positions`, and the position-table resize at odd grids.
Set TUNA2_GOLDEN_DIR to read freshly generated fixtures (`make parity`).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.convert import GOLDEN_DIR
from tuna2_jax import sequence
from tuna2_jax.convert import siglip2
from tuna2_jax.convert.hf_qwen2 import ConversionError, flatten
from tuna2_jax.model.config import ModelConfig
from tuna2_jax.model.vision_encoder import VisionEncoder

FIXTURES = ("siglip2_naflex", "siglip_fixed")
ATOL = 1e-4  # float32 hidden states of O(5): only layout or math errors exceed it


def fixture_dir(name: str):
  d = GOLDEN_DIR / name
  if not (d / "golden.safetensors").is_file():
    pytest.skip(f"no {name} fixture under {GOLDEN_DIR}: run "
                f"tests/golden/make_golden_siglip2.py --out={GOLDEN_DIR}")
  return d


@functools.cache
def config(name: str, **overrides) -> ModelConfig:
  fields = siglip2.vision_fields_from_hf(json.loads((fixture_dir(name) / "config.json").read_text()))
  return ModelConfig.from_dict(dict(fields, variant="tuna_r", vision_feature_layer=-2, **overrides))


def packed_row(golden: dict[str, np.ndarray], patch: int) -> tuple[dict[str, np.ndarray], np.ndarray, list]:
  """One row: text, image 0, text, image 1, ... with the fixture's float pixels at the patch positions."""
  n = len([k for k in golden if k.startswith("pixels_")])
  parts: list = []
  for i in range(n):
    h, w = golden[f"grid_{i}"]
    image = np.zeros((h * patch, w * patch, 3), np.uint8)
    parts += [sequence.Text([7, 8, 9][: i + 1]), sequence.Image(image)]
  row = sequence.pack_documents([parts], seq_len=sequence.document_length(parts, patch) + 5, patch_size=patch)
  pixels = np.zeros(row["patches"].shape, np.float32)
  where = []
  for i in range(n):
    idx = np.flatnonzero((row["image_ids"] == i + 1) & (row["modality"] == sequence.PATCH))
    pixels[idx] = golden[f"pixels_{i}"]
    where.append(idx)
  return sequence.stack_rows([row]), pixels[None], where


def encode(cfg: ModelConfig, params, batch, pixels) -> np.ndarray:
  fields = {k: batch[k] for k in ("modality", "image_ids", "attn_end", "positions")}
  fn = jax.jit(lambda p, x: VisionEncoder(cfg).apply({"params": p}, x, **fields))
  return np.asarray(fn(params, pixels))[0]


VARIANTS = {"scanned": {}, "unscanned": dict(scan_layers=False),
            "chunked": dict(attention="chunked", attention_chunk=16)}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("name", FIXTURES)
def test_import_matches_hf_hidden_states(name: str, variant: dict):
  cfg = config(name, **variant)
  params, report = siglip2.import_siglip(fixture_dir(name), cfg)
  assert report.conv == (name == "siglip_fixed")
  # Dropped: the last layer, the post-LayerNorm and the pooling head.
  assert any(".layers.2." in n for n in report.unused) and any("post_layernorm" in n for n in report.unused)
  assert any(n.startswith("head.") for n in report.unused)
  golden = load_file(fixture_dir(name) / "golden.safetensors")
  batch, pixels, where = packed_row(golden, cfg.patch_size)
  got = encode(cfg, params, batch, pixels)
  for i, idx in enumerate(where):
    np.testing.assert_allclose(got[idx], golden[f"hidden_{i}"], rtol=0, atol=ATOL, err_msg=f"image {i}")


def test_resize_method_matters():
  """The same weights with the other class's resize miss the fixture: the check is sensitive to it."""
  cfg = dataclasses.replace(config("siglip2_naflex"), vision_pos_resize="bicubic")
  params, _ = siglip2.import_siglip(fixture_dir("siglip2_naflex"), cfg)
  golden = load_file(fixture_dir("siglip2_naflex") / "golden.safetensors")
  batch, pixels, where = packed_row(golden, cfg.patch_size)
  got = encode(cfg, params, batch, pixels)
  assert np.abs(got[where[0]] - golden["hidden_0"]).max() > 100 * ATOL


@pytest.mark.parametrize("name", FIXTURES)
def test_export_round_trip(name: str):
  cfg = config(name)
  tensors = siglip2.read_tensors(fixture_dir(name))
  params, report = siglip2.import_state(tensors, cfg)
  back = siglip2.export_state(params, cfg, conv=report.conv)
  assert sorted(back) == sorted(report.loaded)
  for n, x in back.items():
    assert x.dtype == tensors[n].dtype and np.array_equal(x, tensors[n]), n


def test_errors_name_the_tensor_and_field():
  cfg = config("siglip_fixed")
  tensors = dict(siglip2.read_tensors(fixture_dir("siglip_fixed")))
  bad = dict(tensors, **{"encoder.layers.1.mlp.fc1.weight": np.zeros((7, 48), np.float32)})
  with pytest.raises(ConversionError, match=r"encoder\.layers\.1\.mlp\.fc1\.weight.*\(7, 48\).*\(88, 48\)"):
    siglip2.import_state(bad, cfg)
  missing = {k: v for k, v in tensors.items() if k != "encoder.layers.0.layer_norm2.bias"}
  with pytest.raises(ConversionError, match=r"encoder\.layers\.0\.layer_norm2\.bias"):
    siglip2.import_state(missing, cfg)
  with pytest.raises(ConversionError, match="model.vision_mlp_dim"):
    siglip2.import_siglip(fixture_dir("siglip_fixed"), dataclasses.replace(cfg, vision_mlp_dim=64))
  # A full SiglipModel's vision tower sits under "vision_model."; text tensors are reported unused.
  prefixed = {f"vision_model.{k}": v for k, v in tensors.items()} | {"text_model.x": np.zeros(2, np.float32)}
  params, report = siglip2.import_state(prefixed, cfg)
  assert "text_model.x" in report.unused
  np.testing.assert_array_equal(flatten(params)["patch_embed/bias"],
                                tensors["embeddings.patch_embedding.bias"])
