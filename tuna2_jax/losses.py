"""Training objectives on the packed batch: next-token cross-entropy (and, with the flow head, the
pixel-space flow loss). Sums and counts are returned separately so micro-batches and hosts reduce exactly."""

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


def compute_loss(params, batch: Mapping[str, jax.Array], rng: jax.Array, *, model, config
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training objective: returns (scalar loss, metrics). `config` is the run's ConfigDict."""
  del rng
  out = model.apply({"params": params}, batch)
  ce_sum, n_tokens = text_cross_entropy(out.logits, batch["tokens"], batch["text_loss"])
  text_loss = ce_sum / jnp.maximum(n_tokens, 1.0)
  loss = config.train.text_loss_weight * text_loss
  return loss, {"loss": loss, "text_loss": text_loss, "text_tokens": n_tokens}
