"""Submits a training run to GKE as a JobSet: one pod per host of a TPU slice or of a set of GPU nodes.

  python -m launch.gke.jobset --image=us-docker.pkg.dev/P/tuna2/train:latest --accelerator=v5litepod-16 \
      --name=tiny-lr3 configs/tuna2_tiny.py gs://bucket/runs/tiny-lr3 --config.optim.lr=3e-4
  python -m launch.gke.jobset --image=... --accelerator=h100 --nodes=4 ... --dry_run   # print the manifest

The manifest is launch/gke/jobset.yaml filled from the slice table (launch/slices.py: hosts, chips per host,
node labels) and these options; every pod runs `bash launch/host.sh CONFIG WORKDIR [overrides]` unchanged.
jax.distributed finds its peers from the env: TPU_WORKER_ID / TPU_WORKER_HOSTNAMES on TPUs (what GKE's TPU
webhook would inject), JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID on GPUs (host.sh turns
them into the trainer's --coordinator_address / --num_processes / --process_id). The image must hold this
repository at --repo_dir with its requirements installed. WORKDIR must be gs:// (pods share no disk);
relaunching on it (or a JobSet restart after a preemption) resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import string
import subprocess
import sys

from launch import slices

_HERE = os.path.dirname(os.path.abspath(__file__))
_COORDINATOR_PORT = 1234  # GPU jobs: JAX's coordinator on pod 0 (TPU jobs use the TPU runtime's own 8476)


def gpu_env_file(path: str = os.path.join(_HERE, "..", "gpu_flags.env")) -> dict[str, str]:
  """KEY=VALUE / KEY="VALUE" lines of launch/gpu_flags.env (comments and blanks skipped)."""
  out = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line and not line.startswith("#"):
        key, _, value = line.partition("=")
        out[key] = value[1:-1] if len(value) > 1 and value[0] == value[-1] == '"' else value
  return out


def _index_env(name: str) -> dict:
  """An env var holding this pod's job-completion index (0 .. hosts-1)."""
  path = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
  return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def manifest(args: argparse.Namespace) -> str:
  """The JobSet YAML for these options."""
  s = slices.gpu_slice(args.accelerator, args.nodes) if args.accelerator in slices.GPU_NODES else (
      slices.tpu_slice(args.accelerator))
  host0 = f"{args.name}-workers-0-0.{args.name}"
  env = [{"name": "TUNA2_LAUNCHER", "value": "gke"}]
  volumes, mounts = [], []
  if s.kind == "tpu":
    hostnames = ",".join(f"{args.name}-workers-0-{i}.{args.name}" for i in range(s.hosts))
    env += [_index_env("TPU_WORKER_ID"), {"name": "TPU_WORKER_HOSTNAMES", "value": hostnames}]
    selector = {"cloud.google.com/gke-tpu-accelerator": s.gke_accelerator,
                "cloud.google.com/gke-tpu-topology": s.gke_topology}
    limits = {"google.com/tpu": s.chips_per_host}
    tolerations = [{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}]
    ports = [{"containerPort": 8471}, {"containerPort": 8476}]  # TPU ICI runtime, JAX coordinator
    host_network, dns = True, "ClusterFirstWithHostNet"
  else:
    env += [{"name": "JAX_COORDINATOR_ADDRESS", "value": f"{host0}:{_COORDINATOR_PORT}"},
            {"name": "JAX_NUM_PROCESSES", "value": str(s.hosts)}, _index_env("JAX_PROCESS_ID")]
    env += [{"name": k, "value": v} for k, v in gpu_env_file().items()]
    selector = {"cloud.google.com/gke-accelerator": s.gke_accelerator}
    limits = {"nvidia.com/gpu": s.chips_per_host}
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    ports = [{"containerPort": _COORDINATOR_PORT}]
    host_network, dns = False, "ClusterFirst"
    # NCCL moves data through /dev/shm; the container default (64 MiB) is far too small.
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
  annotations = {}
  if args.gcs_bucket:
    # Cloud Storage FUSE CSI: WORKDIR can be a plain path under --gcs_mount for every file the run writes.
    annotations["gke-gcsfuse/volumes"] = "true"
    volumes.append({"name": "gcs", "csi": {"driver": "gcsfuse.csi.storage.gke.io", "volumeAttributes": {
        "bucketName": args.gcs_bucket, "mountOptions": "implicit-dirs"}}})
    mounts.append({"name": "gcs", "mountPath": args.gcs_mount})
  for kv in args.env:
    key, _, value = kv.partition("=")
    env = [e for e in env if e["name"] != key] + [{"name": key, "value": value}]
  command = ["bash", "launch/host.sh", args.config, args.workdir, *args.overrides]
  fields = dict(
      name=args.name, labels={"app": "tuna2", "tuna2/run": args.name}, max_restarts=args.max_restarts,
      hosts=s.hosts, pod_annotations=annotations, grace_seconds=args.grace_seconds,
      host_network=host_network, dns_policy=dns,
      node_selector=selector, tolerations=tolerations, volumes=volumes, image=args.image,
      repo_dir=args.repo_dir, command=command, env=env, ports=ports, volume_mounts=mounts, limits=limits)
  with open(os.path.join(_HERE, "jobset.yaml")) as f:
    template = string.Template(f.read())
  return template.substitute({k: json.dumps(v) for k, v in fields.items()})


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m launch.gke.jobset", description=__doc__.split("\n")[0])
  p.add_argument("--name", required=True, help="JobSet name (DNS label, <= 40 chars).")
  p.add_argument("--image", required=True, help="Container image with this repo at --repo_dir.")
  p.add_argument("--accelerator", required=True, help="TPU type (v5litepod-16, v6e-64, ...) or GPU (h100).")
  p.add_argument("--nodes", type=int, default=1, help="GPU nodes (GPU accelerators only).")
  p.add_argument("--repo_dir", default="/app", help="Where the image holds this repository.")
  p.add_argument("--max_restarts", type=int, default=10, help="JobSet restarts before giving up.")
  p.add_argument("--grace_seconds", type=int, default=300, help="SIGTERM-to-SIGKILL time for the final save.")
  p.add_argument("--env", action="append", default=[], help="KEY=VALUE for every pod (repeatable).")
  p.add_argument("--gcs_bucket", default="", help="Mount this bucket with Cloud Storage FUSE (needs the "
                 "CSI driver and a Workload Identity service account).")
  p.add_argument("--gcs_mount", default="/gcs", help="Where --gcs_bucket is mounted in the pods.")
  p.add_argument("--namespace", default="", help="kubectl namespace.")
  p.add_argument("--out_dir", default="", help="Where to keep the manifest (default runs/launch/<name>).")
  p.add_argument("--dry_run", action="store_true", help="Print the manifest; submit nothing.")
  p.add_argument("config")
  p.add_argument("workdir")
  p.add_argument("overrides", nargs=argparse.REMAINDER, help="--config.a.b=value ..., passed through.")
  args = p.parse_args(argv)
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", args.name):
    p.error(f"--name={args.name!r}: lowercase letters, digits and '-', at most 40 chars, start with a letter")
  if "://" not in args.workdir and not (args.gcs_bucket and args.workdir.startswith(args.gcs_mount + "/")):
    print(f"warning: WORKDIR {args.workdir} is neither gs:// nor under --gcs_mount; pods share no disk",
          file=sys.stderr)
  return args


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  text = manifest(args)
  if args.dry_run:
    print(text, end="")
    return
  out_dir = args.out_dir or os.path.join("runs", "launch", args.name)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "jobset.yaml")
  with open(path, "w") as f:
    f.write(text)
  with open(os.path.join(out_dir, "command.sh"), "w") as f:
    command = shlex.join([sys.executable, "-m", "launch.gke.jobset", *argv])
    f.write(f"cd {shlex.quote(os.getcwd())}\n{command}\n")
  kubectl = ["kubectl", "apply", "-f", path] + (["-n", args.namespace] if args.namespace else [])
  print(shlex.join(kubectl), file=sys.stderr)
  subprocess.run(kubectl, check=True)
  print(f"submitted; follow with: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name={args.name} "
        "--max-log-requests=64 --prefix", file=sys.stderr)


if __name__ == "__main__":
  main(sys.argv[1:])
