"""The command line end to end on a tiny trained run: train, infer (single and JSONL), eval."""
from __future__ import annotations

import json
import os

import pytest
from tiny import make_tiny_recipe

from paddle_mm.cli import main
from paddle_mm.training.loop import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, demo_data):
    out = str(tmp_path_factory.mktemp("cli") / "run")
    return train(make_tiny_recipe(demo_data, out, "train.max_steps=2", "infer.max_new_tokens=4"), quiet=True)


def test_train_command_reports_unknown_recipe_key_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 0.1\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "train.learning_rate" in err and "Traceback" not in err


def _library_answer(run_dir, request: dict) -> str:
    """What generate_answers gives for the request, on the run loaded afresh."""
    from paddle_mm.builder import image_processor_for
    from paddle_mm.inference.generate import generate_answers
    from paddle_mm.inference.requests import request_to_sample
    from paddle_mm.run_folder import load_run

    recipe, _, tok, model = load_run(run_dir)
    sample = request_to_sample({"id": "x", **request}, recipe.infer)
    return generate_answers(model, tok, [sample], image_processor_for(recipe), recipe.infer)["x"]


def test_infer_single_image_vqa_and_caption(run_dir, demo_data, capsys):
    image = os.path.join(demo_data["data"], "images", "test", "00000.png")
    question = "how many shapes are there?"
    assert main(["infer", run_dir, "--task", "vqa", "--image", image, "--prompt", question]) == 0
    vqa = capsys.readouterr().out
    assert main(["infer", run_dir, "--task", "caption", "--image", image]) == 0
    caption = capsys.readouterr().out
    # One line each, the library's greedy answer to that request (a 2-step model answers
    # gibberish, but never nothing: it stops only at max_new_tokens 4 or an end token).
    assert vqa == _library_answer(run_dir, {"task": "vqa", "image": image, "prompt": question}) + "\n"
    assert caption == _library_answer(run_dir, {"task": "caption", "image": image}) + "\n"
    assert vqa.strip() and caption.strip()


def test_infer_a_question_over_several_images(run_dir, demo_data, capsys):
    images = [os.path.join(demo_data["data"], "images", "test", f"0000{k}.png") for k in (3, 4)]
    question = "which image has more circles?"
    assert main(["infer", run_dir, "--task", "vqa", "--image", images[0], "--image", images[1],
                 "--prompt", question]) == 0
    out = capsys.readouterr().out
    assert out == _library_answer(run_dir, {"task": "vqa", "images": images, "prompt": question}) + "\n"
    assert out.strip()


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


def _official_accuracy(matches: int) -> float:
    """VQAv2 accuracy by hand: min(1, matches among the other 9 / 3), averaged over the 10
    ways of leaving one annotator out."""
    return sum(min(1.0, (matches - (k < matches)) / 3) for k in range(10)) / 10


def test_eval_command_scores_vqa_and_captions(run_dir, demo_data, tmp_path, capsys):
    from paddle_mm.eval.metrics.caption import caption_report

    d = demo_data["data"]
    common = ["--image-pattern", "images/test/{image_id:05d}.png", "--vqa-normalize", "symmetric"]
    first = tmp_path / "first.json"
    assert main(["eval", run_dir, "--vqa-questions", f"{d}/test_vqa_questions.json",
                 "--vqa-annotations", f"{d}/test_vqa_annotations.json", *common,
                 "--captions", f"{d}/test_captions.json", "--output", str(first)]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(first.read_text())
    assert {k: v for k, v in saved["caption"].items() if k != "predictions"} == printed["caption"]
    # The caption scores are those of the predictions it saved, against the captions file.
    refs = {r["image_id"]: r["caption"] for r in json.load(open(f"{d}/test_captions.json"))}
    assert printed["caption"] == caption_report(refs, saved["caption"]["predictions"])
    assert set(printed["caption"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}

    # The 2-step model answers no question right, so the score of the first run is 0. Give each
    # question annotations made from the answer it saved, matched by 10, 2, 1 or 0 of the 10
    # annotators in turn, and count the accuracy by hand.
    predictions = saved["vqa"]["predictions"]
    assert printed["vqa"]["overall"] == 0.0 and printed["vqa"]["count"] == len(predictions) > 8
    assert "zzz" not in predictions.values()
    annotations = json.load(open(f"{d}/test_vqa_annotations.json"))
    expected, by_type = [], {}
    for k, ann in enumerate(annotations["annotations"]):
        matches = (10, 2, 1, 0)[k % 4]
        answer = predictions[str(ann["question_id"])]
        ann["answers"] = [{"answer": answer if j < matches else "zzz", "answer_id": j + 1} for j in range(10)]
        expected.append(_official_accuracy(matches))
        by_type.setdefault(ann["question_type"], []).append(expected[-1])
    assert _official_accuracy(2) == pytest.approx(0.6) and _official_accuracy(1) == pytest.approx(0.3)
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    second = tmp_path / "second.json"
    assert main(["eval", run_dir, "--vqa-questions", f"{d}/test_vqa_questions.json",
                 "--vqa-annotations", str(tmp_path / "ann.json"), *common, "--output", str(second)]) == 0
    scores = json.loads(capsys.readouterr().out)["vqa"]
    assert json.loads(second.read_text())["vqa"]["predictions"] == predictions  # greedy: the same answers
    assert scores["overall"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    assert scores["count"] == len(expected)
    assert scores["per_type"] == pytest.approx({t: sum(v) / len(v) for t, v in by_type.items()}, abs=1e-12)
    assert scores["percent"]["overall"] == round(100 * sum(expected) / len(expected), 2)


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
