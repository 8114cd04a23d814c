"""Tuna-R 7B: Qwen2.5-7B + SigLIP2-So400M/16 (26 of 27 layers, 32 x 32 position table) + the connector.

As the release's Tuna-R: the encoder reads clean and noised pixels alike, positions resized bicubically
(SigLIP's interpolate_pos_encoding). Initialise the encoder from HF weights with
`tuna2_jax.convert.siglip2.import_siglip` (its position table is 24 x 24 at 384 px: resize it, or set
model.vision_pos_grid=24), or load the whole model from the release with `tuna2_jax.convert.official`.

  python -m tuna2_jax.train --config=configs/tuna_r_7b.py --workdir=runs/tuna_r_7b
  python -m tuna2_jax.train --config=configs/tuna_r_7b.py:runlocal --workdir=/tmp/tuna_r_7b   # smoke run
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=300000, runlocal=False)
  c = common.base_config("7b", steps=arg.steps, seq_len=16384, batch_size=512)
  c.model.update(common.vision_config("so400m"))
  if arg.runlocal:  # shrink everything for a smoke run
    c.train.steps, c.data.seq_len, c.data.global_batch_size = 2, 128, 2
  return c
