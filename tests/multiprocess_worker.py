"""One process of a multi-process CPU training run (launched by tests/test_multiprocess.py)."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402


def main(coordinator: str, process_id: int, workdir: str) -> None:
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=2, process_id=process_id)
  from tests.test_train import batches, debug_config  # noqa: PLC0415
  from tuna2_jax import train  # noqa: PLC0415

  c = debug_config(data=-1)
  c.train.steps, c.train.log_every, c.checkpoint.every = 3, 1, 0
  half = c.data.global_batch_size // 2
  local = [{k: v[process_id * half:(process_id + 1) * half] for k, v in b.items()} for b in batches(c, 3)]
  train.train_and_evaluate(c, workdir, batches=iter(local))


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
