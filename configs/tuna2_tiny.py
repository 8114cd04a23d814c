"""Tiny Tuna-2 on the shapes data; trains on a laptop CPU.

  python -m tuna2_jax.train --config=configs/tuna2_tiny.py --workdir=runs/tiny
  python -m tuna2_jax.train --config=configs/tuna2_tiny.py:runlocal --workdir=/tmp/tiny   # 2-step smoke run
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=2000, runlocal=False)
  c = common.base_config("tiny", steps=arg.steps, seq_len=512, batch_size=16)
  if arg.runlocal:  # shrink everything for a smoke run
    c.train.steps, c.data.seq_len, c.data.global_batch_size = 2, 128, 2
  return c
