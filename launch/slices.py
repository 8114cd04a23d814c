"""Accelerator slices: hosts, chips per host and GKE node labels for a Cloud TPU type or a GPU node count.

  python -m launch.slices v5litepod-64          # hosts=16 chips_per_host=4 ... and a suggested mesh
  python -m launch.slices v5litepod-64 --field=hosts

The TPU VM and GKE launchers size a job from this table; the README's "Running at scale" explains the mesh
suggestion (pure FSDP inside a slice or node, data parallelism across slices / nodes, tensor only when the
model does not fit).
"""

from __future__ import annotations

import dataclasses
import math
import re

from absl import app, flags

# family: (GKE accelerator label, TensorCores per chip in the type name, chips per host of multi-host slices,
#          largest single-host slice in chips, topology rank)
_TPU_FAMILIES = {
    "v4": ("tpu-v4-podslice", 2, 4, 4, 3),
    "v5p": ("tpu-v5p-slice", 2, 4, 4, 3),
    "v5litepod": ("tpu-v5-lite-podslice", 1, 4, 8, 2),
    "v6e": ("tpu-v6e-slice", 1, 4, 8, 2),
}
# GPU nodes: accelerator name -> (GKE accelerator label, GPUs per node).
GPU_NODES = {
    "h100": ("nvidia-h100-80gb", 8),
    "h100-mega": ("nvidia-h100-mega-80gb", 8),
    "h200": ("nvidia-h200-141gb", 8),
    "a100": ("nvidia-tesla-a100", 8),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  """What a launcher needs to place one job: hosts x chips_per_host and where GKE finds such nodes."""

  name: str
  kind: str             # "tpu" | "gpu"
  hosts: int
  chips_per_host: int
  gke_accelerator: str
  gke_topology: str     # TPU only ("4x4", "2x2x4"); "" for GPUs

  @property
  def chips(self) -> int:
    return self.hosts * self.chips_per_host


def _topology(chips: int, rank: int) -> str:
  """The most cubic grid of `chips` (powers of two): 16 -> 4x4 (2-D) or 2x2x4 (3-D)."""
  if chips & (chips - 1):
    raise ValueError(f"TPU slices have a power-of-two chip count, got {chips}")
  dims = [1] * rank
  for _ in range(int(math.log2(chips))):
    dims[dims.index(min(dims))] *= 2
  return "x".join(str(d) for d in sorted(dims))


def tpu_slice(accelerator_type: str) -> Slice:
  """'v5litepod-16' -> 4 hosts x 4 chips, GKE tpu-v5-lite-podslice 4x4."""
  m = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
  if not m:
    raise ValueError(f"unknown TPU type {accelerator_type!r}; expected one of "
                     f"{', '.join(f + '-N' for f in _TPU_FAMILIES)}")
  label, cores_per_chip, per_host, single_host_max, rank = _TPU_FAMILIES[m.group(1)]
  chips = int(m.group(2)) // cores_per_chip
  if chips < 1:
    raise ValueError(f"{accelerator_type}: fewer than one chip")
  hosts, chips_per_host = (1, chips) if chips <= single_host_max else (chips // per_host, per_host)
  return Slice(accelerator_type, "tpu", hosts, chips_per_host, label, _topology(chips, rank))


def gpu_slice(gpu: str, nodes: int) -> Slice:
  """('h100', 4) -> 4 hosts x 8 GPUs."""
  if gpu not in GPU_NODES:
    raise ValueError(f"unknown GPU {gpu!r}; expected one of {sorted(GPU_NODES)}")
  label, per_node = GPU_NODES[gpu]
  return Slice(f"{gpu}-{nodes}x{per_node}", "gpu", nodes, per_node, label, "")


def suggest_mesh(s: Slice, *, num_slices: int = 1, tensor: int = 1) -> dict[str, int]:
  """mesh.shape for a job: FSDP over the fast interconnect (a TPU slice's ICI, a GPU node's NVLink),
  data parallelism across slices or nodes (DCN / InfiniBand), `tensor` only when a layer does not fit."""
  if s.kind == "tpu":
    return dict(data=num_slices, fsdp=s.chips // tensor, tensor=tensor, sequence=1)
  return dict(data=s.hosts * num_slices, fsdp=s.chips_per_host // tensor, tensor=tensor, sequence=1)


def mesh_overrides(mesh: dict[str, int]) -> list[str]:
  return [f"--config.mesh.shape.{axis}={n}" for axis, n in mesh.items()]


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError("usage: python -m launch.slices TPU_TYPE|GPU [--nodes=N] [--field=hosts]")
  name, field = argv[1], flags.FLAGS.field
  s = gpu_slice(name, flags.FLAGS.nodes) if name in GPU_NODES else tpu_slice(name)
  if field:
    print(getattr(s, field))
    return
  for field in dataclasses.fields(s):
    print(f"{field.name}={getattr(s, field.name)}")
  print(f"chips={s.chips}")
  print("suggested mesh:", " ".join(mesh_overrides(suggest_mesh(s))))


if __name__ == "__main__":
  # Defined here, not at import: the launchers import this table next to flags of their own.
  flags.DEFINE_string("field", "", "Print only this field (hosts, chips_per_host, chips, ...).")
  flags.DEFINE_integer("nodes", 1, "GPU nodes (for h100, h200, ...).")
  app.run(main)
