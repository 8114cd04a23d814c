"""Every config loads, validates and matches its checked-in flat golden; presets have Qwen2.5's sizes and
shard fully on 8 devices (eval_shape only: no memory)."""

import dataclasses
import glob
import importlib
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from tuna2_jax import sharding, train
from tuna2_jax.model.config import ConfigError, ModelConfig, count_text_params
from tuna2_jax.model.tuna2 import Tuna2

CONFIG_FILES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "tuna*.py")))
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "configs_flat.txt")


def load(name):
  return importlib.import_module(f"configs.{name}").get_config()


def flatten(d, prefix=""):
  for k in sorted(d):
    v = d[k]
    if hasattr(v, "items"):
      yield from flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}: {v!r}"


def render_all() -> str:
  lines = []
  for path in CONFIG_FILES:
    name = os.path.basename(path)[:-3]
    lines += [f"{name}.{line}" for line in flatten(load(name).to_dict())]
  return "\n".join(lines) + "\n"


def test_configs_match_flat_golden():
  """Silent default drift shows up here; regenerate with `python -m tests.test_configs` after a deliberate
  change and review the diff."""
  with open(GOLDEN) as f:
    assert render_all() == f.read()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.basename(p))
def test_every_config_validates(path):
  c = load(os.path.basename(path)[:-3])
  ModelConfig.from_dict(c.model.to_dict())


@pytest.mark.parametrize("name, billions", [("tuna2_0p5b", 0.49), ("tuna2_1p5b", 1.54), ("tuna2_7b", 7.62)])
def test_text_backbone_matches_qwen25_published_size(name, billions):
  cfg = ModelConfig.from_dict(load(name).model.to_dict())
  assert round(count_text_params(cfg) / 1e9, 2) == billions


@pytest.mark.parametrize("field, value, message", [
    ("num_kv_heads", 3, "model.num_heads .* divisible by model.num_kv_heads"),
    ("attention", "flash", "model.attention"),
    ("head_dim", 7, "model.head_dim"),
    ("hidden_size", 0, "model.hidden_size must be positive"),
])
def test_bad_model_field_is_named(field, value, message):
  c = load("tuna2_debug")
  c.model[field] = value
  with pytest.raises(ConfigError, match=message):
    ModelConfig.from_dict(c.model.to_dict())


@pytest.mark.parametrize("override, message", [
    (("mesh.shape.data", 3), "mesh.shape"),
    (("mesh.shape.tensor", 8), "divisible by the tensor axis"),
    (("data.global_batch_size", 3), "data.global_batch_size"),
    (("optim.grad_accum", 3), "optim.grad_accum"),
    (("mesh.rules", "nope"), "mesh.rules"),
    (("optim.schedule", "step"), "optim.schedule"),
    (("optim.decay_fraction", 0.0), "optim.decay_fraction"),
])
def test_bad_run_config_fails_before_compiling(override, message):
  c = load("tuna2_debug")
  c.data.global_batch_size = 8
  key, value = override
  section, *rest = key.split(".")
  target = c[section]
  for part in rest[:-1]:
    target = target[part]
  target[rest[-1]] = value
  with pytest.raises(ValueError, match=message):
    train.validate_config(c, 8)


@pytest.mark.parametrize("name", ["tuna2_0p5b", "tuna2_7b"])
def test_full_size_presets_shard_every_large_parameter(name):
  c = load(name)
  cfg = dataclasses.replace(ModelConfig.from_dict(c.model.to_dict()))
  model = Tuna2(cfg)
  batch = train.dummy_batch(c)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, jax.devices()[:8])
  abstract = jax.eval_shape(model.init, jax.random.key(0), batch)
  shardings = sharding.logical_to_sharding(abstract, mesh, sharding.RULES["fsdp_tp"])
  leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract))
  specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  total = 0
  for (path, leaf), s in zip(leaves, specs):
    size = int(np.prod(leaf.shape))
    total += size
    if size >= 1_000_000:
      axes = [a for ax in s.spec if ax for a in (ax if isinstance(ax, tuple) else (ax,))]
      # At least FSDP-sharded (4 ways here); matrices with a tensor-parallel axis get all 8.
      ways = np.prod([mesh.shape[a] for a in axes])
      assert ways >= 4, f"{jax.tree_util.keystr(path)} {leaf.shape} {s.spec}"
  assert total > count_text_params(cfg)


if __name__ == "__main__":
  with open(GOLDEN, "w") as f:
    f.write(render_all())
