"""`paddle-mm check-data` on a dataset broken in every way it knows: exact counts by reason."""
from __future__ import annotations

import json

import pytest
from PIL import Image
from tiny import recipe_path, tiny_overrides

from paddle_mm.cli import main


def _turns(question: str, answer: str | None = "a red circle") -> list[dict]:
    turns = [{"from": "human", "value": question}]
    return turns + ([{"from": "gpt", "value": answer}] if answer is not None else [])


@pytest.fixture
def corrupted(tmp_path):
    """A LLaVA JSONL file and a caption file with one record for each kind of problem."""
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    for name, colour in (("a.png", "red"), ("b.png", "blue"), ("c.png", "green")):
        Image.new("RGB", (16, 16), colour).save(root / "img" / name)
    whole = (root / "img" / "a.png").read_bytes()
    (root / "img" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "img" / "text.png").write_text("this is not an image")
    Image.new("RGB", (16, 16)).save(tmp_path / "outside.png")
    records = [
        {"id": "good-a", "image": "img/a.png", "conversations": _turns("<image>\nwhat is it?")},
        {"id": "good-b", "image": "img/b.png", "conversations": _turns("<image>\nwhat colour?", "blue")},
        {"id": "missing", "image": "img/nope.png", "conversations": _turns("<image>\nq")},
        {"id": "truncated", "image": "img/truncated.png", "conversations": _turns("<image>\nq")},
        {"id": "not-an-image", "image": "img/text.png", "conversations": _turns("<image>\nq")},
        "BAD JSON",
        {"id": "two-tags", "image": "img/a.png", "conversations": _turns("<image> and <image>\nq")},
        {"id": "no-answer", "image": "img/a.png", "conversations": _turns("<image>\nq", None)},
        {"id": "too-long", "image": "img/a.png", "conversations": _turns("<image>\n" + "describe it " * 200)},
        {"id": "again-a", "image": "img/a.png", "conversations": _turns("<image>\nwhat is it?")},
        {"id": "escapes", "image": "../outside.png", "conversations": _turns("<image>\nq")},
        {"id": "no-conversations", "image": "img/a.png"},
    ]
    lines = ['{"id": "broken", "conversations": [' if r == "BAD JSON" else json.dumps(r) for r in records]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "captions.json").write_text(json.dumps([
        {"image": "img/c.png", "caption": "a green square", "image_id": "cap-c"},
        {"image": "img/gone.png", "caption": "a shape", "image_id": "cap-gone"},
    ]))
    spec = (f"data.train=[{{path: {root}/train.jsonl, format: llava}}, "
            f"{{path: {root}/captions.json, format: caption}}]")
    return root, [spec, "data.max_length=200"]


def _check(demo_data, tmp_path, overrides: list, *args) -> tuple[int, dict]:
    report = tmp_path / "report.json"
    argv = ["check-data", recipe_path(), *tiny_overrides(demo_data, str(tmp_path / "run"), *overrides),
            "--report", str(report), *args]
    code = main(argv)
    return code, json.loads(report.read_text())


def test_check_data_reports_every_problem_exactly(demo_data, corrupted, tmp_path, capsys):
    _, spec = corrupted
    code, report = _check(demo_data, tmp_path, spec)
    counts = {reason: entry["count"] for reason, entry in report["by_reason"].items()}
    assert counts == {"image_missing": 2, "image_unreadable": 2, "bad_json": 1, "tag_mismatch": 1,
                      "no_assistant_turn": 1, "too_long": 1, "image_outside_root": 1, "bad_record": 1,
                      "duplicate": 1}
    assert (report["records"], report["usable"], report["bad"]) == (14, 4, 10)
    assert [(d["records"], d["usable"]) for d in report["datasets"]] == [(12, 3), (2, 1)]
    assert report["bad_fraction"] == pytest.approx(10 / 14) and code == 1 and not report["passed"]
    by = report["by_reason"]
    assert {e["id"] for e in by["image_unreadable"]["examples"]} == {"truncated", "not-an-image"}
    assert by["bad_json"]["examples"][0]["record"] == 5  # 0-based line of the JSONL file
    assert by["duplicate"]["severity"] == "warning" and by["duplicate"]["examples"][0]["id"] == "again-a"
    assert "record 0" in by["duplicate"]["examples"][0]["message"]
    assert "escapes the image root" in by["image_outside_root"]["examples"][0]["message"]
    assert report["tokens"]["over_max_length"] == 1 and report["tokens"]["max"] > 200
    assert report["empty_loss_mask"] == 0
    out = capsys.readouterr().out
    assert "10 bad" in out and "image_unreadable" in out and "truncated.png" in out and "FAILED" in out


def test_check_data_threshold_decides_the_exit_code(demo_data, corrupted, tmp_path):
    _, spec = corrupted
    assert _check(demo_data, tmp_path, spec, "--max-bad-fraction", "0.75")[0] == 0
    assert _check(demo_data, tmp_path, spec, "--max-bad-fraction", "0.7")[0] == 1


def test_check_data_passes_clean_data_and_fails_an_unreadable_file(demo_data, tmp_path):
    d = demo_data["data"]
    code, report = _check(demo_data, tmp_path, [f"data.train=[{{path: {d}/train_llava.json, format: llava}}]"])
    assert code == 0 and report["bad"] == 0 and report["usable"] == 20 and report["passed"]
    code, report = _check(demo_data, tmp_path, [f"data.train=[{{path: {d}/nothing.json, format: llava}}]"])
    assert code == 1 and report["by_reason"]["bad_file"]["count"] == 1 and report["unreadable_files"] == 1


def test_check_data_reads_the_held_out_sets_too(demo_data, tmp_path):
    """data.eval is checked as data.train is, and a held-out sample that repeats a training one
    (a leak that flatters the held-out loss) is reported."""
    d = demo_data["data"]
    held_out = (json.load(open(f"{d}/val_llava.json")) + json.load(open(f"{d}/train_llava.json"))[:1]
                + [{"id": "gone", "image": "images/val/missing.png", "conversations": _turns("<image>\nq")}])
    (tmp_path / "eval.json").write_text(json.dumps(held_out))
    code, report = _check(demo_data, tmp_path, [f"data.train=[{{path: {d}/train_llava.json, format: llava}}]",
                                                f"data.eval=[{{path: {tmp_path}/eval.json, format: llava, "
                                                f"image_root: {d}}}]"])
    assert [(e["split"], e["records"], e["usable"]) for e in report["datasets"]] == [("train", 20, 20),
                                                                                    ("eval", 6, 5)]
    missing = report["by_reason"]["image_missing"]["examples"][0]
    assert missing["path"] == f"{tmp_path}/eval.json" and "missing.png" in missing["message"] and code == 1
    assert report["by_reason"]["duplicate"]["examples"][0]["id"] == "train-00000"


def test_check_data_on_several_images_and_videos(demo_data, tmp_path):
    """Records with two images and with a video folder are usable; a video's bad frame, a video
    folder that is missing, and tags that do not match the images are each reported once."""
    root = tmp_path / "data"
    for k, colour in enumerate(("red", "blue", "green")):
        (root / "clip").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), colour).save(root / "clip" / f"{k}.png")
    (root / "broken_clip").mkdir()
    Image.new("RGB", (16, 16)).save(root / "broken_clip" / "0.png")
    (root / "broken_clip" / "1.png").write_text("not a frame")
    frames = ["clip/0.png", "clip/1.png"]
    records = [
        {"id": "two", "image": frames, "conversations": _turns("<image>\n<image>\nwhich image is red?", "first")},
        {"id": "clip", "video": "clip", "conversations": _turns("<video>\nwhich colour comes last?", "green")},
        {"id": "bad-frame", "video": "broken_clip", "conversations": _turns("which way?", "left")},
        {"id": "no-clip", "video": "gone", "conversations": _turns("<video>\nq")},
        {"id": "three-tags", "image": frames, "conversations": _turns("<image><image><image>\nq")},
    ]
    (root / "multi.json").write_text(json.dumps(records))
    code, report = _check(demo_data, tmp_path, [f"data.train=[{{path: {root}/multi.json, format: llava}}]"])
    counts = {reason: entry["count"] for reason, entry in report["by_reason"].items()}
    assert counts == {"image_unreadable": 1, "image_missing": 1, "tag_mismatch": 1} and code == 1
    assert (report["records"], report["usable"]) == (5, 2)
    by = report["by_reason"]
    assert by["image_unreadable"]["examples"][0]["id"] == "bad-frame"
    assert "broken_clip/1.png" in by["image_unreadable"]["examples"][0]["message"]
    assert "video folder not found: 'gone'" in by["image_missing"]["examples"][0]["message"]
    assert "record 4: 3 <image> tags but 2 images" in by["tag_mismatch"]["examples"][0]["message"]
    # the video's 3 frames take 3 images' tokens: 9 tokens per 48 px demo image
    assert report["tokens"]["max"] >= 3 * 9
