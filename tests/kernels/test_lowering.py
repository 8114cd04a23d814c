"""Cross-lowering on a CPU-only machine: the TPU (Mosaic) and CUDA (Triton) kernels, forward and gradient.

TPU: `lower(lowering_platforms=("tpu",))` emits the Mosaic custom calls (pallas.md §1.4). A full Mosaic
*compile* needs libtpu (`jax.experimental.topologies.get_topology_desc("v5e:2x2")`), which this project's CPU
CI does not install; that check belongs to a TPU-enabled CI job. CUDA: lowering under an AbstractMesh with an
H100 AbstractDevice runs the Pallas -> Triton lowering.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from tests.kernels.layouts import random_layout
from tuna2_jax.kernels import hybrid_attention


def _fns(backend, seg, end, bq, bk):
  fwd = functools.partial(hybrid_attention, segment_ids=seg, attn_end=end, backend=backend, block_q=bq,
                          block_k=bk, interpret=False)
  loss = lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum()
  return {"fwd": fwd, "grad": jax.grad(loss, argnums=(0, 1, 2))}


def _args(l, d, hq=4, hkv=2):
  seg, end = random_layout(np.random.default_rng(l + d), 1, l)
  q = jnp.zeros((1, l, hq, d), jnp.bfloat16)
  k = jnp.zeros((1, l, hkv, d), jnp.bfloat16)
  return q, k, jnp.asarray(seg), jnp.asarray(end)


def _abstract_mesh(device_kind, platform, cores):
  return AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind=device_kind, num_cores=cores,
                                                                   platform=platform))


@pytest.mark.parametrize("d,bq,bk,chip", [(64, 128, 128, "TPU v5 lite"), (128, 256, 512, "TPU v6 lite")])
def test_tpu_lowering(d, bq, bk, chip):
  q, k, seg, end = _args(1024, d)
  for name, fn in _fns("mosaic_tpu", seg, end, bq, bk).items():
    # The Mosaic lowering reads chip facts (tpu_info), so name the target generation.
    with use_abstract_mesh(_abstract_mesh(chip, "tpu", 1)):
      text = jax.jit(fn).trace(q, k, k).lower(lowering_platforms=("tpu",)).as_text()
    # fwd: one kernel; grad: fwd + dq + dkv.
    assert text.count("tpu_custom_call") >= (1 if name == "fwd" else 3), name


@pytest.mark.parametrize("d,bq,bk", [(64, 64, 32), (128, 128, 64)])
def test_cuda_triton_lowering(d, bq, bk):
  q, k, seg, end = _args(1000, d)     # not a block multiple: padded inside
  mesh = _abstract_mesh("NVIDIA H100 80GB HBM3", "cuda", 132)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)   # "The Pallas Triton backend is deprecated"
    for name, fn in _fns("triton", seg, end, bq, bk).items():
      with use_abstract_mesh(mesh):
        text = jax.jit(fn).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
      assert text.count("triton") >= (1 if name == "fwd" else 3), name
