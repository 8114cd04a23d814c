"""Tiny Tuna-R (the encoder-based variant) on the shapes data; trains on a laptop CPU.

Every image, clean or noised, goes through a small SigLIP-shaped ViT and the connector instead of the patch
embedding; the TIME slot, the decoder and the flow head are Tuna-2's.

  python -m tuna2_jax.train --config=configs/tuna_r_tiny.py --workdir=runs/tuna_r_tiny
  python -m tuna2_jax.train --config=configs/tuna_r_tiny.py:runlocal --workdir=/tmp/tuna_r_tiny   # smoke run
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=2000, runlocal=False)
  c = common.base_config("tiny", steps=arg.steps, seq_len=512, batch_size=16)
  c.model.update(common.vision_config("tiny"))
  if arg.runlocal:  # shrink everything for a smoke run
    c.train.steps, c.data.seq_len, c.data.global_batch_size = 2, 128, 2
  return c
