"""Tuna-2 (pixel patch embedding) vs Tuna-R (a ViT encoder in front of the decoder), same data and steps.

  python -m launch.sweep --sweep=configs/sweeps/tuna2_vs_tuna_r.py --launcher=local --root=runs/sweeps

The paper: Tuna-R converges faster early, Tuna-2 catches up and wins at scale; two seeds each show whether
the early gap is larger than the seed noise. "config" in a run dict replaces the sweep's CONFIG.
"""

from configs.sweeps import grid

CONFIG = "configs/tuna2_tiny.py"


def sweep():
  yield from grid.product({"config": ["configs/tuna2_tiny.py", "configs/tuna_r_tiny.py"],
                           "train.seed": [0, 1]}, train__steps=2000)
