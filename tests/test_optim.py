"""Learning-rate schedules against NumPy formulas, and which parameters get weight decay."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tuna2_jax import optim

LR, END, WARMUP, TOTAL = 2e-3, 0.1, 10, 110


def _optim(schedule, **kw):
  return ml_collections.ConfigDict(dict(schedule=schedule, lr=LR, warmup_steps=WARMUP, end_lr_factor=END,
                                        decay_fraction=0.25, **kw))


def _expected(schedule, step):
  """The schedule written out: warmup 0 -> LR, then 100 steps of constant / cosine / linear / wsd."""
  if step < WARMUP:
    return LR * step / WARMUP
  s, end = step - WARMUP, LR * END
  if schedule == "constant":
    return LR
  if schedule == "cosine":
    return end + (LR - end) * 0.5 * (1 + np.cos(np.pi * min(s, 100) / 100))
  if schedule == "linear":
    return LR + (end - LR) * min(s, 100) / 100
  return LR if s < 75 else LR + (end - LR) * min(s - 75, 25) / 25  # wsd: the last quarter decays


@pytest.mark.parametrize("schedule", optim.SCHEDULES)
def test_schedule_matches_its_formula(schedule):
  fn = optim.make_schedule(_optim(schedule), TOTAL)
  steps = [0, 5, 10, 11, 40, 84, 85, 86, 95, 109, 110, 200]
  np.testing.assert_allclose([float(fn(s)) for s in steps], [_expected(schedule, s) for s in steps],
                             rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("field, value", [("schedule", "step"), ("decay_fraction", 0.0),
                                          ("decay_fraction", 1.5)])
def test_bad_schedule_field_is_named(field, value):
  o = _optim("wsd")
  o[field] = value
  with pytest.raises(ValueError, match=f"optim.{field}"):
    optim.make_schedule(o, TOTAL)


def test_weight_decay_skips_norms_biases_and_embeddings():
  params = {"layer": {"kernel": jnp.ones(2), "bias": jnp.ones(2), "norm": {"scale": jnp.ones(2)}},
            "embed": {"embedding": jnp.ones(2)}, "mask_token": jnp.ones(2)}
  mask = optim.decay_mask(params)
  assert mask == {"layer": {"kernel": True, "bias": False, "norm": {"scale": False}},
                  "embed": {"embedding": False}, "mask_token": False}
