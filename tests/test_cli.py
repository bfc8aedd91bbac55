"""The command line end to end on a tiny trained run: train, infer (single and JSONL), eval."""
from __future__ import annotations

import glob
import json
import os

import pytest
from tiny import make_tiny_recipe

from paddle_mm.cli import main
from paddle_mm.config import Recipe
from paddle_mm.recipe import load_recipe
from paddle_mm.training.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, demo_data):
    out = str(tmp_path_factory.mktemp("cli") / "run")
    return train(make_tiny_recipe(demo_data, out, "train.max_steps=2", "infer.max_new_tokens=4"), quiet=True)


def test_every_bundled_recipe_loads_and_validates():
    recipes = sorted(glob.glob(os.path.join(REPO, "recipes", "**", "*.yaml"), recursive=True))
    assert recipes
    for path in recipes:
        load_recipe(path, Recipe)


def test_train_command_reports_unknown_recipe_key_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "train.learning_rate" in err and "Traceback" not in err


def test_infer_single_image_vqa_and_caption(run_dir, demo_data, capsys):
    image = os.path.join(demo_data["data"], "images", "test", "00000.png")
    assert main(["infer", run_dir, "--task", "vqa", "--image", image, "--prompt", "how many shapes are there?"]) == 0
    assert capsys.readouterr().out.count("\n") == 1  # one answer line (a 2-step model may say little)
    assert main(["infer", run_dir, "--task", "caption", "--image", image]) == 0
    assert capsys.readouterr().out.count("\n") == 1


def test_infer_missing_image_is_a_clear_error(run_dir, capsys):
    assert main(["infer", run_dir, "--task", "vqa", "--image", "nope.png", "--prompt", "q"]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_infer_jsonl_appends_skips_answered_and_records_errors(run_dir, demo_data, tmp_path, capsys):
    image = os.path.join(demo_data["data"], "images", "test", "00001.png")
    requests = tmp_path / "req.jsonl"
    lines = [
        {"id": "a", "task": "vqa", "image": image, "prompt": "what shape is at the center?"},
        {"id": "b", "task": "caption", "image": image},
        {"id": "c", "task": "chat", "image": image,
         "messages": [{"role": "user", "content": "how many shapes are there?"},
                      {"role": "assistant", "content": "2"}, {"role": "user", "content": "is there a red circle?"}]},
        {"id": "d", "task": "vqa", "image": "missing.png", "prompt": "q"},
    ]
    requests.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    out = tmp_path / "answers.jsonl"
    assert main(["infer", run_dir, "--input", str(requests), "--output", str(out)]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts == {"total": 5, "answered": 3, "skipped_done": 0, "errors": 2}
    answered = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert answered == ["a", "b", "c"]
    errors = [json.loads(x) for x in open(str(out) + ".errors.jsonl")]
    assert "missing.png" in errors[0]["error"] and errors[1]["line"] == 5
    # A rerun answers nothing again: everything in = answered + errors.
    assert main(["infer", run_dir, "--input", str(requests), "--output", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["skipped_done"] == 3
    assert len(out.read_text().splitlines()) == 3


def test_eval_command_scores_vqa_and_captions(run_dir, demo_data, tmp_path, capsys):
    d = demo_data["data"]
    report = tmp_path / "report.json"
    argv = ["eval", run_dir, "--vqa-questions", f"{d}/test_vqa_questions.json",
            "--vqa-annotations", f"{d}/test_vqa_annotations.json",
            "--image-pattern", "images/test/{image_id:05d}.png", "--captions", f"{d}/test_captions.json",
            "--output", str(report)]
    assert main(argv) == 0
    scores = json.loads(capsys.readouterr().out)
    assert 0.0 <= scores["vqa"]["overall"] <= 1.0
    assert set(scores["vqa"]["per_type"]) <= {"colour", "shape", "count", "position", "presence"}
    assert {"BLEU-4", "ROUGE-L", "CIDEr-D"} <= set(scores["caption"])
    saved = json.loads(report.read_text())
    assert len(saved["vqa"]["predictions"]) == scores["vqa"]["count"]


def test_chat_reads_turns_from_stdin_and_keeps_history(run_dir, demo_data, capsys, monkeypatch):
    import io

    image = os.path.join(demo_data["data"], "images", "test", "00002.png")
    monkeypatch.setattr("sys.stdin", io.StringIO("how many shapes are there?\n\nis there a red circle?\n"))
    assert main(["infer", run_dir, "--task", "chat", "--image", image]) == 0
    assert capsys.readouterr().out.count("\n") == 2  # one answer per non-blank user line


def test_convert_family_choices_are_the_weight_families():
    from paddle_mm.cli import build_parser
    from paddle_mm.weights.families import FAMILIES

    convert = next(a for a in build_parser()._subparsers._group_actions[0].choices["convert"]._actions
                   if a.dest == "family")
    assert convert.choices == list(FAMILIES)


def test_eval_vqa_normalize_choices_are_the_metric_modes():
    from paddle_mm.cli import build_parser
    from paddle_mm.eval.metrics.vqa import NORMALIZE_MODES

    eval_ = next(a for a in build_parser()._subparsers._group_actions[0].choices["eval"]._actions
                 if a.dest == "vqa_normalize")
    assert eval_.choices == list(NORMALIZE_MODES) and eval_.default == "official"
