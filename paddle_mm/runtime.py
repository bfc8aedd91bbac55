"""Process-wide settings: CPU threads and random seeds."""
from __future__ import annotations

import os
import random

import numpy as np
import paddle


def configure_cpu(num_threads: int = 0) -> int:
    """Use all cores (or num_threads) for Paddle's CPU kernels.

    Importing paddle pins OpenMP to one thread unless OMP_NUM_THREADS was set; on 2 cores this
    alone was measured to make a training step about 1.5-3x slower (docs/ARCHITECTURE.md, "the machine").
    """
    n = num_threads or os.cpu_count() or 1
    if paddle.device.get_device() == "cpu":
        paddle.base.core.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)
