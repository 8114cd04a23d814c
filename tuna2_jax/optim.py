"""Optimizer: optax AdamW with global-norm clipping, a warmup + decay schedule, and decay masking.

Defaults follow the release: betas (0.9, 0.95), eps 1e-8, weight decay 0.01, clip 1.0.
"""

from __future__ import annotations

import jax
import optax

SCHEDULES = ("constant", "cosine", "linear", "wsd")
# Parameters that never get weight decay: norms, biases, embeddings, learned tokens.
NO_DECAY = ("scale", "bias", "embedding", "mask_token", "pos_embedding")


def make_schedule(optim, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to optim.lr, then constant, cosine or linear decay to optim.end_lr_factor * lr.

  "wsd" (warmup-stable-decay) holds optim.lr and decays linearly over the last optim.decay_fraction of the
  steps after warmup: a short run spends longer at the peak, where skills leave their plateaus sooner.
  """
  if optim.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule={optim.schedule!r} not in {SCHEDULES}")
  fraction = optim.get("decay_fraction", 0.2)
  if not 0 < fraction <= 1:
    raise ValueError(f"optim.decay_fraction={fraction} must be in (0, 1]")
  warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
  end = optim.lr * optim.get("end_lr_factor", 0.0)
  decay_steps = max(total_steps - warmup, 1)
  if optim.schedule == "constant":
    after = optax.constant_schedule(optim.lr)
  elif optim.schedule == "cosine":
    after = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=end / optim.lr if optim.lr else 0.0)
  elif optim.schedule == "linear":
    after = optax.linear_schedule(optim.lr, end, decay_steps)
  else:
    decay = max(round(decay_steps * fraction), 1)
    stable, cooldown = optax.constant_schedule(optim.lr), optax.linear_schedule(optim.lr, end, decay)
    after = optax.join_schedules([stable, cooldown], [decay_steps - decay])
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def decay_mask(params):
  """True for weight matrices; False for NO_DECAY leaves (matched by their last dict key)."""
  def keep(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return not (names and names[-1] in NO_DECAY)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(optim, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                  mask=decay_mask),
  )
  return tx, schedule
