"""Data-parallel training in local processes (gloo on CPU), for the CLI and the demo.

`python -m paddle.distributed.launch ... tools/train.py` is the other way in; both end in
training/loop.train, one process per rank.
"""
from __future__ import annotations

import os
import sys

from paddle_mm.config import Recipe
from paddle_mm.training import distributed
from paddle_mm.training.loop import train


def train_in_processes(recipe: Recipe, processes: int, quiet: bool = False) -> str:
    """Data-parallel training in `processes` local processes (gloo on CPU); returns the run folder."""
    if processes <= 1:
        return train(recipe, quiet)
    import paddle.distributed as dist

    dist.spawn(_spawned_train, args=(recipe, quiet), nprocs=processes, backend="gloo" if distributed.on_cpu() else "auto")
    return recipe.train.output_dir


def _spawned_train(recipe: Recipe, quiet: bool) -> None:
    """A spawned worker: train, wait for every rank, then leave without running destructors.

    Once in a while rank 0 aborted (SIGABRT) while tearing down the gloo context at exit,
    after every file was written (seen once in a 500-step demo stage, not in 30- or 400-step
    repeats); the run is complete by then, so the worker exits directly.
    """
    import paddle.distributed as dist

    train(recipe, quiet)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
