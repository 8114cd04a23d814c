"""Smallest Tuna-2: two layers of width 64, for tests and smoke runs.

  python -m tuna2_jax.train --config=configs/tuna2_debug.py --workdir=runs/debug
  python -m tuna2_jax.train --config=configs/tuna2_debug.py:runlocal --workdir=/tmp/debug   # 2-step smoke run
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=20, runlocal=False)
  c = common.base_config("debug", steps=arg.steps, seq_len=256, batch_size=4)
  if arg.runlocal:  # shrink everything for a smoke run
    c.train.steps, c.data.seq_len, c.data.global_batch_size = 2, 128, 2
  return c
