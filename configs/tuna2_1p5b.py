"""Tuna-2 on the Qwen2.5-1.5B backbone (hidden 1536, 28 layers, 12 / 2 heads, tied).

  python -m tuna2_jax.train --config=configs/tuna2_1p5b.py --workdir=runs/1p5b
  python -m tuna2_jax.train --config=configs/tuna2_1p5b.py:runlocal --workdir=/tmp/1p5b   # 2-step smoke run
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=300000, runlocal=False)
  c = common.base_config("1p5b", steps=arg.steps, seq_len=16384, batch_size=256)
  if arg.runlocal:  # shrink everything for a smoke run
    c.train.steps, c.data.seq_len, c.data.global_batch_size = 2, 128, 2
  return c
