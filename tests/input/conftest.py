"""A small tuna_shapes dataset built once per test process."""

import pytest


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
  from data import shapes

  data_dir = str(tmp_path_factory.mktemp("shapes_data"))
  shapes.build(data_dir, num_train=96, num_validation=0, num_test=16, seed=0, num_workers=0)
  return data_dir


@pytest.fixture
def debug_config(shapes_dir):
  from configs import tuna2_debug

  c = tuna2_debug.get_config()
  c.data.data_dir = shapes_dir
  return c
