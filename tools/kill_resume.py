"""Try many SIGKILL points on a tiny training run and count how many resume exactly.

Each trial: start the tiny recipe of tests/kill_harness.py (40 steps, LoRA dropout, a save
every 4 steps) in a fresh folder, SIGKILL it once (at a random step and delay, or at a named
point inside a save), rerun it to the end, and compare every step's loss and learning rate
and the final weights with an uninterrupted run, bit for bit.

    python tools/kill_resume.py --trials 30 --seed 0

Takes about 10 s a trial on 2 cores. Prints one line per trial and a summary.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

import kill_harness as kh  # noqa: E402
import numpy as np  # noqa: E402

from paddle_mm.training.checkpoints import CRASH_POINTS  # noqa: E402
from paddle_mm.weights.tensor_files import load_tensors  # noqa: E402


def demo_data(root: str) -> dict:
    from paddle_mm.data.synthetic import generate_demo_data
    from paddle_mm.data.tokenizer import Tokenizer, training_corpus

    files = generate_demo_data(os.path.join(root, "data"), 20, 4, 10, seed=0)
    tok = Tokenizer.train_bpe(training_corpus([files["corpus"]]), vocab_size=300)
    tok.save(os.path.join(root, "tokenizer"))
    return {"data": os.path.join(root, "data"), "tokenizer": os.path.join(root, "tokenizer", "tokenizer.json")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-point-share", type=float, default=0.3,
                        help="fraction of trials killed at a named point inside a save")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as root:
        data = demo_data(root)
        ref_dir = os.path.join(root, "reference")
        kh.run(kh.train_command(data, ref_dir))
        ref_log = kh.logged(ref_dir)
        ref_weights = load_tensors(os.path.join(ref_dir, "model.safetensors"))
        exact = killed = 0
        for trial in range(args.trials):
            run_dir = os.path.join(root, f"trial{trial}")
            command = kh.train_command(data, run_dir)
            if rng.random() < args.save_point_share:
                point = f"{rng.choice(CRASH_POINTS)}:{rng.randint(1, 3)}"
                how, code = point, kh.run(command, crash_at=point)
            else:
                step, delay = kh.random_kill(rng, 40, 0)
                how, code = f"after step {step} + {delay:.2f} steps", kh.run(command, kill_at_step=step,
                                                                            delay_steps=delay)
            resumed_from = kh.check_checkpoints_complete(run_dir)
            kh.run(command)
            weights = load_tensors(os.path.join(run_dir, "model.safetensors"))
            same = kh.logged(run_dir) == ref_log and all(np.array_equal(weights[n], v) for n, v in ref_weights.items())
            killed += code == -9
            exact += same
            print(f"trial {trial:3d}: kill {how:<28} {'killed' if code == -9 else 'ran to the end'}, "
                  f"resumed from step {resumed_from:2d}: {'exact' if same else 'DIFFERENT'}", flush=True)
        print(f"{killed} of {args.trials} trials killed; {exact} of {args.trials} resumed exactly")
        return 0 if exact == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
