"""The matrix products of bench_reference.py's steps, one at a time: Paddle's kernel beside PyTorch's.

Run by hand (needs requirements-bench.txt):

    python benchmarks/matmul_kernels.py [--threads 2] [--repeats 20]

Why: matmul and its gradient take about half of the bench's training step and most of a
decode step (benchmarks/profile_step.py). Timing the same products alone says how much of
the gap to PyTorch is the kernels (Paddle's wheel calls MKL 2019's SGEMM, PyTorch's
oneMKL 2024's), which nothing above the kernel call can cut. Each product is y = x W^T with
the weight stored as each framework's Linear stores it; "fwd+bwd" also computes both
gradients from a fixed upstream gradient. Each side runs in its own process (both bundle
MKL and OpenMP). Prints a markdown table, ratio > 1: Paddle faster.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_reference as bench  # noqa: E402

H, V = bench.HIDDEN, bench.VOCAB
VIT_ROWS = bench.BATCH * (bench.IMAGE_TOKENS + 1)  # patches and the class token
LM_ROWS = bench.BATCH * (bench.IMAGE_TOKENS + bench.TEXT_TOKENS)
LABELLED = bench.BATCH * bench.TEXT_TOKENS  # the head runs on these rows only
# (name, rows, in, out, backward too)
SHAPES = [
    ("train: ViT qkv", VIT_ROWS, H, 3 * H, True),
    ("train: ViT fc1", VIT_ROWS, H, bench.FFN_VIT, True),
    ("train: ViT fc2", VIT_ROWS, bench.FFN_VIT, H, True),
    ("train: LM q/k/v/o", LM_ROWS, H, H, True),
    ("train: LM gate/up", LM_ROWS, H, bench.FFN_LM, True),
    ("train: LM down", LM_ROWS, bench.FFN_LM, H, True),
    ("train: LM head", LABELLED, H, V, True),
    ("decode b1: q/k/v/o", 1, H, H, False),
    ("decode b1: gate/up", 1, H, bench.FFN_LM, False),
    ("decode b1: head", 1, H, V, False),
    ("decode b4: gate/up", 4, H, bench.FFN_LM, False),
    ("decode b4: head", 4, H, V, False),
]


def _median_ms(fn, repeats: int) -> float:
    return 1e3 * bench._median_time(fn, repeats, warmup=3)


def _arrays(rows: int, n_in: int, n_out: int):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((rows, n_in), dtype=np.float32), rng.standard_normal((n_out, n_in), dtype=np.float32)
            * 0.05, rng.standard_normal((rows, n_out), dtype=np.float32))


def run_paddle(threads: int, repeats: int) -> dict:
    import paddle
    import paddle.nn.functional as F

    paddle.base.core.set_num_threads(threads)
    out = {}
    for name, rows, n_in, n_out, backward in SHAPES:
        x, w, g = _arrays(rows, n_in, n_out)
        x = paddle.to_tensor(x, stop_gradient=False)
        w = paddle.to_tensor(np.ascontiguousarray(w.T), stop_gradient=False)  # nn.Linear's [in, out]
        g = paddle.to_tensor(g)
        with paddle.no_grad():
            out[name] = {"fwd": _median_ms(lambda: F.linear(x, w), repeats)}
        if backward:
            out[name]["fwd+bwd"] = _median_ms(lambda: paddle.grad([F.linear(x, w)], [x, w], [g]), repeats)
    return out


def run_torch(threads: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    out = {}
    for name, rows, n_in, n_out, backward in SHAPES:
        x, w, g = (torch.from_numpy(a) for a in _arrays(rows, n_in, n_out))  # nn.Linear's [out, in]
        x.requires_grad_(True)
        w.requires_grad_(True)
        with torch.no_grad():
            out[name] = {"fwd": _median_ms(lambda: F.linear(x, w), repeats)}
        if backward:
            out[name]["fwd+bwd"] = _median_ms(lambda: torch.autograd.grad([F.linear(x, w)], [x, w], [g]), repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="threads per side (0: every core)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--side", choices=["paddle", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.threads = args.threads or os.cpu_count() or 1
    if args.side:
        fn = run_paddle if args.side == "paddle" else run_torch
        print(json.dumps(fn(args.threads, args.repeats)))
        return
    sides = {}
    for side in ("paddle", "torch"):
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--side", side, "--threads",
                               str(args.threads), "--repeats", str(args.repeats)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the {side} side failed:\n{done.stderr[-3000:]}")
        sides[side] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n{args.threads} threads per side, median of {args.repeats}; ratio = PyTorch's time / Paddle's\n")
    print("| product | rows x in x out | pass | Paddle (ms) | PyTorch (ms) | Paddle GFLOP/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, rows, n_in, n_out, _ in SHAPES:
        for kind, ours in sides["paddle"][name].items():
            theirs = sides["torch"][name][kind]
            flop = 2 * rows * n_in * n_out * (3 if kind == "fwd+bwd" else 1)
            print(f"| {name} | {rows} x {n_in} x {n_out} | {kind} | {ours:.3f} | {theirs:.3f} | "
                  f"{flop / ours / 1e6:.1f} | {theirs / ours:.2f}x |")


if __name__ == "__main__":
    main()
