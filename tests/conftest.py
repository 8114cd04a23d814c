"""Test setup: 8 fake CPU devices for sharding tests, absl flags marked parsed (Grain workers need it)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
flags.FLAGS.mark_as_parsed()
