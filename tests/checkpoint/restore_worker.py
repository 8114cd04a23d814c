"""One process of a multi-process restore: restores a checkpoint onto a (data, fsdp) mesh spanning every
process and compares the gathered state with a reference file.

  python tests/checkpoint/restore_worker.py --workdir=W --reference=R.safetensors --mesh=data=2,fsdp=4 \
      --coordinator=127.0.0.1:PORT --num_processes=2 --process_id=I
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))


def flat_state(tree) -> dict:
  """"params/decoder/..." -> host numpy array (PRNG keys as their uint32 data) of a fully addressable tree."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    out["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)] = np.asarray(x)
  return out


def abstract_train_state(config, model, tx, mesh):
  """train.create_train_state's shapes and shardings (ShapeDtypeStructs), without running the initialiser."""
  from unittest import mock  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from tuna2_jax import train  # noqa: PLC0415

  def shapes_only(fn, *, out_shardings, **kw):
    del kw
    return lambda *a: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                   jax.eval_shape(fn, *a), out_shardings)

  with mock.patch.object(jax, "jit", shapes_only):
    return train.create_train_state(config, model, tx, mesh)[0]


def main() -> None:
  p = argparse.ArgumentParser()
  for name in ("workdir", "reference", "mesh", "coordinator"):
    p.add_argument(f"--{name}", required=True)
  p.add_argument("--num_processes", type=int, required=True)
  p.add_argument("--process_id", type=int, required=True)
  args = p.parse_args()

  import jax  # noqa: PLC0415
  jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                             process_id=args.process_id)
  import ml_collections  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from safetensors.numpy import load_file  # noqa: PLC0415

  from tuna2_jax import checkpoint, optim, sharding, train  # noqa: PLC0415
  from tuna2_jax.model.tuna2 import Tuna2  # noqa: PLC0415

  ckpt = checkpoint.Checkpointer(args.workdir, with_data=False)
  step = ckpt.latest_step()
  config = ml_collections.ConfigDict(checkpoint.read_config(os.path.join(ckpt.directory, str(step))))
  config.mesh.shape.update(dict(data=1, fsdp=1, tensor=1, sequence=1))
  config.mesh.shape.update({k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))})
  model_cfg = train.validate_config(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh.shape.to_dict())
  tx, _ = optim.make_optimizer(config.optim, config.train.steps)
  abstract = abstract_train_state(config, Tuna2(model_cfg), tx, mesh)
  state, meta = ckpt.restore(abstract)
  ckpt.close()
  want = load_file(args.reference)
  n = 0
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    for shard in x.addressable_shards:  # each process checks the shards it holds
      np.testing.assert_array_equal(np.asarray(shard.data), want[name][shard.index], err_msg=name)
      n += 1
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(abstract), strict=False):
    assert x.sharding.is_equivalent_to(s.sharding, x.ndim), (x.sharding, s.sharding)
  # Params-only restore works on every process too (each gets a full local copy).
  _, params = checkpoint.restore_params(args.workdir)
  for name, x in flat_state({"params": params}).items():
    np.testing.assert_array_equal(x, want[name], err_msg=name)
  print(f"process {jax.process_index()}: restored step {meta['step']} onto {dict(mesh.shape)} over "
        f"{jax.process_count()} processes, {n} shards identical", flush=True)


if __name__ == "__main__":
  main()
