"""Learning rate x flow-loss weight on the tiny Tuna-2 (3 x 3 = 9 runs).

  python -m launch.sweep --sweep=configs/sweeps/lr_flow.py --launcher=local --root=runs/sweeps
  python -m launch.sweep --sweep=configs/sweeps/lr_flow.py --summarize --metric=loss

The flow loss is larger than the text loss early on (pixel v-loss on noised patches); its weight trades
generation against understanding, and the best lr moves with it, hence a grid rather than two 1-D sweeps.
"""

from configs.sweeps import grid

CONFIG = "configs/tuna2_tiny.py"


def sweep():
  yield from grid.product({"optim.lr": [1e-4, 3e-4, 1e-3], "train.flow_loss_weight": [0.5, 1.0, 2.0]},
                          train__steps=2000)
