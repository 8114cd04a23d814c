"""Training objectives on the packed batch: w_text * text CE + w_flow * flow v-loss.

Each term is a (sum, count) pair; the loss is sum_k w_k * sum_k / count_k with counts taken over the whole
global batch (`term_counts`), so k micro-batches of gradient accumulation equal one step on their
concatenation exactly, and rows without a term (no text, no images) contribute nothing.
Text counts trained next-token positions; flow counts generation-target patches (every patch has p*p*3
pixels, so the flow term is the release's mean over target pixel elements).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from tuna2_jax import flow, sequence


def text_cross_entropy(logits: jax.Array, tokens: jax.Array,
                       weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted next-token CE, sum of weights). logits [B, L, V] predict tokens shifted by one."""
  targets = jnp.roll(tokens, -1, axis=-1)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(ce * weights), jnp.sum(weights)


def flow_targets(batch: Mapping[str, jax.Array]) -> jax.Array:
  """bool [B, L]: the patches the flow loss covers (all patches of generation targets, masked or not)."""
  return (batch["modality"] == sequence.PATCH) & (batch["image_role"] == sequence.GENERATE)


def term_counts(batch: Mapping[str, jax.Array], config) -> dict[str, jax.Array]:
  """The normaliser of every loss term, from the batch alone (no model call)."""
  del config
  return {"text": jnp.sum(batch["text_loss"]),
          "flow": jnp.sum(flow_targets(batch).astype(jnp.float32))}


def model_inputs(batch: Mapping[str, jax.Array], rng: jax.Array, *, config,
                 step: jax.Array) -> tuple[flow.FlowInputs, jax.Array]:
  """(noised pixels, per-span t, clean targets; patch mask) for one training (micro-)batch.

  `rng` is one key, or one key per row [B]: the trainer passes per-row keys so that the noise a row gets
  depends on (step, row) only, not on the mesh or on how rows are split into micro-batches.
  """
  if rng.ndim == 1:
    def one_row(key, row):
      out = model_inputs(jax.tree.map(lambda x: x[None], row), key, config=config, step=step)
      return jax.tree.map(lambda x: x[0], out)
    return jax.vmap(one_row)(rng, dict(batch))
  tc = config.train
  k_flow, k_mask = jax.random.split(rng)
  inputs = flow.prepare_flow_inputs(k_flow, batch, p_mean=tc.flow_p_mean, p_std=tc.flow_p_std,
                                    noise_scale=tc.noise_scale, und_noise_prob=tc.und_noise_prob,
                                    und_noise_max=tc.und_noise_max)
  active = flow.masking_active(step, tc.steps, tc.mask_last_fraction)
  mask = flow.sample_patch_mask(k_mask, batch, prob=tc.mask_prob, ratio_min=tc.mask_ratio_min,
                                ratio_max=tc.mask_ratio_max, active=active)
  return inputs, mask


def loss_terms(params, batch: Mapping[str, jax.Array], rng: jax.Array, *, model, config,
               step: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{term: (sum, count)} for one (micro-)batch."""
  inputs, mask = model_inputs(batch, rng, config=config, step=step)
  out = model.apply({"params": params}, batch, pixels=inputs.pixels, t=inputs.t, patch_mask=mask)
  return {"text": text_cross_entropy(out.logits, batch["tokens"], batch["text_loss"]),
          "flow": flow.v_loss(out.x_pred, inputs.target, inputs.t, inputs.loss_mask, config.train.t_eps)}


def compute_loss(params, batch: Mapping[str, jax.Array], rng: jax.Array, *, model, config, step: jax.Array,
                 counts: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(scalar loss, metrics). `counts` are the global-batch normalisers; default: this batch's own."""
  terms = loss_terms(params, batch, rng, model=model, config=config, step=step)
  counts = counts if counts is not None else {k: c for k, (_, c) in terms.items()}
  weights = {"text": config.train.text_loss_weight, "flow": config.train.flow_loss_weight}
  loss, metrics = 0.0, {}
  for name, (total, _) in terms.items():
    value = total / jnp.maximum(counts[name], 1.0)
    loss = loss + weights[name] * value
    metrics[f"{name}_loss"] = value
    metrics[f"{name}_count"] = counts[name]
  metrics["loss"] = loss
  return loss, metrics
