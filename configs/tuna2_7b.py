"""Tuna-2 7B: the paper's Qwen2.5-7B backbone (hidden 3584, 28 layers, 28 / 4 heads, untied).

  python -m tuna2_jax.train --config=configs/tuna2_7b.py --workdir=runs/7b
  python -m tuna2_jax.train --config=configs/tuna2_7b.py:runlocal --workdir=/tmp/7b   # 2-step smoke run
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=300000, runlocal=False)
  c = common.base_config("7b", steps=arg.steps, seq_len=16384, batch_size=512)
  if arg.runlocal:  # shrink everything for a smoke run
    c.train.steps, c.data.seq_len, c.data.global_batch_size = 2, 128, 2
  return c
