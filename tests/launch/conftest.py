"""Fixtures of the launcher tests: the repo root, a clean env for child trainers, a tiny shapes dataset."""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
  """The test process's env minus its 8-fake-device XLA_FLAGS (each launcher sets its own devices)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTEST_XDIST_WORKER")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)
  return env


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory) -> str:
  """A 24-record tuna_shapes build (a few seconds)."""
  from data import shapes  # noqa: PLC0415

  data_dir = str(tmp_path_factory.mktemp("launch_data"))
  shapes.build(data_dir, num_train=24, num_validation=0, num_test=4, seed=0, num_workers=0)
  return data_dir
