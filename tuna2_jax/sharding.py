"""Device meshes, logical-axis rules and the shardings derived from them.

The model names array axes logically (batch, length, embed, heads, kv_heads, head_dim, mlp, vocab, patch,
time, layers); the rules below map them to the mesh axes ('data', 'fsdp', 'tensor', 'sequence'). Nothing in
the model names a mesh axis, so one model runs on 1 CPU, 8 fake devices, a GPU node or a TPU pod.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

# Logical axis -> mesh axis rules, in precedence order: flax gives each array dim the first rule whose mesh
# axis is still unused in that array, so activations [batch, length, embed] shard batch over (data, fsdp)
# and leave embed whole, while parameters [embed, mlp] shard embed over fsdp (ZeRO-3) and mlp over tensor.
RULES: dict[str, tuple[tuple[str, str | tuple[str, ...] | None], ...]] = {
    "fsdp_tp": (
        ("batch", BATCH_AXES),
        ("length", "sequence"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("layers", None),
        ("head_dim", None),
        ("patch", None),
        ("time", None),
    ),
}
# A GPU node (FSDP across nodes, tensor inside NVLink) and a TPU pod (FSDP over DCN + ICI, tensor inside a
# slice) use the same logical rules; what differs is the mesh shape in the config (see configs/common.py).
RULES["gpu_node"] = RULES["fsdp_tp"]
RULES["tpu_pod"] = RULES["fsdp_tp"]


class MeshError(ValueError):
  """A mesh configuration that does not fit the devices or the model."""


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills the one -1 axis with the remaining devices; checks the product (errors name mesh.shape)."""
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise MeshError(f"mesh.shape: unknown axes {unknown}; expected {MESH_AXES}")
  dims = {a: int(shape.get(a, 1)) for a in MESH_AXES}
  free = [a for a, n in dims.items() if n == -1]
  if len(free) > 1:
    raise MeshError(f"mesh.shape: at most one axis may be -1, got {free}")
  if any(n == 0 or n < -1 for n in dims.values()):
    raise MeshError(f"mesh.shape: axis sizes must be positive or -1, got {dims}")
  fixed = math.prod(n for n in dims.values() if n != -1)
  if free:
    if num_devices % fixed:
      raise MeshError(f"mesh.shape {dims}: {num_devices} devices are not divisible by {fixed}")
    dims[free[0]] = num_devices // fixed
  if math.prod(dims.values()) != num_devices:
    raise MeshError(f"mesh.shape {dims} needs {math.prod(dims.values())} devices, found {num_devices}")
  return dims


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over ('data', 'fsdp', 'tensor', 'sequence') with Auto axis types (what linen constraints use).

  `mesh_utils.create_device_mesh` orders devices by the physical topology (TPU ICI rings, GPU NVLink); with
  several TPU slices the data axis spans the slices (DCN) via `create_hybrid_device_mesh`.
  """
  devices = list(devices if devices is not None else jax.devices())
  dims = resolve_mesh_shape(shape, len(devices))
  mesh_shape = tuple(dims[a] for a in MESH_AXES)
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if num_slices > 1 and dims["data"] % num_slices == 0:
    ici = (dims["data"] // num_slices,) + mesh_shape[1:]
    dcn = (num_slices,) + (1,) * (len(MESH_AXES) - 1)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(mesh_shape, devices, allow_split_physical_axes=True)
    except (NotImplementedError, ValueError, AssertionError):  # CPU / unknown topologies: plain order
      grid = np.asarray(devices).reshape(mesh_shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules: str | Sequence) -> tuple:
  """`mesh.rules` is a preset name of RULES or an explicit ((logical, mesh), ...) sequence."""
  if isinstance(rules, str):
    if rules not in RULES:
      raise MeshError(f"mesh.rules={rules!r} not in {sorted(RULES)}")
    return RULES[rules]
  return tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules)


def logical_to_sharding(tree, mesh: Mesh, rules) -> object:
  """A pytree of NamedShardings for a pytree carrying flax logical-partitioning metadata."""
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_spec(ndim: int, *, sequence_axis: int | None = 1) -> P:
  """PartitionSpec of a [B, ...] input array: batch over (data, fsdp), the length axis over sequence."""
  spec: list = [BATCH_AXES] + [None] * (ndim - 1)
  if sequence_axis is not None and ndim > sequence_axis:
    spec[sequence_axis] = "sequence"
  return P(*spec)


def batch_shardings(batch: Mapping[str, object], mesh: Mesh) -> dict[str, NamedSharding]:
  """Shardings of the contract's fields ([B, L, ...]; positions are [B, 3, L])."""
  out = {}
  for k, v in batch.items():
    ndim = len(np.shape(v))
    out[k] = NamedSharding(mesh, batch_spec(ndim, sequence_axis=2 if k == "positions" else 1))
  return out


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
