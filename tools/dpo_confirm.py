"""Runs of tools/dpo_experiment.py measured again on fresh held-out scenes that chose nothing.

    python tools/dpo_confirm.py OUT instruct RUN [RUN ...] [--scenes 1000 --seed 7]

Settings compared on a split's figures are chosen by them, so the chosen one's figures there
flatter it. This draws a new test split from another seed (OUT/confirm_data; the runs' train,
val and test splits come from seed 0), evaluates every named run under OUT on it, and prints
and writes OUT/report_confirm.json: each run's figures and its changes from the first one named.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpo_experiment import changes, evaluate  # noqa: E402 (after the path it is found on)


def main() -> None:
    from paddle_mm.data.synthetic import generate_demo_data
    from paddle_mm.eval.hallucination import write_pope_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="dpo_experiment's --out folder")
    ap.add_argument("runs", nargs="+", help="run folders under OUT; the first is the start the others are compared with")
    ap.add_argument("--scenes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=7, help="any but 0, the experiment's own")
    args = ap.parse_args()
    if args.seed == 0:
        ap.error("--seed 0 draws the experiment's own test scenes again")
    data = os.path.join(args.out, "confirm_data")
    generate_demo_data(data, 10, 10, args.scenes, seed=args.seed)  # only its test split is read
    pope = write_pope_file(data, "test")
    figures = {name: evaluate(os.path.join(args.out, name), data, "test", pope,
                              os.path.join(args.out, f"predictions_{name}_confirm.json")) for name in args.runs}
    start = figures[args.runs[0]]
    report = {"scenes": args.scenes, "seed": args.seed, "figures": figures,
              "change": {name: changes(start, figures[name]) for name in args.runs[1:]}}
    with open(os.path.join(args.out, "report_confirm.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report["change"], indent=1))


if __name__ == "__main__":
    main()
