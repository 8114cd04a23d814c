"""Training objectives on the packed batch.

Each term is a (sum, count) pair; the loss is sum_k w_k * sum_k / count_k with counts taken over the whole
global batch (`term_counts`), so k micro-batches of gradient accumulation equal one step on their
concatenation exactly, and rows without a term (no text, no images) contribute nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax


def text_cross_entropy(logits: jax.Array, tokens: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted next-token CE, sum of weights). logits [B, L, V] predict tokens shifted by one."""
  targets = jnp.roll(tokens, -1, axis=-1)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(ce * weights), jnp.sum(weights)


def term_counts(batch: Mapping[str, jax.Array], config) -> dict[str, jax.Array]:
  """The normaliser of every loss term, from the batch alone (no model call)."""
  del config
  return {"text": jnp.sum(batch["text_loss"])}


def loss_terms(params, batch: Mapping[str, jax.Array], rng: jax.Array, *, model, config,
               step: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
  """{term: (sum, count)} for one (micro-)batch."""
  del rng, step, config
  out = model.apply({"params": params}, batch)
  return {"text": text_cross_entropy(out.logits, batch["tokens"], batch["text_loss"])}


def compute_loss(params, batch: Mapping[str, jax.Array], rng: jax.Array, *, model, config, step: jax.Array,
                 counts: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(scalar loss, metrics). `counts` are the global-batch normalisers; default: this batch's own."""
  terms = loss_terms(params, batch, rng, model=model, config=config, step=step)
  counts = counts if counts is not None else {k: c for k, (_, c) in terms.items()}
  weights = {"text": config.train.text_loss_weight}
  loss, metrics = 0.0, {}
  for name, (total, _) in terms.items():
    value = total / jnp.maximum(counts[name], 1.0)
    loss = loss + weights[name] * value
    metrics[f"{name}_loss"] = value
    metrics[f"{name}_count"] = counts[name]
  metrics["loss"] = loss
  return loss, metrics
