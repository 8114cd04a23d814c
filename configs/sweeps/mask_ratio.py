"""Masked visual feature learning on the tiny Tuna-2: off, the paper's form at 3 ratios, the release's form.

  python -m launch.sweep --sweep=configs/sweeps/mask_ratio.py --launcher=local --root=runs/sweeps

Fields (configs/common.py, train.*): in the last mask_last_fraction of training a document is masked with
probability mask_prob, a ratio r ~ U(mask_ratio_min, mask_ratio_max) of each image's patches (none if r <= 0).
Compare understanding eval metrics, not the training loss (masking makes the training task harder).
"""

from configs.sweeps import grid

CONFIG = "configs/tuna2_tiny.py"


def sweep():
  yield {"train.steps": 2000, "train.mask_prob": 0.0}  # no masking
  # The paper's form: the last 40% of training, half the documents, U(0, max) of the patches.
  yield from grid.product({"train.mask_ratio_max": [0.25, 0.5, 0.75]}, train__steps=2000,
                          train__mask_last_fraction=0.4, train__mask_prob=0.5, train__mask_ratio_min=0.0)
  # The release's form: all of training, every document, r ~ U(-0.7, 0.3) (masked ~21% of the time).
  yield {"train.steps": 2000, "train.mask_last_fraction": 1.0, "train.mask_prob": 1.0,
         "train.mask_ratio_min": -0.7, "train.mask_ratio_max": 0.3}
