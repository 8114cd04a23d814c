"""Checkpointing: exact resume after kill -9, SIGTERM, a kill inside an async save, corrupt steps, resharding
onto other meshes and process counts, params-only reads, warm starts from a run and from HF Qwen2.

The trainer runs as `python -m tuna2_jax.train` subprocesses on a small shapes dataset built once; they share
a compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest
from safetensors.numpy import load_file, save_file

from configs import tuna2_debug
from tests.checkpoint.restore_worker import abstract_train_state, flat_state
from tests.convert import GOLDEN_DIR
from tuna2_jax import api, checkpoint, optim, sharding, train
from tuna2_jax.model.tuna2 import Tuna2

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6


# ----------------------------------------------------------------------------------------------------
# Trainer subprocesses


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Environment of the subprocesses: one CPU device, a shared compilation cache, the built dataset."""
  root = tmp_path_factory.mktemp("ckpt_runs")
  e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
           JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", PYTHONPATH=str(REPO))
  e.pop(checkpoint.FAULT_ENV, None)
  subprocess.run([sys.executable, "-m", "data.shapes", f"--data_dir={root / 'data'}", "--num_train=48",
                  "--num_test=4"], cwd=REPO, env=e, check=True, capture_output=True)
  return dict(env=e, root=root)


def trainer_cmd(env, workdir, *, every=3, extra=()):
  return [sys.executable, "-m", "tuna2_jax.train", "--config=configs/tuna2_debug.py", f"--workdir={workdir}",
          f"--config.train.steps={STEPS}", f"--config.data.data_dir={env['root'] / 'data'}",
          "--config.data.seq_len=64", "--config.data.global_batch_size=4", "--config.train.log_every=1",
          f"--config.checkpoint.every={every}", *extra]


def train_run(env, workdir, **kw) -> str:
  out = subprocess.run(trainer_cmd(env, workdir, **kw), cwd=REPO, env=env["env"], capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stderr


def start(env, workdir, *, fault="", **kw) -> subprocess.Popen:
  e = dict(env["env"], **({checkpoint.FAULT_ENV: fault} if fault else {}))
  with open(pathlib.Path(workdir).with_suffix(".log"), "w") as log:  # the child keeps its own descriptor
    return subprocess.Popen(trainer_cmd(env, workdir, **kw), cwd=REPO, env=e, stdout=log, stderr=log)


def wait_stopped(proc: subprocess.Popen, timeout: float = 240) -> None:
  """Waits for the process to stop itself (SIGSTOP from the fault hook)."""
  t = time.time()
  while time.time() - t < timeout:
    assert proc.poll() is None, f"trainer exited with {proc.returncode} before stopping"
    with open(f"/proc/{proc.pid}/stat") as f:
      if f.read().rsplit(")", 1)[1].split()[0] == "T":
        return
    time.sleep(0.05)
  proc.kill()
  raise TimeoutError("the trainer never reached its fault point")


def kill9(proc: subprocess.Popen) -> None:
  os.kill(proc.pid, signal.SIGKILL)
  assert proc.wait(timeout=30) == -signal.SIGKILL


def losses(workdir) -> dict[int, float]:
  rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
  return {r["step"]: r["loss"] for r in rows}


def saved_state(workdir, step) -> dict[str, np.ndarray]:
  """Every array of a saved TrainState as numpy, read without a target."""
  tree = ocp.PyTreeCheckpointHandler().restore(
      pathlib.Path(checkpoint.checkpoint_dir(workdir), str(step), "state"))
  return flat_state(tree)


def assert_same_state(a, b):
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def straight(env):
  """The reference: STEPS steps without interruption."""
  workdir = env["root"] / "straight"
  train_run(env, workdir)
  return workdir


def test_kill9_and_restart_gives_the_same_trajectory(env, straight):
  workdir = env["root"] / "killed"
  proc = start(env, workdir, fault="stop_after_save:3")
  wait_stopped(proc)  # step 3 is committed; steps 4.. have not run
  kill9(proc)
  assert checkpoint.Checkpointer(workdir).all_steps() == [3]
  log = train_run(env, workdir)
  assert "restored checkpoint step 3" in log
  # Bitwise: parameters, optimizer state, rng, counters, and the data position.
  assert_same_state(saved_state(straight, STEPS), saved_state(workdir, STEPS))
  data = "checkpoints/6/data/process_0-of-1.json"
  assert (straight / data).read_text() == (workdir / data).read_text()
  want, got = losses(straight), losses(workdir)
  assert {4, 5, 6} <= set(got) and set(got) <= set(want)
  assert {s: got[s] for s in got} == {s: want[s] for s in got}  # exact floats, same data order
  meta = [checkpoint.read_json_item(d / "checkpoints/6", "meta") for d in (straight, workdir)]
  for k in ("tokens_seen", "images_seen", "step"):
    assert meta[0][k] == meta[1][k], k
  assert meta[0]["tokens_seen"] > 0 and meta[0]["images_seen"] > 0


def test_sigterm_saves_at_the_next_step_and_restart_resumes_there(env, straight):
  # Also a warm start from the straight run: params only, the optimizer and step start fresh.
  workdir = env["root"] / "sigterm"
  proc = start(env, workdir, every=100, extra=[f"--config.checkpoint.init_from={straight}"])
  t = time.time()
  while not (workdir / "metrics.jsonl").exists() or not (workdir / "metrics.jsonl").read_text():
    assert proc.poll() is None and time.time() - t < 240, "trainer ended before its first step"
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  steps = checkpoint.Checkpointer(workdir).all_steps()
  assert len(steps) == 1 and 1 <= steps[0] < STEPS, steps
  assert f"preempted: saved step {steps[0]}" in pathlib.Path(workdir).with_suffix(".log").read_text()
  report = json.loads((workdir / "warm_start.json").read_text())
  assert report["kind"] == "run" and report["step"] == STEPS and not report["initialized"]
  log = train_run(env, workdir, every=100)
  assert f"restored checkpoint step {steps[0]}" in log and "warm start" not in log
  assert checkpoint.Checkpointer(workdir).all_steps() == [steps[0], STEPS]
  assert max(losses(workdir)) == STEPS


def test_kill_during_async_save_keeps_the_previous_step(env, straight):
  workdir = env["root"] / "in_save"
  proc = start(env, workdir, every=2, fault="stop_in_save:4")
  wait_stopped(proc)
  listing = sorted(os.listdir(workdir / "checkpoints"))
  kill9(proc)
  assert "2" in listing and "4" not in listing, listing  # step 4 only as a temporary directory
  assert any(n.startswith("4.") for n in listing), listing
  ckpt = checkpoint.Checkpointer(workdir)
  assert ckpt.all_steps() == [2]  # the unfinished step is not a step
  ckpt.close()
  _, params = checkpoint.restore_params(workdir)
  np.testing.assert_array_equal(params["embed"]["embedding"],
                                saved_state(workdir, 2)["params/embed/embedding"])
  with pytest.raises(ValueError, match="optim.ema_decay = 0"):
    checkpoint.restore_params(workdir, ema=True)
  # The restart resumes from step 2 and still reproduces the uninterrupted run.
  assert "restored checkpoint step 2" in train_run(env, workdir, every=2)
  assert_same_state(saved_state(straight, STEPS), saved_state(workdir, STEPS))


# ----------------------------------------------------------------------------------------------------
# In-process: small states, 8 fake devices (tests/conftest.py)


def small_state(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"w": jax.numpy.asarray(rng.normal(size=(64, 96)).astype(np.float32)),
          "b": jax.numpy.asarray(rng.normal(size=(96,)).astype(np.float32)), "n": jax.numpy.int32(seed)}


def abstract_of(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def largest_file(step_dir) -> pathlib.Path:
  files = [p for p in pathlib.Path(step_dir, "state").rglob("*") if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def test_corrupt_steps_fall_back_with_a_warning_naming_the_step(tmp_path, caplog):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=5, with_data=False)
  for step in (1, 2, 3, 4):
    ckpt.save(step, small_state(step), meta={"x": step})
  ckpt.close()
  root = tmp_path / "checkpoints"
  truncated = largest_file(root / "4")  # the manifest sees it before anything is read
  with open(truncated, "r+b") as f:
    f.truncate(truncated.stat().st_size // 2)
  garbled = largest_file(root / "3")  # same size: the storage layer or the checksums see it
  with open(garbled, "r+b") as f:
    f.seek(garbled.stat().st_size // 2)
    f.write(bytes(range(64)))
  manifest = root / "2" / checkpoint.MANIFEST  # values that no longer match their checksum
  saved = json.loads(manifest.read_text())
  saved["checksums"]["w"][1] ^= 1
  manifest.write_text(json.dumps(saved))
  ckpt = checkpoint.Checkpointer(tmp_path, keep=5, with_data=False)
  with caplog.at_level(logging.WARNING):
    state, meta = ckpt.restore(abstract_of(small_state(0)))
  assert meta["step"] == 1 and meta["x"] == 1
  np.testing.assert_array_equal(state["w"], small_state(1)["w"])
  warnings = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
  assert len(warnings) == 3
  assert "step 4" in warnings[0] and "truncated" in warnings[0]
  assert "step 3" in warnings[1]
  assert "step 2" in warnings[2] and "array w does not match its saved checksum" in warnings[2]
  assert sorted(os.listdir(root)) == ["1", "corrupt.2", "corrupt.3", "corrupt.4"]
  # Training goes on from step 1 and may write steps 2.. again.
  ckpt.save(2, small_state(2))
  ckpt.close()
  assert checkpoint.Checkpointer(tmp_path, with_data=False).all_steps() == [1, 2]
  with pytest.raises(checkpoint.CorruptCheckpointError, match="truncated"):
    checkpoint.verify_step(root / "corrupt.4")


def test_a_failing_save_leaves_earlier_steps_intact(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=5, with_data=False)
  ckpt.save(1, small_state(1))
  with pytest.raises(TypeError):  # not JSON serialisable: raised by the save or by the wait after it
    ckpt.save(2, small_state(2), meta={"bad": object()})
    ckpt.wait()
  ckpt = checkpoint.Checkpointer(tmp_path, keep=5, with_data=False)
  assert ckpt.all_steps() == [1]
  state, meta = ckpt.restore(abstract_of(small_state(0)))
  assert meta["step"] == 1
  np.testing.assert_array_equal(state["w"], small_state(1)["w"])


def test_keep_last_and_every_kth(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2, keep_every=4, with_data=False)
  for step in range(1, 10):
    ckpt.save(step, small_state(step))
  ckpt.close()
  assert ckpt.all_steps() == [4, 8, 9]


# ----------------------------------------------------------------------------------------------------
# Resharding, params-only restore, warm starts (the debug model, 8 fake devices)


def debug_config(**mesh) -> ml_collections.ConfigDict:
  c = tuna2_debug.get_config()
  c.data.global_batch_size, c.data.seq_len = 8, 64
  c.optim.ema_decay = 0.9
  c.mesh.shape.update(dict(dict(data=1, fsdp=1, tensor=1, sequence=1), **mesh))
  return c


def abstract_state(c):
  """(abstract TrainState with shardings, ModelConfig) for config `c`, nothing compiled or allocated."""
  n = int(np.prod(list(c.mesh.shape.to_dict().values())))
  model_cfg = train.validate_config(c, n)
  mesh = sharding.make_mesh(c.mesh.shape.to_dict(), jax.devices()[:n])
  tx, _ = optim.make_optimizer(c.optim, c.train.steps)
  return abstract_train_state(c, Tuna2(model_cfg), tx, mesh), model_cfg


def random_state(abstract, seed: int):
  """Random values in the layout of `abstract` (cheaper than the initialiser, and nothing is left at init)."""
  rng = np.random.default_rng(seed)

  def fill(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.device_put(jax.random.key(seed), x.sharding)
    if jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
      value = rng.normal(size=x.shape).astype(x.dtype)
    else:
      value = rng.integers(0, 100, size=x.shape).astype(x.dtype)
    return jax.make_array_from_callback(x.shape, x.sharding, lambda idx: value[idx])
  return jax.tree.map(fill, abstract)


def shardings_of(abstract):
  return jax.tree.map(lambda x: x.sharding, abstract)


@pytest.fixture(scope="module")
def fsdp8_run(tmp_path_factory):
  """A checkpoint written on an 8-way fsdp mesh, and its values."""
  workdir = tmp_path_factory.mktemp("fsdp8")
  c = debug_config(fsdp=8)
  state = random_state(abstract_state(c)[0], seed=7)
  ckpt = checkpoint.Checkpointer(workdir, with_data=False)
  ckpt.save(7, state, config=json.loads(c.to_json_best_effort()), meta={"tokens_seen": 5.0})
  ckpt.close()
  reference = flat_state(state)
  save_file(reference, str(workdir / "reference.safetensors"))
  return workdir, reference


def test_fsdp8_checkpoint_restores_onto_data2_fsdp4(fsdp8_run):
  workdir, reference = fsdp8_run
  abstract, _ = abstract_state(debug_config(data=2, fsdp=4))
  ckpt = checkpoint.Checkpointer(workdir, with_data=False)
  state, meta = ckpt.restore(abstract)
  ckpt.close()
  assert meta["step"] == 7 and meta["tokens_seen"] == 5.0
  got = flat_state(state)
  for name, x in reference.items():
    np.testing.assert_array_equal(got[name], x, err_msg=name)
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(abstract), strict=False):
    assert x.sharding.is_equivalent_to(s.sharding, x.ndim), (x.sharding, s.sharding)


def test_fsdp8_checkpoint_restores_onto_two_processes(fsdp8_run):
  workdir, _ = fsdp8_run
  port = portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=str(REPO))
  procs = [subprocess.Popen(
      [sys.executable, str(REPO / "tests/checkpoint/restore_worker.py"), f"--workdir={workdir}",
       f"--reference={workdir / 'reference.safetensors'}", "--mesh=data=2,fsdp=4",
       f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs, strict=False):
    assert p.returncode == 0, err[-3000:]
    assert "restored step 7 onto {'data': 2, 'fsdp': 4, 'tensor': 1, 'sequence': 1} over 2 processes" in out


def test_restore_params_reads_only_params_and_casts(fsdp8_run, monkeypatch):
  workdir, reference = fsdp8_run
  read = []
  deserialize = ocp.type_handlers.ArrayHandler.deserialize

  async def spy(self, infos, args=None):
    read.extend(str(i.name) for i in infos)
    return await deserialize(self, infos, args)

  monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "deserialize", spy)
  cfg, params = checkpoint.restore_params(workdir, dtype="bfloat16")
  names = {"/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert read and all(n.startswith("params.") for n in read), sorted(set(read))[:5]
  assert len(read) == len(names) == len([n for n in reference if n.startswith("params/")])
  assert cfg.dtype == cfg.param_dtype == "bfloat16"
  for name in names:
    x = params
    for k in name.split("/"):
      x = x[k]
    assert x.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(np.asarray(x), reference[f"params/{name}"].astype(jax.numpy.bfloat16))
  read.clear()
  _, ema = checkpoint.restore_params(workdir, step=7, ema=True)
  assert read and all(n.startswith("ema_params.") for n in read)
  np.testing.assert_array_equal(ema["embed"]["embedding"], reference["ema_params/embed/embedding"])


def test_from_pretrained_reads_a_training_workdir(fsdp8_run):
  workdir, reference = fsdp8_run
  model = api.from_pretrained(workdir, dtype="bfloat16", ema=True)
  assert model.config.dtype == "bfloat16" and model.report is None
  np.testing.assert_array_equal(np.asarray(model.params["embed"]["embedding"]),
                                reference["ema_params/embed/embedding"].astype(jax.numpy.bfloat16))
  logits = model.text_logits(np.array([[1, 2, 3]], np.int32))
  assert logits.shape == (1, 3, model.config.vocab_size) and np.isfinite(np.asarray(logits)).all()
  step_dir = api.from_pretrained(workdir / "checkpoints" / "7")
  np.testing.assert_array_equal(np.asarray(step_dir.params["embed"]["embedding"]),
                                reference["params/embed/embedding"])
  with pytest.raises(FileNotFoundError, match="no checkpoint step 3"):
    api.from_pretrained(workdir, step=3)


def test_warm_start_from_a_run_loads_params_only(fsdp8_run):
  workdir, reference = fsdp8_run
  abstract, model_cfg = abstract_state(debug_config(data=2, fsdp=4))
  fresh = random_state(abstract, seed=1)
  state, report = checkpoint.warm_start(fresh, shardings_of(abstract), str(workdir), model_cfg)
  assert report.kind == "run" and report.step == 7 and not report.initialized and not report.ignored
  got = flat_state(state)
  for name, x in got.items():
    src = reference if name.startswith(("params/", "ema_params/")) else flat_state(fresh)
    want = reference[name.replace("ema_params/", "params/")] if name.startswith("ema_params/") else src[name]
    np.testing.assert_array_equal(x, want, err_msg=name)
  assert int(state.step) == int(fresh.step)


def test_warm_start_from_hf_qwen2_loads_the_decoder():
  hf_dir = GOLDEN_DIR / "qwen2_gqa3_tied"
  hf = json.loads((hf_dir / "config.json").read_text())
  c = debug_config(data=2, fsdp=4)
  d, heads, kv = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
  c.model.update(vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["num_hidden_layers"],
                 num_heads=heads, num_kv_heads=kv, head_dim=d // heads, mlp_dim=hf["intermediate_size"],
                 tie_embeddings=True,
                 rope_theta=hf["rope_parameters"]["rope_theta"], rms_eps=hf["rms_norm_eps"])
  abstract, model_cfg = abstract_state(c)
  fresh = random_state(abstract, seed=2)
  state, report = checkpoint.warm_start(fresh, shardings_of(abstract), str(hf_dir), model_cfg)
  t = load_file(hf_dir / "model.safetensors")
  p = jax.device_get(state.params)
  hd = d // heads
  np.testing.assert_array_equal(p["embed"]["embedding"], t["model.embed_tokens.weight"])
  np.testing.assert_array_equal(p["decoder"]["final_norm"]["scale"], t["model.norm.weight"])
  for i in range(hf["num_hidden_layers"]):
    layer = jax.tree.map(lambda x, i=i: x[i], p["decoder"]["layers"])  # scanned: layers stacked first
    hf_layer = f"model.layers.{i}."
    np.testing.assert_array_equal(layer["attn"]["q"]["kernel"],
                                  t[hf_layer + "self_attn.q_proj.weight"].T.reshape(d, heads, hd))
    np.testing.assert_array_equal(layer["attn"]["k"]["bias"],
                                  t[hf_layer + "self_attn.k_proj.bias"].reshape(kv, hd))
    np.testing.assert_array_equal(layer["attn"]["o"]["kernel"],
                                  t[hf_layer + "self_attn.o_proj.weight"].T.reshape(heads, hd, d))
    np.testing.assert_array_equal(layer["mlp"]["down"]["kernel"], t[hf_layer + "mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(layer["attn_norm"]["scale"], t[hf_layer + "input_layernorm.weight"])
  # The multimodal parameters keep this run's fresh initialisation; the EMA starts at the loaded values.
  fresh_flat, got = flat_state(fresh), flat_state(state)
  assert {n.split("/")[0] for n in report.initialized} >= {"flow_head", "patch_embed", "time_embed"}
  for name in report.initialized:
    np.testing.assert_array_equal(got[f"params/{name}"], fresh_flat[f"params/{name}"], err_msg=name)
  for name in report.loaded:
    np.testing.assert_array_equal(got[f"ema_params/{name}"], got[f"params/{name}"], err_msg=name)
  assert len(report.loaded) + len(report.initialized) == len([n for n in got if n.startswith("params/")])
  assert "tensors loaded" in report.summary()
  # A model that does not match config.json fails naming the field, before anything is read.
  with pytest.raises(ValueError, match="model.hidden_size=64 but config.json gives 48"):
    checkpoint.warm_start(fresh, shardings_of(abstract), str(hf_dir),
                          dataclasses.replace(model_cfg, hidden_size=64))
