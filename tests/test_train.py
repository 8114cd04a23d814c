"""The train step: identical on every mesh, exact gradient accumulation, learning, the NaN guard."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import tuna2_debug
from tests.helpers import random_batch
from tuna2_jax import optim, sharding, train
from tuna2_jax.model.tuna2 import Tuna2


def debug_config(**mesh):
  c = tuna2_debug.get_config()
  c.data.global_batch_size, c.data.seq_len = 8, 96
  # 8 query and 8 KV heads so that an 8-way tensor axis divides them.
  c.model.update(num_heads=8, num_kv_heads=8, head_dim=8, patch_size=4, flow_heads=8, flow_kv_heads=8,
                 flow_head_dim=8)
  c.optim.update(lr=3e-3, warmup_steps=0, schedule="constant")
  c.mesh.shape.update(dict(dict(data=1, fsdp=1, tensor=1, sequence=1), **mesh))
  return c


def batches(c, n, seed=0):
  return [random_batch(seed + i, batch_size=c.data.global_batch_size, seq_len=c.data.seq_len,
                       patch_size=c.model.patch_size, vocab=c.model.vocab_size) for i in range(n)]


def run_steps(c, data, *, every_state=False):
  n = int(np.prod(list(c.mesh.shape.to_dict().values())))
  model_cfg = train.validate_config(c, n)
  mesh = sharding.make_mesh(c.mesh.shape.to_dict(), jax.devices()[:n])
  model = Tuna2(model_cfg)
  tx, schedule = optim.make_optimizer(c.optim, c.train.steps)
  state, state_sh = train.create_train_state(c, model, tx, mesh)
  batch_sh = sharding.batch_shardings(train.dummy_batch(c), mesh)
  step = train.jit_train_step(c, model, tx, schedule, mesh, state_sh, batch_sh)
  metrics, states = [], [jax.device_get(state)] if every_state else []
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(c.mesh.rules)):
    for b in data:
      state, m = step(state, train.global_batch(b, batch_sh))
      metrics.append(jax.device_get(m))
      if every_state:
        states.append(jax.device_get(state))
  return (states if every_state else jax.device_get(state)), metrics


@pytest.fixture(scope="module")
def single_device_run():
  c = debug_config()
  return run_steps(c, batches(c, 3))


@pytest.mark.parametrize("mesh", [dict(data=8), dict(data=2, fsdp=4), dict(data=2, fsdp=2, tensor=2),
                                  dict(tensor=8), dict(data=2, sequence=4)], ids=str)
def test_losses_identical_on_every_mesh(single_device_run, mesh):
  c = debug_config(**mesh)
  if mesh.get("sequence", 1) > 1:
    c.model.attention = "ring"     # context parallelism over the sequence axis
  _, metrics = run_steps(c, batches(c, 3))
  want = [m["loss"] for m in single_device_run[1]]
  np.testing.assert_allclose([m["loss"] for m in metrics], want, rtol=2e-6)
  assert len({float(w) for w in want}) == 3     # the steps really update (no constant loss)


def test_gradient_accumulation_equals_one_big_step():
  c = debug_config(data=2)
  data = batches(c, 2)
  state_one, m_one = run_steps(c, data)
  c.optim.grad_accum = 4
  state_acc, m_acc = run_steps(c, data)
  for a, b in zip(m_one, m_acc):
    for k in ("loss", "text_loss", "text_count", "grad_norm"):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=k)
  # Summation order differs, and Adam divides by sqrt(v): allow 1e-5, i.e. 0.3% of one lr step.
  for x, y in zip(jax.tree.leaves(state_one.params), jax.tree.leaves(state_acc.params)):
    np.testing.assert_allclose(y, x, atol=1e-5)


def test_ema_follows_the_warmed_up_decay():
  c = debug_config()
  c.optim.ema_decay = 0.5
  states, _ = run_steps(c, batches(c, 2), every_state=True)
  ema = states[0].params
  for t, state in enumerate(states[1:]):
    decay = min(0.5, (1 + t) / (10 + t))
    ema = jax.tree.map(lambda e, p, d=decay: d * e + (1 - d) * p, ema, state.params)
    for want, got in zip(jax.tree.leaves(ema), jax.tree.leaves(state.ema_params)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_debug_loss_decreases_on_a_fixed_batch():
  c = debug_config()
  _, metrics = run_steps(c, batches(c, 1) * 25)
  losses = [m["loss"] for m in metrics]
  assert losses[-1] < 0.6 * losses[0], losses


def test_nan_guard_skips_a_poisoned_step():
  c = debug_config()
  good = batches(c, 2)
  poisoned = dict(good[0], text_loss=np.full_like(good[0]["text_loss"], np.nan))
  initial, _ = run_steps(c, [])
  skipped, m_skip = run_steps(c, [poisoned])
  assert m_skip[0]["skipped"] == 1.0 and int(skipped.skipped_steps) == 1 and int(skipped.bad_steps) == 1
  for x, y in zip(jax.tree.leaves((initial.params, initial.opt_state)),
                  jax.tree.leaves((skipped.params, skipped.opt_state))):
    np.testing.assert_array_equal(x, y)
  state, metrics = run_steps(c, [poisoned, good[1]])
  assert metrics[1]["skipped"] == 0.0 and np.isfinite(metrics[1]["loss"])
  assert int(state.bad_steps) == 0 and int(state.step) == 2
  assert any((x != y).any() for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(initial.params)))


def test_train_loop_writes_metrics_and_stops_on_repeated_nans(tmp_path):
  c = debug_config(data=-1)
  c.train.steps, c.train.log_every, c.checkpoint.every = 4, 1, 2
  data = iter(batches(c, 4))
  last = train.train_and_evaluate(c, str(tmp_path), batches=data)
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert {"loss", "text_loss", "grad_norm", "lr", "tokens_per_s"} <= set(rows[0])
  assert last["loss"] == rows[-1]["loss"]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]

  c.train.steps, c.train.max_bad_steps = 10, 2
  nan = dict(batches(c, 1)[0], text_loss=np.full((8, 96), np.nan, np.float32))
  with pytest.raises(FloatingPointError, match="last good checkpoint is step 4"):
    train.train_and_evaluate(c, str(tmp_path), batches=iter([nan] * 6))
