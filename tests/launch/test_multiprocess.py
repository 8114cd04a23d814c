"""launch/multiprocess_cpu.sh: 2 processes x 2 fake CPU devices train with checkpoints; a relaunch resumes."""

from __future__ import annotations

import json
import os
import subprocess

from tests.launch.conftest import REPO, child_env


def _launch(workdir, data_dir, steps: int) -> subprocess.CompletedProcess:
  cmd = [str(REPO / "launch/multiprocess_cpu.sh"), "2", "configs/tuna2_debug.py", str(workdir),
         f"--config.train.steps={steps}", "--config.data.seq_len=64", "--config.data.global_batch_size=4",
         "--config.checkpoint.every=2", "--config.train.log_every=1", f"--config.data.data_dir={data_dir}"]
  return subprocess.run(cmd, cwd=REPO, env=child_env(TUNA2_CPU_DEVICES="2"), capture_output=True, text=True,
                        timeout=600)


def _steps(workdir) -> list[int]:
  return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


def test_two_processes_train_then_resume(tmp_path, shapes_data_dir):
  workdir = tmp_path / "mp"
  first = _launch(workdir, shapes_data_dir, steps=3)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert "2 processes x 2 CPU devices" in first.stdout
  assert _steps(workdir) == [1, 2, 3]
  assert _checkpoints(workdir) == [2, 3]
  log1 = (workdir / "logs/process_1.log").read_text()
  assert log1.startswith("process 1: ") and "--process_id=1" in log1.splitlines()[0]
  assert "on 4 devices (2 processes)" in log1
  assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 3
  assert json.loads((workdir / "launch/config.json").read_text())["data"]["seq_len"] == 64
  assert "--config.checkpoint.every=2" in (workdir / "launch/command.sh").read_text()

  # Relaunch on the same workdir with a longer schedule: it continues from step 3, it does not start over.
  second = _launch(workdir, shapes_data_dir, steps=5)
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  log0 = (workdir / "logs/process_0.log").read_text()
  assert log0.count("process 0: ") == 2 and "restored checkpoint step 3" in log0  # logs of both launches
  assert _steps(workdir) == [1, 2, 3, 4, 5]
  assert _checkpoints(workdir) == [3, 4, 5]  # checkpoint.keep = 3
  history = (workdir / "launch/history.jsonl").read_text().splitlines()
  assert [json.loads(h)["launcher"] for h in history] == ["multiprocess_cpu"] * 2
  assert "--config.train.steps=5" in json.loads(history[1])["train_args"]
