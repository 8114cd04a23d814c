"""A local sweep of two tiny runs executes end to end; its summary has one row per run."""

from __future__ import annotations

import csv
import json
import subprocess

from tests.launch.conftest import REPO, child_env

SWEEP = '''
from configs.sweeps import grid

CONFIG = "configs/tuna2_debug.py"


def sweep():
  yield from grid.product({{"train.seed": [0, 1]}}, train__steps=2, data__seq_len=64,
                          data__global_batch_size=2, train__log_every=1, checkpoint__every=0,
                          data__data_dir={data_dir!r})
'''


def test_local_sweep_runs_and_summarizes(tmp_path, shapes_data_dir):
  sweep_file = tmp_path / "tiny_seeds.py"
  sweep_file.write_text(SWEEP.format(data_dir=shapes_data_dir))
  root = tmp_path / "sweeps"
  # Runs that differ only in the seed compile the same step: the second one reads the compile cache.
  env = child_env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  out = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "launch.sweep", f"--sweep={sweep_file}",
                        "--launcher=local", f"--root={root}", "--metric=loss"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  sweep_dir = root / "tiny_seeds"
  manifest = json.loads((sweep_dir / "sweep.json").read_text())
  workdirs = [r["workdir"] for r in manifest["runs"]]
  assert [r["name"] for r in manifest["runs"]] == ["tiny-seeds-00", "tiny-seeds-01"]
  assert workdirs == [str(sweep_dir / "00_seed=0"), str(sweep_dir / "01_seed=1")]
  for seed, w in enumerate(workdirs):
    assert json.loads(open(f"{w}/launch/config.json").read())["train"]["seed"] == seed
    assert "--config.train.seed=" in open(f"{w}/launch/command.sh").read()

  rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
  assert sorted(r["run"] for r in rows) == ["tiny-seeds-00", "tiny-seeds-01"]
  assert all(r["step"] == "2" for r in rows)
  losses = [float(r["loss"]) for r in rows]
  assert losses == sorted(losses)
  md = (sweep_dir / "summary.md").read_text().splitlines()
  assert md[0].startswith("| run | config | train.seed |") and len(md) == 2 + 2
  assert md == out.stdout.splitlines()[-4:]
