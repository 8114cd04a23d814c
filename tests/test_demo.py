"""`make demo` shortened (small data, 2 steps): the real command line runs end to end, writes the summary."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_short_demo_end_to_end(tmp_path):
  workdir = str(tmp_path / "demo")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a laptop
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "tuna2_jax.demo", f"--workdir={workdir}", "--num_train=16", "--num_test=4",
         "--minutes=0", "--config.train.steps=2", "--config.train.log_every=1",
         "--config.data.global_batch_size=2",
         "--config.eval.num_examples=3", "--config.eval.gen_num=2", "--config.eval.gen_steps=2",
         "--config.eval.recon_num=1", "--config.eval.max_new_tokens=4"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "step 2/2" in out.stderr and "eta=" in out.stderr  # progress lines with ETA
  assert "understanding" in out.stdout and "reconstruction PSNR" in out.stdout
  summary = json.load(open(os.path.join(workdir, "eval.json")))
  assert summary["step"] == 2
  for kind, r in summary["understanding"].items():
    assert {"accuracy", "chance", "num"} <= set(r), kind
  assert "geneval" in summary["generation"] and "reconstruction_psnr" in summary
  for scenes in ("small", "draw"):  # understanding scenes and drawings, one dataset each
    assert os.path.isdir(os.path.join(workdir, "data", "tuna_shapes", scenes)), scenes
  for name in ("report", "samples", "json"):
    assert os.path.exists(os.path.join(workdir, summary["files"][name])), name
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2")) and os.listdir(os.path.join(workdir, "tb"))
  assert os.path.isdir(os.path.join(workdir, "data", "tuna_shapes"))
