"""The CI-sized demo: the whole pipeline runs (data-parallel training in one process per core),
training lowers the loss, and the model answers better than the best text-only answer to
each question (so it learned to look at the image, not just the answer priors)."""
from __future__ import annotations

import json
import os

from paddle_mm.demo.pipeline import run_demo


def _records(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def _losses(run_dir: str) -> list[float]:
    return [r["loss"] for r in _records(run_dir)]


def test_quick_demo_learns_to_use_the_image(tmp_path):
    out = str(tmp_path / "demo")
    summary = run_demo(out, quick=True)
    saved = json.load(open(os.path.join(out, "summary.json")))
    assert saved == summary
    assert set(summary["vqa_per_type"]) == {"colour", "shape", "count", "position", "presence"}
    for stage in ("pretrain", "instruct"):
        losses = _losses(os.path.join(out, stage))
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        assert last < 0.7 * first, (stage, first, last)
    # Each stage validated on the 20 val scenes every 50 steps, and the held-out loss fell too.
    for stage, steps in (("pretrain", 150), ("instruct", 400)):
        held_out = [r for r in _records(os.path.join(out, stage)) if "eval_loss" in r]
        assert [r["step"] for r in held_out] == list(range(50, steps + 1, 50))
        assert held_out[-1]["eval_loss"] < 0.9 * held_out[0]["eval_loss"], (stage, held_out)  # 0.82, 0.56 here
    assert all(r["eval_answers"] == 20 for r in _records(os.path.join(out, "instruct")) if "eval_loss" in r)
    assert os.path.isfile(os.path.join(out, "curves.png"))
    assert summary["vqa_accuracy"] > summary["prior_vqa_accuracy"] + 0.1, summary
    assert summary["vqa_accuracy"] > summary["blind_vqa_accuracy"] + 0.1, summary
    assert summary["caption"]["CIDEr-D"] > 0.5, summary
