"""2 processes x 2 CPU devices train the same steps as one process: the multi-host code path."""

import json
import os
import subprocess
import sys

import numpy as np
import portpicker

from tests.test_train import batches, debug_config
from tuna2_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_processes_match_one(tmp_path):
  port = portpicker.pick_unused_port()
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", f"127.0.0.1:{port}", str(i),
                             str(tmp_path / "multi")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  multi = [json.loads(line)["loss"] for line in open(tmp_path / "multi" / "metrics.jsonl")]
  assert not (tmp_path / "multi" / "metrics.jsonl.1").exists()

  c = debug_config(data=-1)
  c.train.steps, c.train.log_every, c.checkpoint.every = 3, 1, 0
  train.train_and_evaluate(c, str(tmp_path / "single"), batches=iter(batches(c, 3)))
  single = [json.loads(line)["loss"] for line in open(tmp_path / "single" / "metrics.jsonl")]
  assert len(multi) == 3
  np.testing.assert_allclose(multi, single, rtol=2e-6)
