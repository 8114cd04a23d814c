"""Orbax checkpointing: train state + Grain iterator state + resolved config + metadata, per step.

  workdir/checkpoints/<step>/
    state/     the TrainState (OCDBT, one file set per process)   data/    Grain iterator state per process
    config/    the resolved run config (JSON)                     meta/    step, tokens/images seen, wall time
    tuna2_files.json   file sizes and value checksums (written once the step is final; checked on restore)

Saves are async: the loop blocks only while device arrays are copied to host memory. Orbax writes each step
into a temporary directory and renames it when complete, so an interrupted or failing save never shows up as a
step and never touches the previous ones. A step whose files no longer match its manifest, or that fails to
read, is moved aside to `checkpoints/corrupt.<step>` with a warning and the previous step is used.

  ckpt = Checkpointer(workdir, keep=3, keep_every=1000)
  ckpt.save(step, state, data_iter=it, config=config_json, meta={"tokens_seen": n})
  state, meta = ckpt.restore(abstract_with_shardings(state, shardings), data_iter=it)   # any mesh
  model_cfg, params = restore_params(workdir, dtype="bfloat16")                          # no optimizer read

Fault injection for the tests: TUNA2_CHECKPOINT_FAULT=stop_after_save:<step> stops the process (SIGSTOP) once
that step is committed, stop_in_save:<step> while its async write is in flight; the test then kill -9s it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from tuna2_jax.convert import hf_qwen2
from tuna2_jax.model.config import ModelConfig

MANIFEST = "tuna2_files.json"
FAULT_ENV = "TUNA2_CHECKPOINT_FAULT"
_ITEMS = ("state", "meta", "config", "data")


class CorruptCheckpointError(RuntimeError):
  """A step whose files are missing, truncated or unreadable; the message names the step and the file."""


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _is_primary() -> bool:
  return jax.process_index() == 0


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------------
# Manifests: the size of every file of a finished step and checksums of its array values. Orbax's atomic
# rename guarantees a step was complete when written; the manifest catches what happens to it afterwards: a
# truncated copy, a lost file, or garbage inside a data file, which the storage layer may decode without
# complaint. Checksums are order-free uint32 sums computed on device, so any mesh and any number of processes
# gets the same numbers; they are dispatched at save (no wait) and fetched once the step is committed.


def _name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """uint32 []: the sum of the value bits times odd position weights (mod 2^32).

  An odd weight makes any change of a single value change the sum; position weights catch moved values. One
  reduction over elementwise producers fuses into one loop: nothing of the leaf's size is materialised (two
  sibling reductions did materialise the weights, several GB at 0.5B parameters).
  """
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  index, stride = jnp.zeros(x.shape, jnp.uint32), 1
  for d in reversed(range(x.ndim)):  # the flat index, without a reshape (which would reshard)
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
    stride *= x.shape[d]
  weight = (index * jnp.uint32(2654435761)) | jnp.uint32(1)
  return jnp.sum(bits * weight, dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda leaves: [_leaf_checksum(x) for x in leaves])


def start_checksums(tree: Any) -> list[tuple[str, str, jax.Array]]:
  """Dispatches the checksums of every array leaf: [(flat name, dtype, device uint32 [])]."""
  named = [(_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "dtype")]
  sums = _checksums_jit([x for _, x in named])
  return [(n, str(x.dtype), c) for (n, x), c in zip(named, sums, strict=True)]


def fetch_checksums(started: list[tuple[str, str, jax.Array]]) -> dict[str, list]:
  """Flat name -> [dtype, checksum] (the result is replicated: any process's copy will do)."""
  return {n: [dtype, int(np.asarray(c.addressable_data(0)))] for n, dtype, c in started}


def checksums(tree: Any) -> dict[str, list]:
  return fetch_checksums(start_checksums(tree))


def write_manifest(step_dir: str | os.PathLike, sums: Mapping[str, list] | None = None) -> None:
  step_dir = pathlib.Path(step_dir)
  files = {str(p.relative_to(step_dir)): p.stat().st_size for p in sorted(step_dir.rglob("*"))
           if p.is_file() and not p.name.startswith(MANIFEST)}
  tmp = step_dir / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps({"files": files, "checksums": dict(sums or {})}, indent=0))
  tmp.rename(step_dir / MANIFEST)


def read_manifest(step_dir: str | os.PathLike) -> dict | None:
  """The manifest of a step, or None when the process stopped between the commit and writing it."""
  path = pathlib.Path(step_dir, MANIFEST)
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise CorruptCheckpointError(f"checkpoint step {pathlib.Path(step_dir).name}: unreadable {path}: "
                                 f"{e}") from e


def verify_step(step_dir: str | os.PathLike) -> None:
  """Raises CorruptCheckpointError naming the step and the first missing or resized file."""
  step_dir = pathlib.Path(step_dir)
  manifest = read_manifest(step_dir)
  for name, size in (manifest or {}).get("files", {}).items():
    path = step_dir / name
    if not path.is_file():
      raise CorruptCheckpointError(f"checkpoint step {step_dir.name}: missing file {path}")
    if path.stat().st_size != size:
      raise CorruptCheckpointError(f"checkpoint step {step_dir.name}: {path} has {path.stat().st_size} "
                                   f"bytes, the manifest says {size} (truncated or overwritten)")


def verify_checksums(step_dir: str | os.PathLike, tree: Any) -> None:
  """Raises CorruptCheckpointError naming the step and the first array whose values changed."""
  saved = (read_manifest(step_dir) or {}).get("checksums", {})
  if not saved:
    return
  for name, got in checksums(tree).items():
    want = saved.get(name)
    if want is not None and want[0] == got[0] and list(want) != got:
      raise CorruptCheckpointError(f"checkpoint step {pathlib.Path(step_dir).name}: array {name} does not "
                                   f"match its saved checksum (corrupt data)")


# ----------------------------------------------------------------------------------------------------
# The run's checkpoints


class Checkpointer:
  """One run's checkpoints: keep the last `keep`, and every `keep_every`-th step permanently."""

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, keep_every: int = 0,
               async_save: bool = True, with_data: bool = True):
    self.directory = checkpoint_dir(workdir)
    self.with_data = with_data
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, keep_period=keep_every or None, enable_async_checkpointing=async_save,
        create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
    self._unlisted: list[tuple[int, list]] = []  # (step, started checksums) without a manifest yet
    self._fault = _parse_fault(os.environ.get(FAULT_ENV, ""))

  @classmethod
  def from_config(cls, workdir: str | os.PathLike, checkpoint_config: Any, *, with_data: bool = True
                  ) -> Checkpointer:
    """From the `checkpoint` section of a run config (keep, keep_every, async_save)."""
    c = checkpoint_config
    return cls(workdir, keep=c.keep, keep_every=c.get("keep_every", 0), async_save=c.get("async_save", True),
               with_data=with_data)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, *, data_iter=None, meta: Mapping | None = None,
           config: Mapping | None = None) -> bool:
    """Starts an async save of `step` (returns once the arrays are copied to host memory)."""
    # Orbax waits for the previous save here anyway; doing it first lets us list that step's files.
    self.manager.wait_until_finished()
    self._write_manifests()
    sums = start_checksums(state)  # on device, before the next step can donate these buffers
    args = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))),
                config=ocp.args.JsonSave(dict(config or {})))
    if self.with_data and data_iter is not None:
      import grain  # noqa: PLC0415  (the trainer runs without Grain when fed batches)
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self.manager.save(int(step), args=ocp.args.Composite(**args), force=True)
    if saved:
      self._unlisted.append((int(step), sums))
    if self._fault == ("stop_in_save", step):
      _stop_self(f"step {step} save in flight")
    if self._fault == ("stop_after_save", step):
      self.wait()
      _stop_self(f"step {step} committed")
    return saved

  def restore(self, abstract_state: Any, *, step: int | None = None, data_iter=None) -> tuple[Any, dict]:
    """(state, meta) of `step` (default: the latest readable one) onto the shardings of `abstract_state`
    (jax.ShapeDtypeStruct leaves with .sharding: any mesh, any number of processes). `data_iter` (Grain)
    is moved to the saved position when the same number of processes saved it."""
    steps = self.all_steps() if step is None else [int(step)]
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failures = []
    for s in reversed(steps):
      try:
        out = self._restore_step(s, abstract_state, data_iter)
      except Exception as e:  # noqa: BLE001  (any failure to read a step means: try the one before)
        if step is not None:
          raise CorruptCheckpointError(f"checkpoint step {s} in {self.directory} failed to restore: "
                                       f"{e}") from e
        logging.warning("checkpoint step %d in %s is corrupt or unreadable (%s); falling back to the "
                        "previous step", s, self.directory, str(e)[:400])
        failures.append(s)
        continue
      for bad in failures:
        self._quarantine(bad)
      logging.info("restored checkpoint step %d from %s", s, self.directory)
      return out
    raise CorruptCheckpointError(f"no readable checkpoint in {self.directory}: steps {failures} all failed")

  def _restore_step(self, step: int, abstract_state: Any, data_iter) -> tuple[Any, dict]:
    step_dir = os.path.join(self.directory, str(step))
    verify_step(step_dir)
    args = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if self.with_data and data_iter is not None:
      n = jax.process_count()
      saved = sorted(p.name for p in pathlib.Path(step_dir, "data").glob("process_*-of-*.json"))
      if f"process_{jax.process_index()}-of-{n}.json" in saved:
        import grain  # noqa: PLC0415
        args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      else:
        # Another process count shards the data differently: no saved position maps onto this one.
        logging.warning("checkpoint step %d: data iterator state was saved as %s, this run has %d "
                        "process(es); the input pipeline starts from its beginning", step, saved or "none", n)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    verify_checksums(step_dir, out["state"])
    return out["state"], dict(out["meta"])

  def _quarantine(self, step: int) -> None:
    """Moves a corrupt step aside (kept for inspection), so a later save of the same step number works."""
    _sync(f"tuna2_quarantine_{step}_start")
    if _is_primary():
      src = os.path.join(self.directory, str(step))
      dst = os.path.join(self.directory, f"corrupt.{step}")
      if os.path.exists(dst):
        dst += f".{os.getpid()}"
      os.rename(src, dst)
      logging.warning("moved corrupt checkpoint step %d to %s", step, dst)
    _sync(f"tuna2_quarantine_{step}_done")
    self.manager.reload()

  def _write_manifests(self) -> None:
    if _is_primary():
      for step, sums in self._unlisted:
        step_dir = os.path.join(self.directory, str(step))
        if os.path.isdir(step_dir):  # absent when the keep policy already deleted it
          write_manifest(step_dir, fetch_checksums(sums))
    self._unlisted = []

  def wait(self) -> None:
    """Blocks until the pending save is committed (and its manifest written)."""
    self.manager.wait_until_finished()
    self._write_manifests()

  def close(self) -> None:
    self.wait()
    self.manager.close()


def _parse_fault(spec: str) -> tuple[str, int] | None:
  if not spec:
    return None
  kind, _, step = spec.partition(":")
  if kind not in ("stop_after_save", "stop_in_save") or not step.isdigit():
    raise ValueError(f"{FAULT_ENV}={spec!r}: expected stop_after_save:<step> or stop_in_save:<step>")
  return kind, int(step)


def _stop_self(why: str) -> None:
  logging.warning("%s: stopping this process (%s) for the test to kill it", why, FAULT_ENV)
  logging.flush()
  os.kill(os.getpid(), signal.SIGSTOP)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying target shardings: what restoring onto a (possibly different) mesh needs."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------------------------------
# Params-only reads (evaluation, inference, warm starts): the optimizer state is never read.


def _steps_on_disk(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.exists(os.path.join(directory, n, "_CHECKPOINT_METADATA")))


def resolve_step_dir(path: str | os.PathLike, step: int | None = None) -> tuple[str, int]:
  """(step directory, step) for a workdir, its checkpoints/ directory or one checkpoints/<step> directory;
  without `step` the latest step whose files match its manifest."""
  path = os.path.abspath(path)
  if os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, "state")):
    if step is not None and step != int(os.path.basename(path)):
      raise ValueError(f"{path} is step {os.path.basename(path)}, but step={step} was asked for")
    verify_step(path)
    return path, int(os.path.basename(path))
  directory = path if os.path.basename(path) == "checkpoints" else checkpoint_dir(path)
  steps = _steps_on_disk(directory)
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint step {step} in {directory} (steps: {steps})")
    verify_step(os.path.join(directory, str(step)))
    return os.path.join(directory, str(step)), step
  for s in reversed(steps):
    try:
      verify_step(os.path.join(directory, str(s)))
    except CorruptCheckpointError as e:
      logging.warning("%s; using the previous step", e)
      continue
    return os.path.join(directory, str(s)), s
  raise FileNotFoundError(f"no (readable) checkpoint in {directory} (steps: {steps})")


def read_json_item(step_dir: str | os.PathLike, item: str) -> dict:
  """A JSON item (config, meta) of a step, as a plain dict."""
  path = pathlib.Path(step_dir, item, "metadata")
  if not path.is_file():
    raise FileNotFoundError(f"{step_dir}: no saved {item} ({path})")
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise CorruptCheckpointError(f"checkpoint step {pathlib.Path(step_dir).name}: unreadable {path}: "
                                 f"{e}") from e


def read_config(step_dir: str | os.PathLike) -> dict:
  """The resolved run config saved with a step (a plain dict)."""
  return read_json_item(step_dir, "config")


def saved_params_shapes(step_dir: str | os.PathLike, *, collection: str = "params") -> dict[str, Any]:
  """Flat name -> saved array metadata (shape, dtype) of one collection of the saved TrainState."""
  tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir) / "state").tree
  if collection not in tree or not tree[collection]:
    raise ValueError(f"{step_dir}: the saved train state has no {collection}"
                     + (" (the run had optim.ema_decay = 0)" if collection == "ema_params" else ""))
  return hf_qwen2.flatten(tree[collection])


def read_params(step_dir: str | os.PathLike, target: Mapping[str, jax.ShapeDtypeStruct], *,
                collection: str = "params") -> dict[str, jax.Array]:
  """Reads the flat names of `target` from one collection of a saved TrainState onto the target shardings,
  checks them against the saved checksums, then casts to the target dtypes. Nothing else (optimizer state,
  other parameters) is read."""
  saved = saved_params_shapes(step_dir, collection=collection)
  as_saved = {n: jax.ShapeDtypeStruct(t.shape, saved[n].dtype, sharding=t.sharding)
              for n, t in target.items()}
  item = {collection: hf_qwen2.unflatten(as_saved)}
  restore_args = jax.tree.map(
      lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype, global_shape=s.shape), item)
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  out = ckptr.restore(epath.Path(step_dir) / "state",
                      args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
  verify_checksums(step_dir, out)
  flat = hf_qwen2.flatten(out[collection])
  recast = sorted(n for n, x in flat.items() if x.dtype != target[n].dtype)
  if recast:  # one program for all of them (a jit per shape would compile dozens)
    dtypes = [target[n].dtype for n in recast]
    cast_all = jax.jit(lambda xs: [x.astype(d) for x, d in zip(xs, dtypes, strict=True)])
    cast = cast_all([flat[n] for n in recast])
    flat.update(zip(recast, cast, strict=True))
  return flat


def restore_params(workdir: str | os.PathLike, step: int | None = None, dtype: str | None = None, *,
                   ema: bool = False, sharding: jax.sharding.Sharding | None = None
                   ) -> tuple[ModelConfig, Any]:
  """(ModelConfig, params) of a training run's checkpoint, for evaluation and inference.

  workdir: a run directory, its checkpoints/ or one checkpoints/<step>. step: None = the latest intact one.
  dtype: cast parameters (and the model's compute dtype) to it while reading. ema: the EMA parameters.
  sharding: where the arrays go (default: this process's first device).
  """
  step_dir, step = resolve_step_dir(workdir, step)
  model_cfg = ModelConfig.from_dict(read_config(step_dir)["model"])
  if dtype:
    model_cfg = dataclasses.replace(model_cfg, dtype=dtype, param_dtype=dtype)
  collection = "ema_params" if ema else "params"
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = {n: jax.ShapeDtypeStruct(m.shape, jnp.dtype(dtype or m.dtype), sharding=sharding)
            for n, m in saved_params_shapes(step_dir, collection=collection).items()}
  params = read_params(step_dir, target, collection=collection)
  logging.info("read %s of step %d from %s (%d arrays)", collection, step, step_dir, len(params))
  return model_cfg, hf_qwen2.unflatten(params)


# ----------------------------------------------------------------------------------------------------
# Warm starts: parameters from another run or from a Hugging Face Qwen2 directory; optimizer fresh.


@dataclasses.dataclass(frozen=True)
class WarmStartReport:
  source: str
  kind: str                      # "run" | "hf"
  step: int | None               # the source run's step
  loaded: tuple[str, ...]        # flat param names filled from the source
  initialized: tuple[str, ...]   # kept at this run's fresh initialisation (not in the source)
  ignored: tuple[str, ...]       # source tensors this model has no place for

  def summary(self) -> str:
    fresh = ", ".join(sorted({n.split("/")[0] for n in self.initialized})) or "none"
    where = f"{self.source} (step {self.step})" if self.step is not None else self.source
    return (f"warm start from {self.kind} {where}: {len(self.loaded)} tensors loaded; initialised fresh: "
            f"{fresh} ({len(self.initialized)} tensors); ignored: {list(self.ignored) or 'none'}")

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)


def _put(x: np.ndarray, spec: jax.ShapeDtypeStruct) -> jax.Array:
  """A host array onto a (possibly multi-process) sharding, each process filling its own shards."""
  x = np.asarray(x).astype(spec.dtype)
  return jax.make_array_from_callback(spec.shape, spec.sharding, lambda idx: x[idx])


def is_hf_dir(path: str | os.PathLike) -> bool:
  p = pathlib.Path(path)
  cfg = p / "config.json"
  weights = (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()
  return cfg.is_file() and weights and json.loads(cfg.read_text()).get("model_type") == "qwen2"


def _hf_backbone(hf_dir: str, model_cfg: ModelConfig) -> tuple[dict[str, np.ndarray], list[str]]:
  """The decoder tensors of an HF Qwen2 directory in our layout (flat names), and the HF names left unused.

  hf_qwen2.import_hf would also initialise the parameters Qwen2 lacks, which a warm start takes from the run's
  own initialisation instead; so this uses its name and layout table directly.
  """
  fixed = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)
           if f.name not in hf_qwen2._HF_FIELDS}  # noqa: SLF001  (the fields config.json does not fix)
  hf_cfg = hf_qwen2.config_from_hf(json.loads(pathlib.Path(hf_dir, "config.json").read_text()), **fixed)
  differ = {f.name: (getattr(model_cfg, f.name), getattr(hf_cfg, f.name))
            for f in dataclasses.fields(model_cfg) if getattr(model_cfg, f.name) != getattr(hf_cfg, f.name)}
  if differ:
    raise ValueError(f"checkpoint.init_from={hf_dir}: the model config does not match its config.json: "
                     + ", ".join(f"model.{k}={a!r} but config.json gives {b!r}"
                                 for k, (a, b) in differ.items()))
  tensors = hf_qwen2.read_hf_tensors(hf_dir)
  pairs = hf_qwen2._pairs(model_cfg)  # noqa: SLF001
  missing = sorted({hf for _, hf, _, _ in pairs} - set(tensors))
  if missing:
    raise ValueError(f"checkpoint.init_from={hf_dir}: missing tensor(s) {missing[:5]}")
  flat: dict[str, np.ndarray] = {}
  stacked: dict[str, list[np.ndarray]] = {}
  for ours, hf, kind, i in pairs:
    x = hf_qwen2._to_ours(kind, model_cfg)(tensors[hf])  # noqa: SLF001
    if i is None:
      flat[ours] = x
    elif model_cfg.scan_layers:
      stacked.setdefault(f"decoder/layers/{ours}", []).append(x)
    else:
      flat[f"decoder/layers_{i}/{ours}"] = x
  flat.update({n: np.stack(xs) for n, xs in stacked.items()})
  ignored = sorted(set(tensors) - {hf for _, hf, _, _ in pairs})
  return flat, ignored


def warm_start_params(init_from: str, params_abstract: Mapping, model_cfg: ModelConfig
                      ) -> tuple[dict[str, jax.Array], WarmStartReport]:
  """Flat name -> array for the parameters `init_from` provides, laid out like `params_abstract` (a
  ShapeDtypeStruct tree with shardings). A shape mismatch is an error naming the tensor."""
  want = hf_qwen2.flatten(params_abstract)
  if is_hf_dir(init_from):
    flat, ignored = _hf_backbone(init_from, model_cfg)
    for n, x in flat.items():
      if n not in want or x.shape != want[n].shape:
        raise ValueError(f"checkpoint.init_from={init_from}: tensor {n} {x.shape} does not fit the model "
                         f"({want[n].shape if n in want else 'no such parameter'})")
    loaded = {n: _put(x, want[n]) for n, x in flat.items()}
    report = WarmStartReport(init_from, "hf", None, tuple(sorted(loaded)),
                             tuple(sorted(set(want) - set(loaded))), tuple(ignored))
    return loaded, report
  step_dir, step = resolve_step_dir(init_from)
  saved = saved_params_shapes(step_dir)
  for n in sorted(set(want) & set(saved)):
    if tuple(saved[n].shape) != tuple(want[n].shape):
      raise ValueError(f"checkpoint.init_from={init_from} (step {step}): parameter {n!r} has shape "
                       f"{tuple(saved[n].shape)}, this model's is {tuple(want[n].shape)}")
  common = {n: want[n] for n in want if n in saved}
  if not common:
    raise ValueError(f"checkpoint.init_from={init_from} (step {step}): no parameter name in common with "
                     "this model")
  loaded = read_params(step_dir, common)
  report = WarmStartReport(init_from, "run", step, tuple(sorted(loaded)),
                           tuple(sorted(set(want) - set(saved))), tuple(sorted(set(saved) - set(want))))
  return loaded, report


def warm_start(state: Any, state_shardings: Any, init_from: str, model_cfg: ModelConfig
               ) -> tuple[Any, WarmStartReport]:
  """`state` (a fresh TrainState) with the parameters `init_from` provides; the EMA (when kept) starts
  from the same values, the optimizer state stays fresh."""
  abstract = abstract_with_shardings(state.params, state_shardings.params)
  loaded, report = warm_start_params(init_from, abstract, model_cfg)
  params = hf_qwen2.unflatten({n: loaded.get(n, x) for n, x in hf_qwen2.flatten(state.params).items()})
  ema = state.ema_params
  if jax.tree.leaves(ema):  # a separate copy: params and EMA are donated to the step as different buffers
    ema = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=state_shardings.ema_params)(params)
  logging.info("%s", report.summary())
  return state.replace(params=params, ema_params=ema), report
