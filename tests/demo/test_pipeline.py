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


def test_the_multi_variant_adds_its_conversations_to_the_instruct_stage_only(tmp_path):
    from paddle_mm.demo.pipeline import format_summary, stage_recipe

    out = str(tmp_path / "demo")
    d = os.path.join(out, "data")
    plain, multi = stage_recipe("instruct", out, []), stage_recipe("instruct", out, [], multi=True)
    assert [s.path for s in plain.data.train] == [f"{d}/train_llava.json"]
    assert [s.path for s in multi.data.train] == [f"{d}/train_llava.json", f"{d}/train_multi_llava.json"]
    assert [s.path for s in multi.data.eval] == [f"{d}/val_llava.json", f"{d}/val_multi_llava.json"]
    assert stage_recipe("pretrain", out, [], multi=True).data.train == stage_recipe("pretrain", out, []).data.train
    summary = {"vqa_accuracy": 0.9, "vqa_per_type": {"count": 1.0}, "blind_vqa_accuracy": 0.2,
               "blind_per_type": {"count": 0.3}, "prior_vqa_accuracy": 0.3, "prior_per_type": {"count": 0.3},
               "caption": {"CIDEr-D": 9.0}, "num_test_questions": 1, "num_test_images": 1, "wall_time_s": 1.0,
               "multi": {"vqa_accuracy": 0.7, "per_type": {"motion": 0.8}, "blind_vqa_accuracy": 0.25,
                         "blind_per_type": {"motion": 0.25}, "prior_vqa_accuracy": 0.3,
                         "prior_per_type": {"motion": 0.26}}}
    text = format_summary(summary)
    assert "0.700 / 0.250 / 0.300" in text and "motion" in text and "0.800 / 0.250 / 0.260" in text
    del summary["multi"]
    assert "motion" not in format_summary(summary)


def test_the_qwen2_vl_variant_trains_a_qwen2_vl_in_the_same_two_stages(tmp_path, monkeypatch):
    from PIL import Image

    from paddle_mm import builder, cli
    from paddle_mm.demo import pipeline
    from paddle_mm.demo.pipeline import PIPELINES, stage_recipe

    out = str(tmp_path / "demo")
    d = os.path.join(out, "data")
    assert PIPELINES["qwen2-vl"][1] == PIPELINES["mlp"][1]
    recipe = stage_recipe("instruct", out, [], "qwen2-vl", multi=True)
    assert recipe.model.family == "qwen2_vl" and recipe.train.init_from == os.path.join(out, "pretrain")
    assert [s.path for s in recipe.data.train] == [f"{d}/train_llava.json", f"{d}/train_multi_llava.json"]
    scene = tmp_path / "scene.png"
    Image.new("RGB", (48, 48)).save(scene)
    # a 48 px scene becomes 84 x 84: 6 x 6 patches, 9 merged tokens (one per cell, as the MLP demo's)
    assert builder.image_processor_for(recipe).image_token_counts([str(scene)]) == [9]
    calls = []
    monkeypatch.setattr(pipeline, "run_demo", lambda out, **kw: calls.append(kw))
    cli.main(["demo", "--out", out, "--multi", "--family", "qwen2-vl"])
    cli.main(["demo", "--out", out])
    assert [(c["pipeline"], c["multi"]) for c in calls] == [("qwen2-vl", True), ("mlp", False)]
