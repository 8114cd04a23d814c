"""Pod-scale checks without a pod: compile for abstract TPU devices (libtpu from requirements-tpu.txt).

The train step of the debug config with the production mesh rules and the Pallas attention, and the Mosaic
kernel alone (forward and gradient, two block sizes, D in {64, 128}), compile for real through XLA:TPU and
Mosaic: a kernel or sharding that cannot compile on TPU fails CI.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tuna2_debug
from tests.helpers import random_batch
from tuna2_jax import sharding, train
from tuna2_jax.kernels import dispatch


@pytest.fixture(scope="module")
def tpu_devices():
  return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices


def test_debug_train_step_compiles_for_tpu_with_pallas(tpu_devices):
  c = tuna2_debug.get_config()
  c.mesh.shape.update(dict(data=2, fsdp=2))
  c.data.global_batch_size, c.model.attention = 4, "pallas"
  compiled = train.compile_train_step(c, sharding.make_mesh(c.mesh.shape.to_dict(), tpu_devices))
  assert "tpu_custom_call" in compiled.as_text()     # the Mosaic attention kernels, not interpret mode
  mem = compiled.memory_analysis()
  assert 0 < mem.argument_size_in_bytes < 64 << 20
  assert compiled.cost_analysis()["flops"] > 0


@pytest.mark.parametrize("d, block", [(64, 128), (128, 256)])
def test_mosaic_kernel_compiles_fwd_and_grad(tpu_devices, d, block):
  mesh = sharding.make_mesh({"data": 4}, tpu_devices)
  length = 1024
  batch = random_batch(d, batch_size=4, seq_len=length, patch_size=4, vocab=50)
  attn = functools.partial(dispatch.pallas_attention, block_q=block, block_k=2 * block, mesh=mesh,
                           platform="tpu")
  loss = lambda q, k, v, s, e: attn(q, k, v, s, e).astype(jnp.float32).sum()
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("data")))
  q, kv = spec((4, length, 4, d), jnp.bfloat16), spec((4, length, 2, d), jnp.bfloat16)
  seg = spec(batch["segment_ids"].shape, np.int32)
  with jax.set_mesh(mesh):
    for fn in (attn, jax.grad(loss, argnums=(0, 1, 2))):
      text = jax.jit(fn).trace(q, kv, kv, seg, seg).lower().compile().as_text()
      assert "tpu_custom_call" in text
