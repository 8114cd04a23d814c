"""Flow matching in pixel space (JiT: x-prediction, v-loss), ODE samplers, CFG, and patch masking.

Convention (tuna2.md §2, JiT): t = 1 is clean data, t = 0 pure noise; z_t = t x + (1 - t) eps with
eps ~ N(0, noise_scale^2); the model predicts x̂ and v̂ = (x̂ - z_t) / max(1 - t, t_eps). The loss is
|v̂ - v|^2 = |x̂ - x|^2 / max(1 - t, t_eps)^2 over the pixels of generation-target patches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import flax
import jax
import jax.numpy as jnp

from tuna2_jax import sequence
from tuna2_jax.model.patch_embed import normalize_pixels

# The release's masking form (every example draws r ~ U(-0.7, 0.3): 70% unmasked), from the first step.
MASKING_PRESETS = {
    "paper": dict(mask_last_fraction=0.4, mask_prob=0.5, mask_ratio_min=0.0, mask_ratio_max=0.5),
    "release": dict(mask_last_fraction=1.0, mask_prob=1.0, mask_ratio_min=-0.7, mask_ratio_max=0.3),
    "none": dict(mask_last_fraction=0.0, mask_prob=0.0, mask_ratio_min=0.0, mask_ratio_max=0.0),
}


# ----------------------------------------------------------------------------------------------------
# Objective.


def sample_t(rng: jax.Array, shape: tuple[int, ...], p_mean: float = -0.8, p_std: float = 0.8) -> jax.Array:
  """t = sigmoid(z), z ~ N(p_mean, p_std^2) (JiT's logit-normal, biased to noisy t: median ~0.31)."""
  return jax.nn.sigmoid(p_mean + p_std * jax.random.normal(rng, shape, jnp.float32))


def noise(x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """z_t = t x + (1 - t) eps; t broadcasts over the trailing pixel axis."""
  t = t[..., None]
  return t * x + (1.0 - t) * eps


def x_to_v(x_pred: jax.Array, z: jax.Array, t: jax.Array, t_eps: float = 0.05) -> jax.Array:
  """Velocity implied by an x-prediction, with the clamp 1 - t >= t_eps (training and sampling alike)."""
  return (x_pred - z) / jnp.maximum(1.0 - t, t_eps)[..., None]


def v_loss(x_pred: jax.Array, x: jax.Array, t: jax.Array, mask: jax.Array,
           t_eps: float = 0.05) -> tuple[jax.Array, jax.Array]:
  """(sum over masked patches of the per-patch mean |x̂ - x|^2 / max(1 - t, t_eps)^2, number of patches).

  Every patch has p*p*3 pixels, so sum / count is the release's mean over valid pixel elements.
  """
  w = 1.0 / jnp.square(jnp.maximum(1.0 - t, t_eps))
  per_patch = jnp.mean(jnp.square(x_pred.astype(jnp.float32) - x), axis=-1) * w
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_patch * mask), jnp.sum(mask)


@flax.struct.dataclass
class FlowInputs:
  pixels: jax.Array   # [B, L, P] model input: z_t at noised patches, clean x elsewhere
  t: jax.Array        # [B, L] one t per image span (TIME + patches), 1 elsewhere
  target: jax.Array   # [B, L, P] clean x in [-1, 1]
  loss_mask: jax.Array  # [B, L] bool: generation-target patches


def per_image(values: jax.Array, image_ids: jax.Array) -> jax.Array:
  """values [B, L + 1] indexed by image id -> [B, L] (id 0 reads values[:, 0])."""
  return jnp.take_along_axis(values, image_ids, axis=1)


def prepare_flow_inputs(rng: jax.Array, batch: Mapping[str, jax.Array], *, p_mean: float = -0.8,
                        p_std: float = 0.8, noise_scale: float = 2.0, und_noise_prob: float = 0.0,
                        und_noise_max: float = 0.1) -> FlowInputs:
  """Per generation image t ~ logit-N, noised patches; understanding images t = 1, except with probability
  `und_noise_prob` t = 1 - U(0, und_noise_max) (the release's small-noise augmentation, input only)."""
  b, length = batch["tokens"].shape
  k_t, k_aug, k_amt, k_eps = jax.random.split(rng, 4)
  ids, role, modality = batch["image_ids"], batch["image_role"], batch["modality"]
  t_gen = per_image(sample_t(k_t, (b, length + 1), p_mean, p_std), ids)
  aug = per_image(jax.random.bernoulli(k_aug, und_noise_prob, (b, length + 1)), ids)
  amount = und_noise_max * per_image(jax.random.uniform(k_amt, (b, length + 1)), ids)
  t_und = jnp.where(aug, 1.0 - amount, 1.0)
  t = jnp.where(role == sequence.GENERATE, t_gen, jnp.where(role == sequence.UNDERSTAND, t_und, 1.0))
  x = normalize_pixels(batch["patches"])
  eps = noise_scale * jax.random.normal(k_eps, x.shape, jnp.float32)
  is_patch = modality == sequence.PATCH
  pixels = jnp.where((is_patch & (t < 1.0))[..., None], noise(x, eps, t), x)
  return FlowInputs(pixels=pixels, t=t, target=x, loss_mask=is_patch & (role == sequence.GENERATE))


# ----------------------------------------------------------------------------------------------------
# Masked visual feature learning.


def masking_active(step: jax.Array, total_steps: int, last_fraction: float) -> jax.Array:
  """True in the last `last_fraction` of training."""
  return jnp.asarray(step) >= jnp.floor((1.0 - last_fraction) * total_steps)


def sample_patch_mask(rng: jax.Array, batch: Mapping[str, jax.Array], *, prob: float, ratio_min: float,
                      ratio_max: float, active: jax.Array | bool = True) -> jax.Array:
  """bool [B, L]: patches to replace by the mask token.

  Each document (segment) is masked with probability `prob` at a ratio r ~ U(ratio_min, ratio_max); every
  image of a masked document (any role) then loses floor(N r) of its N patches, chosen uniformly without
  replacement (none when r <= 0: the release's U(-0.7, 0.3) form leaves 70% of documents unmasked).
  """
  b, l = batch["tokens"].shape  # noqa: E741
  k_doc, k_ratio, k_rank = jax.random.split(rng, 3)
  seg, modality, attn_end, positions = (batch["segment_ids"], batch["modality"], batch["attn_end"],
                                        batch["positions"])
  chosen = per_image(jax.random.bernoulli(k_doc, prob, (b, l + 1)), seg)
  ratio = per_image(jax.random.uniform(k_ratio, (b, l + 1), minval=ratio_min, maxval=ratio_max), seg)
  is_patch = modality == sequence.PATCH
  # Patches of an image are contiguous and end at attn_end, whose (row, col) give the grid size N.
  last = jnp.clip(attn_end, 0, l - 1)
  n = ((jnp.take_along_axis(positions[:, 1], last, 1) + 1)
       * (jnp.take_along_axis(positions[:, 2], last, 1) + 1))
  n_mask = jnp.floor(n * jnp.maximum(ratio, 0.0)).astype(jnp.int32)
  # Rank of each patch inside its image under random scores: sort by (image order, score).
  image_key = jnp.where(is_patch, last, l).astype(jnp.float32)
  order = jnp.argsort(image_key + jax.random.uniform(k_rank, (b, l), maxval=0.5), axis=1)
  rank = jnp.argsort(order, axis=1)
  patches_before = jnp.cumsum(is_patch, axis=1) - is_patch
  first = last - n + 1
  rank_in_image = rank - jnp.take_along_axis(patches_before, jnp.clip(first, 0, l - 1), 1)
  return is_patch & chosen & (rank_in_image < n_mask) & jnp.asarray(active)


# ----------------------------------------------------------------------------------------------------
# Sampling: ODE from t = 0 (noise) to t = 1 (data), CFG on x̂.


def time_grid(steps: int, shift: float = 1.0) -> jax.Array:
  """steps + 1 times from 0 to 1, uniform, optionally shifted toward noise (SD3's shift on 1 - t).

  shift s maps the noise level sigma = 1 - t to s sigma / (1 + (s - 1) sigma); s = 1 is the identity
  (the release's Euler grid: linspace(0, 1, 51) for 50 steps).
  """
  t = jnp.linspace(0.0, 1.0, steps + 1)
  sigma = 1.0 - t
  return 1.0 - shift * sigma / (1.0 + (shift - 1.0) * sigma)


def guide(x_cond: jax.Array, x_uncond: jax.Array, scale: float, t: jax.Array,
          interval: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
  """x̂ = x̂_u + w (x̂_c - x̂_u), w = scale inside the t interval, else 1 (conditional only)."""
  w = jnp.where((t >= interval[0]) & (t <= interval[1]), scale, 1.0)
  return x_uncond + w * (x_cond - x_uncond)


def sample_ode(x_pred_fn: Callable[[jax.Array, jax.Array], jax.Array], z0: jax.Array, *, steps: int = 50,
               sampler: str = "euler", shift: float = 1.0, t_eps: float = 0.05) -> jax.Array:
  """Integrates dz/dt = v(z, t) from z0 (noise) at t = 0 to t = 1; x_pred_fn(z, t) -> x̂ (any shape).

  euler: z += dt v(z, t) (the release, 50 steps). heun: the trapezoid of v at both ends, except an Euler
  last step so t = 1 is never queried (JiT); about 2 steps - 1 model calls.
  """
  if sampler not in ("euler", "heun"):
    raise ValueError(f"sampler {sampler!r} not in ('euler', 'heun')")
  grid = time_grid(steps, shift)
  v = lambda z, t: x_to_v(x_pred_fn(z, t), z, jnp.broadcast_to(t, z.shape[:-1]), t_eps)

  def euler(z, i):
    t, t_next = grid[i], grid[i + 1]
    return z + (t_next - t) * v(z, t), None

  def heun(z, i):
    t, t_next = grid[i], grid[i + 1]
    v1 = v(z, t)
    v2 = v(z + (t_next - t) * v1, t_next)
    return z + (t_next - t) * 0.5 * (v1 + v2), None

  if sampler == "euler":
    z, _ = jax.lax.scan(euler, z0, jnp.arange(steps))
    return z
  z, _ = jax.lax.scan(heun, z0, jnp.arange(steps - 1))
  return euler(z, steps - 1)[0]
