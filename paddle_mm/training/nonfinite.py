"""A non-finite loss: stop and save the state before the step, or skip the batch (train.on_nonfinite).

Stop: nonfinite/step-N/ is a checkpoint of the state before the bad step (the weights not yet
updated, the random states those the step started with, so resuming from it takes exactly
the bad step again), with batch.json naming the step, the loss and the samples.
Skip: the gradients are dropped, the weights stay as they were, the data moves on, and the
batch is appended to nonfinite.jsonl.
"""
from __future__ import annotations

import json
import math
import os
import sys

from paddle_mm.errors import NonFiniteLossError
from paddle_mm.run_folder import NONFINITE_BATCH_FILE, NONFINITE_DIR, NONFINITE_LOG, step_folder
from paddle_mm.training import distributed
from paddle_mm.training.checkpoints import write_checkpoint

# With train.on_nonfinite: skip, this many bad batches in a row still stop the run: the
# weights themselves have gone bad, and skipping would loop over the data for ever.
MAX_NONFINITE_IN_A_ROW = 8


def log_nonfinite(run_dir: str, step: int, loss: float, samples: list[dict]) -> None:
    """Append one skipped batch: the step it would have been (1-based), its loss and samples."""
    with open(os.path.join(run_dir, NONFINITE_LOG), "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step + 1, "loss": repr(loss), "samples": samples}) + "\n")
    print(f"skipped a batch with non-finite loss {loss} at step {step + 1}: "
          f"samples {[s['id'] for s in samples]}", file=sys.stderr)


def save_nonfinite(run_dir: str, model, optimizer, state_before: dict, rng_before: tuple, loss: float,
                   samples: list[dict]) -> str:
    """Save what is needed to look into a non-finite loss (see the module docstring); returns the folder."""
    dest = step_folder(os.path.join(run_dir, NONFINITE_DIR), state_before["step"] + 1)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    batch = {"step": state_before["step"] + 1, "loss": repr(loss), "samples": samples}
    write_checkpoint(dest, model, optimizer, state_before, rng=rng_before, extra_json={NONFINITE_BATCH_FILE: batch})
    return dest


class NonFiniteGuard:
    """Checks each step's loss on every rank; counts bad batches in a row."""

    def __init__(self, cfg, run_dir: str, rank: int, world: int):
        self.cfg, self.run_dir, self.rank, self.world = cfg, run_dir, rank, world
        self.bad_in_a_row = 0

    def skip_step(self, loss: float, samples, before: dict, rng_before: tuple, model, optimizer, stepper) -> bool:
        """False for a finite loss; True when the batch is skipped; raises NonFiniteLossError to stop.

        `samples()` gives the step's sample references; it is only called for a bad step.
        """
        if not distributed.any_rank(not math.isfinite(loss), self.world):
            self.bad_in_a_row = 0
            return False
        refs = samples()
        self.bad_in_a_row += 1
        if self.cfg.on_nonfinite == "skip" and self.bad_in_a_row <= MAX_NONFINITE_IN_A_ROW:
            stepper.clear_grad()  # the weights stay as they were; the data moves on
            if self.rank == 0:
                log_nonfinite(self.run_dir, before["step"], loss, refs)
            return True
        whole = distributed.whole_optimizer(optimizer, self.cfg, self.world)  # every rank takes part
        inspect = ""
        if self.rank == 0:
            inspect = save_nonfinite(self.run_dir, model, whole, before, rng_before, loss, refs)
        distributed.barrier(self.world)
        raise NonFiniteLossError(
            f"non-finite loss {loss} at step {before['step'] + 1}, "
            f"samples {[s['id'] for s in refs]}"
            + (f" ({self.bad_in_a_row} batches in a row)" if self.bad_in_a_row > 1 else "")
            + (f"; state before the step and the batch saved in {inspect}" if self.rank == 0 else ""))
