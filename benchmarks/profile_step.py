"""Where the time of bench_reference.py's steps goes: paddle.profiler's operator summary (CPU).

    python benchmarks/profile_step.py [--what train|generate|packed] [--steps 2] [--top 25] [--batch 4]

The same model and inputs as bench_reference.py's paddle_mm side (one warm-up step first, so
the summary holds steady-state work). Prints the operators sorted by total CPU time.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_reference as bench  # noqa: E402


def workload(what: str, batch: int = 1):
    import paddle

    from paddle_mm.data.dataset import collate
    from paddle_mm.data.packing import pack
    from paddle_mm.model import mean_nll
    from paddle_mm.runtime import copying_views
    from paddle_mm.training.batches import batch_inputs

    model = bench.paddle_model()
    rng = np.random.default_rng(0)
    if what == "generate":
        model.eval()
        ids, pix = bench._prompt(rng, batch)
        ids, pix = paddle.to_tensor(ids), paddle.to_tensor(pix)
        return lambda: model.generate(ids, None, pix, max_new_tokens=bench.NEW_TOKENS, eos_token_id=None)
    model.train()
    opt = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters())
    if what == "train":
        ids, labels, pixels = (paddle.to_tensor(x) for x in bench._train_inputs(rng))
        mask = paddle.ones_like(ids)
        inputs = [dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)]
    else:
        lengths = bench.mixed_lengths(np.random.default_rng(1), 16)
        items = [{"id": i, "input_ids": rng.integers(0, bench.IMAGE_ID - 1, size=n),
                  "labels": rng.integers(0, bench.IMAGE_ID - 1, size=n), "pixel_values": None}
                 for i, n in enumerate(lengths)]
        batches = [pack(items, 0, 1024)] if what == "packed" else [collate(items[i: i + 4], 0)
                                                                   for i in range(0, len(items), 4)]
        inputs = [dict(batch_inputs(b), labels=paddle.to_tensor(b["labels"])) for b in batches]

    @copying_views()  # as the training loop runs a step
    def step():
        for kw in inputs:
            token_nll, _ = model(**kw)
            mean_nll(token_nll, kw["labels"]).backward()
            opt.step()
            opt.clear_grad()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", choices=["train", "generate", "packed", "padded"], default="train")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch", type=int, default=1, help="--what generate: prompts per generation (the bench's 1 and 4)")
    args = ap.parse_args()
    import paddle.profiler as profiler

    from paddle_mm.runtime import configure_cpu

    configure_cpu(args.threads)
    run = workload(args.what, args.batch)
    run()  # warm-up
    prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU], on_trace_ready=lambda _: None)  # no trace file
    prof.start()
    for _ in range(args.steps):
        run()
        prof.step()
    prof.stop()
    prof.summary(sorted_by=profiler.SortedKeys.CPUTotal, op_detail=False, thread_sep=False, time_unit="ms",
                 views=[profiler.SummaryView.OperatorView])


if __name__ == "__main__":
    main()
