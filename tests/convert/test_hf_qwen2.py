"""HF Qwen2 import / export against random-weight transformers fixtures (tests/golden, make_golden.py).

Set TUNA2_GOLDEN_DIR to read freshly generated fixtures and TUNA2_EXPORT_DIR to keep the exports for
tests/golden/check_export.py (`make parity` does both).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.convert import GOLDEN_DIR, golden, qwen2_fixtures
from tuna2_jax import sequence
from tuna2_jax.convert import hf_qwen2
from tuna2_jax.model.tuna2 import Tuna2

FIXTURES = qwen2_fixtures()
TIED, UNTIED = "qwen2_gqa3_tied", "qwen2_gqa2_untied_hd12"  # the shapes the error tests spell out
ATOL = 1e-4  # float32 logits of O(10): only layout or math errors exceed it


@functools.cache
def imported(name: str, scan_layers: bool):
  return hf_qwen2.import_hf(GOLDEN_DIR / name, seed=0, scan_layers=scan_layers)


def logits(cfg, params, tokens: np.ndarray) -> np.ndarray:
  batch = sequence.text_batch(tokens, cfg.patch_size)
  fn = jax.jit(lambda p, b: Tuna2(cfg).apply({"params": p}, b, flow=False).logits)
  return np.asarray(fn(params, batch))


def assert_trees_equal(a, b) -> None:
  fa, fb = hf_qwen2.flatten(a), hf_qwen2.flatten(b)
  assert sorted(fa) == sorted(fb)
  for n in fa:
    x, y = np.asarray(fa[n]), np.asarray(fb[n])
    assert x.dtype == y.dtype and np.array_equal(x, y), n


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("name", FIXTURES)
def test_import_matches_hf_logits(name: str, scan_layers: bool):
  cfg, params, report = imported(name, scan_layers)
  hf = json.loads((GOLDEN_DIR / name / "config.json").read_text())
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_kv_heads, cfg.vocab_size, cfg.tie_embeddings) == (
      hf["hidden_size"], hf["num_hidden_layers"], hf["num_key_value_heads"], hf["vocab_size"],
      hf["tie_word_embeddings"])
  tokens, want = golden(name)
  got = logits(cfg, params, tokens)
  assert got.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
  # Everything outside the text backbone is fresh, and reported as such.
  fresh = {n.split("/")[0] for n in report.initialized}
  assert {"patch_embed", "time_embed"} <= fresh and not fresh & {"embed", "decoder", "lm_head"}
  assert "decoder/final_norm/scale" in report.loaded


def test_fresh_parameters_come_from_the_seed():
  flat = {s: hf_qwen2.flatten(hf_qwen2.import_hf(GOLDEN_DIR / TIED, seed=s)[1]) for s in (0, 1)}
  base = hf_qwen2.flatten(imported(TIED, True)[1])
  for n in base:
    same = np.array_equal(flat[0][n], base[n])  # same seed: the same parameters
    assert same, n
    if n.endswith("kernel") and n.startswith(("patch_embed", "time_embed")):
      assert not np.array_equal(flat[1][n], base[n]), n  # another seed: other random kernels
  # They come from the model's own initialisers: RMSNorm scale 1, biases 0.
  np.testing.assert_array_equal(base["patch_embed/norm/scale"], 1.0)
  np.testing.assert_array_equal(base["time_embed/fc1/bias"], 0.0)


@pytest.mark.parametrize("name", FIXTURES)
def test_export_then_import_is_exact(name: str, tmp_path: pathlib.Path):
  export_root = pathlib.Path(os.environ.get("TUNA2_EXPORT_DIR", tmp_path))
  cfg, params, _ = imported(name, True)
  left_out = hf_qwen2.export_hf(export_root / name, cfg, params)
  assert {n.split("/")[0] for n in left_out} >= {"patch_embed", "time_embed"}
  # HF -> ours -> HF reproduces the fixture's tensors bit for bit, from either layer layout.
  want = hf_qwen2.read_hf_tensors(GOLDEN_DIR / name)
  got = hf_qwen2.read_hf_tensors(export_root / name)
  assert sorted(got) == sorted(want)
  for n in want:
    assert got[n].dtype == want[n].dtype and np.array_equal(got[n], want[n]), n
  cfg_u, params_u, _ = imported(name, False)
  hf_qwen2.export_hf(tmp_path / "unscanned", cfg_u, params_u)
  for n, x in hf_qwen2.read_hf_tensors(tmp_path / "unscanned").items():
    assert np.array_equal(x, want[n]), n
  cfg2, params2, _ = hf_qwen2.import_hf(export_root / name, seed=0)
  assert cfg2 == cfg
  assert_trees_equal(params2, params)


def test_native_round_trip_and_dtype(tmp_path: pathlib.Path):
  cfg, params, _ = imported(UNTIED, False)
  hf_qwen2.save_native(tmp_path, cfg, params)
  cfg2, params2 = hf_qwen2.load_native(tmp_path)
  assert cfg2 == cfg
  assert_trees_equal(params2, params)
  assert "decoder/layers_0/attn/q/kernel" in load_file(tmp_path / hf_qwen2.NATIVE_PARAMS)
  cfg3, params3 = hf_qwen2.load_native(tmp_path, dtype="bfloat16")
  assert cfg3.dtype == cfg3.param_dtype == "bfloat16"
  assert {x.dtype.name for x in jax.tree.leaves(params3)} == {"bfloat16"}


def test_cli_import_export(tmp_path: pathlib.Path):
  name = TIED
  hf_qwen2.main(["import", f"--hf_dir={GOLDEN_DIR / name}", f"--out={tmp_path / 'native'}", "--seed=1"])
  assert {p.name for p in (tmp_path / "native").iterdir()} == {"config.json", hf_qwen2.NATIVE_PARAMS}
  hf_qwen2.main(["export", f"--ckpt={tmp_path / 'native'}", f"--out={tmp_path / 'hf'}"])
  want = hf_qwen2.read_hf_tensors(GOLDEN_DIR / name)
  got = hf_qwen2.read_hf_tensors(tmp_path / "hf")
  assert sorted(got) == sorted(want) and all(np.array_equal(got[n], want[n]) for n in want)


def test_sharded_checkpoint(tmp_path: pathlib.Path):
  name = UNTIED
  tensors = hf_qwen2.read_hf_tensors(GOLDEN_DIR / name)
  shutil.copy(GOLDEN_DIR / name / "config.json", tmp_path)
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for f, ns in shards.items():
    save_file({n: tensors[n] for n in ns}, tmp_path / f)
  index = {"metadata": {}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  _, params, _ = hf_qwen2.import_hf(tmp_path, scan_layers=False)
  assert_trees_equal(params, imported(name, False)[1])


# ----------------------------------------------------------------------------------------------------
# Error paths: each names the offending tensor (and both shapes where there are two).

def _broken_copy(tmp_path: pathlib.Path, edit) -> pathlib.Path:
  name = TIED
  tensors = dict(hf_qwen2.read_hf_tensors(GOLDEN_DIR / name))
  edit(tensors)
  shutil.copy(GOLDEN_DIR / name / "config.json", tmp_path)
  save_file(tensors, tmp_path / "model.safetensors")
  return tmp_path


def test_wrong_shape_names_tensor_and_shapes(tmp_path: pathlib.Path):
  key = "model.layers.1.mlp.up_proj.weight"
  def edit(t):
    t[key] = t[key][:-1]
  with pytest.raises(hf_qwen2.ConversionError, match=rf"{key}.*\(79, 48\).*\(80, 48\)"):
    hf_qwen2.import_hf(_broken_copy(tmp_path, edit))


def test_missing_tensor_is_named(tmp_path: pathlib.Path):
  key = "model.layers.0.self_attn.k_proj.bias"
  with pytest.raises(hf_qwen2.ConversionError, match=rf"missing tensor '{key}'.*\(16,\)"):
    hf_qwen2.import_hf(_broken_copy(tmp_path, lambda t: t.pop(key)))


def test_unexpected_tensor_is_named(tmp_path: pathlib.Path):
  def edit(t):
    t["model.layers.2.input_layernorm.weight"] = np.ones(48, np.float32)  # a layer config.json lacks
  with pytest.raises(hf_qwen2.ConversionError, match=r"unexpected tensor 'model\.layers\.2\."):
    hf_qwen2.import_hf(_broken_copy(tmp_path, edit))


def test_unsupported_config_is_rejected():
  hf = json.loads((GOLDEN_DIR / TIED / "config.json").read_text())
  with pytest.raises(hf_qwen2.ConversionError, match="model_type='llama'"):
    hf_qwen2.config_from_hf({**hf, "model_type": "llama"})
  with pytest.raises(hf_qwen2.ConversionError, match="rope_type='yarn'"):
    hf_qwen2.config_from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}})
  with pytest.raises(hf_qwen2.ConversionError, match="hidden_size"):
    hf_qwen2.config_from_hf(hf, hidden_size=8)
  legacy = {k: v for k, v in hf.items() if k != "rope_parameters"} | {"rope_theta": 5e5}
  assert hf_qwen2.config_from_hf(legacy).rope_theta == 5e5  # transformers 4.x spelling


def test_native_wrong_shape_is_named(tmp_path: pathlib.Path):
  cfg, params, _ = imported(TIED, True)
  hf_qwen2.save_native(tmp_path, cfg, params)
  flat = load_file(tmp_path / hf_qwen2.NATIVE_PARAMS)
  flat["decoder/layers/attn/o/kernel"] = flat["decoder/layers/attn/o/kernel"][:, :, :, :-1].copy()
  save_file(flat, tmp_path / hf_qwen2.NATIVE_PARAMS)
  with pytest.raises(hf_qwen2.ConversionError,
                     match=r"decoder/layers/attn/o/kernel.*\(2, 3, 16, 47\).*\(2, 3, 16, 48\)"):
    hf_qwen2.load_native(tmp_path)
