"""Trains Tuna-2: one linear loop, read top to bottom.

  python -m tuna2_jax.train --config=configs/tuna2_tiny.py --workdir=runs/tiny
  python -m tuna2_jax.train --config=configs/tuna2_debug.py --workdir=/tmp/debug --config.train.steps=10

Sections: config checks -> mesh -> data -> model and optimizer shapes -> shardings -> step -> restore -> loop.
`loss_fn`, `train_step` and `create_train_state` are top-level pure functions so tests import them.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from tuna2_jax import checkpoint, flops, losses, optim, sequence, sharding
from tuna2_jax.model.config import ConfigError, ModelConfig
from tuna2_jax.model.tuna2 import Tuna2

# ----------------------------------------------------------------------------------------------------
# Train state


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any            # same tree and shardings as params; () when optim.ema_decay == 0
  rng: jax.Array
  bad_steps: jax.Array       # consecutive non-finite steps (the NaN guard)
  skipped_steps: jax.Array   # non-finite steps skipped in total


# ----------------------------------------------------------------------------------------------------
# Config checks: everything that can be wrong fails here, before any compile, naming the field.


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> ModelConfig:
  model_cfg = ModelConfig.from_dict(config.model.to_dict())
  dims = sharding.resolve_mesh_shape(config.mesh.shape.to_dict(), num_devices)
  sharding.rules_from_config(config.mesh.rules)
  tensor = dims["tensor"]
  # Every head count and MLP width (decoder, flow head, vision encoder) is split over the tensor axis.
  sharded = [f.name for f in dataclasses.fields(model_cfg) if f.name.endswith(("heads", "mlp_dim"))
             and (model_cfg.variant == "tuna_r" or not f.name.startswith("vision_"))]
  for field in sharded:
    if getattr(model_cfg, field) % tensor:
      raise ConfigError(f"model.{field} ({getattr(model_cfg, field)}) must be divisible by the tensor "
                        f"axis (mesh.shape.tensor={tensor})")
  data_ways = dims["data"] * dims["fsdp"]
  batch, accum = config.data.global_batch_size, config.optim.grad_accum
  if batch % data_ways:
    raise ConfigError(f"data.global_batch_size ({batch}) must be divisible by mesh data x fsdp ({data_ways})")
  if accum < 1 or batch % accum or (batch // accum) % data_ways:
    raise ConfigError(f"optim.grad_accum ({accum}) must split data.global_batch_size ({batch}) into "
                      f"micro-batches divisible by mesh data x fsdp ({data_ways})")
  if config.data.seq_len % dims["sequence"]:
    raise ConfigError(f"data.seq_len ({config.data.seq_len}) must be divisible by mesh.shape.sequence "
                      f"({dims['sequence']})")
  if jax.process_count() > 1 and batch % jax.process_count():
    raise ConfigError(f"data.global_batch_size ({batch}) must be divisible by the process count "
                      f"({jax.process_count()})")
  if config.train.steps < 1:
    raise ConfigError(f"train.steps must be >= 1, got {config.train.steps}")
  if not 0.0 <= config.optim.ema_decay < 1.0:
    raise ConfigError(f"optim.ema_decay must be in [0, 1), got {config.optim.ema_decay}")
  optim.make_schedule(config.optim, config.train.steps)  # names a bad optim.schedule / decay_fraction
  return model_cfg


# ----------------------------------------------------------------------------------------------------
# Model, optimizer and state shapes


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, np.ndarray]:
  row = sequence.empty_row(config.data.seq_len, config.model.patch_size)
  return sequence.stack_rows([row] * batch_size)


def train_state_shapes(config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh) -> tuple[Callable, TrainState, TrainState]:
  """(init(rng) -> unboxed state, abstract state, state shardings); nothing is materialised."""
  rules = sharding.rules_from_config(config.mesh.rules)
  example = jax.tree.map(jnp.asarray, dummy_batch(config))

  def init(rng):
    params_rng, state_rng = jax.random.split(rng)
    params = model.init(params_rng, example)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        ema_params=params if config.optim.ema_decay > 0 else (), rng=state_rng,
        bad_steps=jnp.zeros((), jnp.int32), skipped_steps=jnp.zeros((), jnp.int32))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda: init(jax.random.key(0)))
    shardings = sharding.logical_to_sharding(boxed, mesh, rules)
  abstract = checkpoint.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
  return (lambda rng: nn.meta.unbox(init(rng))), abstract, shardings


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh) -> tuple[TrainState, TrainState]:
  """(state, state_shardings): every leaf built under jit with its target sharding (global arrays)."""
  init, _, shardings = train_state_shapes(config, model, tx, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(config.mesh.rules)):
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(config.train.seed))
  return state, shardings


def compile_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """Ahead-of-time compile of the train step for `mesh` (which may hold abstract devices, e.g. a TPU pod
  topology on a CPU host); returns the jax `Compiled` (memory_analysis(), cost_analysis())."""
  model_cfg = validate_config(config, mesh.size)
  model = Tuna2(model_cfg)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  _, abstract, state_sh = train_state_shapes(config, model, tx, mesh)
  batch = dummy_batch(config, config.data.global_batch_size)
  batch_sh = sharding.batch_shardings(batch, mesh)
  batch_abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch.items()}
  step = jit_train_step(config, model, tx, schedule, mesh, state_sh, batch_sh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_from_config(config.mesh.rules)):
    return step.trace(abstract, batch_abstract).lower().compile()


# ----------------------------------------------------------------------------------------------------
# The step


def loss_fn(params, batch, rng, step, counts, *, model, config) -> tuple[jax.Array, dict[str, jax.Array]]:
  return losses.compute_loss(params, batch, rng, model=model, config=config, step=step, counts=counts)


def _micro_batches(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...] taking rows j, j+k, ... into micro-batch j, so each micro-batch keeps the
  batch sharding spread over all devices."""
  return {n: jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0) for n, x in batch.items()}


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optax.Schedule, config: ml_collections.ConfigDict
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step over the global batch, accumulated over `optim.grad_accum` micro-batches."""
  rng, step_rng = jax.random.split(state.rng)
  step_rng = jax.random.fold_in(step_rng, state.step)
  counts = losses.term_counts(batch, config)  # global normalisers: accumulation is exact
  grad_fn = jax.value_and_grad(
      functools.partial(loss_fn, model=model, config=config), has_aux=True)
  # One key per row: a row's noise and masks depend on (step, row) only, so every mesh and every
  # accumulation split sees the same randomness.
  row_keys = jax.random.split(step_rng, batch["tokens"].shape[0])
  k = config.optim.grad_accum
  if k == 1:
    (_, metrics), grads = grad_fn(state.params, batch, row_keys, state.step, counts)
  else:
    def accumulate(carry, xs):
      grads_acc, metrics_acc = carry
      micro, keys = xs
      (_, m), g = grad_fn(state.params, micro, keys, state.step, counts)
      return (jax.tree.map(jnp.add, grads_acc, g), jax.tree.map(jnp.add, metrics_acc, m)), None

    micro = _micro_batches(dict(batch, _keys=row_keys), k)
    micro_keys = micro.pop("_keys")
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    m_shape = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro),
                                             micro_keys[0], state.step, counts)[0][1])
    m_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
    (grads, metrics), _ = jax.lax.scan(accumulate, (zeros, m_zeros), (micro, micro_keys))
    # Per-micro-batch terms are partial sums over global counts, so their sum is exact; counts are global.
    metrics = {n: (counts[n[:-len("_count")]] if n.endswith("_count") else v) for n, v in metrics.items()}

  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  params, opt_state = keep(new_params, state.params), keep(new_opt_state, state.opt_state)
  ema = state.ema_params
  if config.optim.ema_decay > 0:
    # Warm-started decay (as in big_vision / timm): the EMA tracks closely early, then settles at ema_decay.
    step_f = state.step.astype(jnp.float32)
    decay = jnp.minimum(config.optim.ema_decay, (1.0 + step_f) / (10.0 + step_f))
    ema = keep(optax.incremental_update(params, ema, 1.0 - decay), ema)
  new_state = TrainState(
      step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, rng=rng,
      bad_steps=jnp.where(ok, 0, state.bad_steps + 1),
      skipped_steps=state.skipped_steps + (~ok).astype(jnp.int32))
  metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step), skipped=(~ok).astype(jnp.float32))
  return new_state, metrics


def jit_train_step(config, model, tx, schedule, mesh, state_shardings, batch_shardings) -> Callable:
  step_fn = functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------------
# Host side: batches onto the mesh, preemption, multi-host start-up


def global_batch(local: Mapping[str, np.ndarray], shardings: Mapping[str, jax.sharding.NamedSharding]
                 ) -> dict[str, jax.Array]:
  """Per-process numpy rows -> global jax arrays laid out by `shardings`."""
  return {k: jax.make_array_from_process_local_data(s, np.asarray(local[k])) for k, s in shardings.items()}


class PreemptionFlag:
  """SIGTERM / SIGINT ask the loop to save at the next step boundary and exit cleanly.

  One process: Python handlers set a flag. Several processes: JAX's preemption service (started by
  jax.distributed.initialize; it catches SIGTERM on any host) picks a step every process reaches, so all save
  the same step; SIGINT is forwarded to it as SIGTERM.
  """

  def __init__(self):
    self.requested = False
    self._previous = {}
    self._service = jax.process_count() > 1 and _preemption_service_running()
    if jax.process_count() > 1 and not self._service:
      logging.warning("no JAX preemption service: a signal reaching only some processes cannot stop all")
    for sig in (signal.SIGINT,) if self._service else (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. under some test runners)
        pass

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d: saving at the next step boundary, then exiting", signum)
    if self._service:
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self.requested = True

  def reached(self, step: int) -> bool:
    """True at the step boundary where every process saves and stops; call once per step."""
    if self._service:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _preemption_service_running() -> bool:
  from jax._src import distributed  # noqa: PLC0415  (no public query for it)
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


def initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Explicit coordinator flags or JAX_* variables (local multi-process runs, GKE GPU pods), else
  auto-detection (TPU VMs, also when reached over ssh without TPU_* variables; SLURM)."""
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
  process_id = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
  if coordinator and num_processes:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return
  on_tpu_vm = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
  cluster_vars = ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "MEGASCALE_COORDINATOR_ADDRESS")
  cluster = any(v in os.environ for v in cluster_vars)
  if (on_tpu_vm or cluster) and int(os.environ.get("SLURM_NTASKS", "2")) > 1:
    jax.distributed.initialize()


def step_throughput(model_cfg: ModelConfig, batch: Mapping[str, np.ndarray], seconds: float,
                    device_kind: str, num_devices: int) -> dict[str, float]:
  """tokens/s, images/s and (where the chip's peak is known) MFU of one step."""
  tokens = float(np.sum(batch["segment_ids"] > 0))
  images = float(len(np.unique(batch["image_ids"][batch["image_ids"] > 0]))) if "image_ids" in batch else 0.0
  out = {"tokens_per_s": tokens / seconds, "images_per_s": images / seconds, "step_time": seconds}
  peak = flops.peak_flops(device_kind)
  if peak:
    out["mfu"] = flops.train_flops(model_cfg, batch) / seconds / (peak * num_devices)
  return out


# ----------------------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       batches: Iterator[Mapping[str, np.ndarray]] | None = None) -> dict[str, float]:
  """Trains to config.train.steps (resuming from the workdir's latest checkpoint); returns the last metrics.

  `batches` overrides the Grain pipeline with per-process numpy batches (tests, custom data).
  """
  from tuna2_jax.metric_writer import MetricWriter  # noqa: PLC0415

  # --- config and mesh
  model_cfg = validate_config(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh.shape.to_dict())
  rules = sharding.rules_from_config(config.mesh.rules)
  is_main = jax.process_index() == 0
  logging.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # --- data
  data_iter = batches
  if data_iter is None:
    from tuna2_jax.input import pipeline  # noqa: PLC0415  (the trainer runs without Grain when fed batches)
    data_iter = pipeline.make_train_iterator(config, process_index=jax.process_index(),
                                             process_count=jax.process_count())

  # --- model, optimizer, state and shardings
  model = Tuna2(model_cfg)
  tx, schedule = optim.make_optimizer(config.optim, config.train.steps)
  state, state_shardings = create_train_state(config, model, tx, mesh)
  batch_shardings = sharding.batch_shardings(dummy_batch(config), mesh)
  step_fn = jit_train_step(config, model, tx, schedule, mesh, state_shardings, batch_shardings)

  # --- restore: this workdir's latest intact checkpoint (data position included), else a warm start
  ckpt = checkpoint.Checkpointer.from_config(workdir, config.checkpoint, with_data=batches is None)
  resumed: dict[str, float] = {}  # tokens / images seen before this process started
  if ckpt.latest_step() is not None:
    abstract = checkpoint.abstract_with_shardings(state, state_shardings)
    del state  # free the fresh initialisation first: peak memory stays one train state
    state, resumed = ckpt.restore(abstract, data_iter=data_iter if batches is None else None)
  elif config.checkpoint.init_from:  # parameters only (another run, or HF Qwen2 weights into the decoder)
    state, report = checkpoint.warm_start(state, state_shardings, config.checkpoint.init_from, model_cfg)
    if is_main:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, "warm_start.json"), "w") as f:
        f.write(report.to_json())
  start = int(state.step)
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # --- loop
  writer = MetricWriter(workdir, total_steps=config.train.steps, enabled=is_main)
  preempt = PreemptionFlag()
  device_kind, n_dev = jax.devices()[0].device_kind, jax.device_count()
  log_every, ckpt_every = max(1, config.train.log_every), config.checkpoint.every
  max_bad = config.train.get("max_bad_steps", 5)
  pending = None  # (step, device metrics, host stats): logged one step late so the host never waits
  last: dict[str, float] = {}
  meta = {"tokens_seen": 0.0, "images_seen": 0.0}

  resolved_config = json.loads(config.to_json_best_effort())

  def save(step: int):
    seen = {k: float(resumed.get(k, 0.0)) + v for k, v in meta.items()}
    ckpt.save(step, state, data_iter=data_iter if batches is None else None, config=resolved_config,
              meta=dict(seen, wall_time=time.time(), process_count=jax.process_count()))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for step in range(start, config.train.steps):
      local = next(data_iter)
      t0 = time.time()
      state, metrics = step_fn(state, global_batch(local, batch_shardings))
      if pending is not None:
        last = _finish_log(pending, writer, model_cfg, device_kind, n_dev)
      host = {k: local[k] for k in ("segment_ids", "attn_end", "positions", "modality", "image_ids")}
      meta["tokens_seen"] += float(np.sum(local["segment_ids"] > 0)) * jax.process_count()
      pending = (step + 1, metrics, host, t0) if (step + 1) % log_every == 0 else None
      done = step + 1
      if int(state.bad_steps) >= max_bad:  # the NaN guard: stop with the last good checkpoint intact
        ckpt.close()
        writer.close()
        raise FloatingPointError(f"{max_bad} consecutive non-finite steps ending at step {done}; the last "
                                 f"good checkpoint is step {ckpt.latest_step()}")
      meta["images_seen"] += float(np.sum(local["modality"] == 2)) * jax.process_count()  # one TIME slot each
      preempted = preempt.reached(done)  # every process agrees on the step
      if preempted or (ckpt_every and done % ckpt_every == 0) or done == config.train.steps:
        save(done)
      if preempted:
        logging.warning("preempted: saved step %d", done)
        break
      if config.eval.get("every", 0) and done % config.eval.every == 0:  # periodic eval on a subset
        from tuna2_jax import evaluate  # noqa: PLC0415  (Grain / TFDS only when evaluating)
        evaluate.periodic_eval(config, state.ema_params if config.optim.ema_decay > 0 else state.params,
                               model_cfg, workdir, done, writer)
    if pending is not None:
      last = _finish_log(pending, writer, model_cfg, device_kind, n_dev)
  preempt.restore()
  ckpt.close()
  writer.close()
  return last


def _finish_log(pending, writer, model_cfg, device_kind, n_dev) -> dict[str, float]:
  step, metrics, host, t0 = pending
  scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
  scalars.update(step_throughput(model_cfg, host, time.time() - t0, device_kind, n_dev))
  writer.write_scalars(step, scalars)
  writer.log_line(step, scalars)
  return scalars


# ----------------------------------------------------------------------------------------------------
# Entry point

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and logs go.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (local multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in a local multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's id in a local multi-process run.")


def main(argv):
  del argv
  initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
