"""Resumable batch inference: every request ends up answered once or in the errors file."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from paddle_mm.config import InferConfig
from paddle_mm.data.image import ImageProcessor
from paddle_mm.errors import DataError
from paddle_mm.inference import requests as infer


def _requests(tmp_path, n: int) -> tuple[str, set, set]:
    """n requests, four of them bad in different ways; returns (path, good ids, bad lines)."""
    good = str(tmp_path / "good.png")
    Image.new("RGB", (8, 8), "red").save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(good, "rb").read()[:40])
    lines = [json.dumps({"id": f"r{i}", "task": "vqa", "image": good, "prompt": f"question {i}?"}) for i in range(n)]
    lines[3] = json.dumps({"id": "r3", "task": "vqa", "image": str(tmp_path / "missing.png"), "prompt": "q"})
    lines[7] = json.dumps({"id": "r7", "task": "vqa", "image": str(truncated), "prompt": "q"})
    lines[12] = '{"id": "r12", "task": '
    lines[25] = json.dumps({"id": "r20", "task": "caption", "image": good})  # r20 again
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path), {f"r{i}" for i in range(n)} - {"r3", "r7", "r12", "r25"}, {4, 8, 13, 26}


def _answers(path: str) -> list[str]:
    """Ids in the output, in order; a last line a kill cut short is not an answer."""
    ids = []
    for line in open(path, encoding="utf-8"):
        try:
            ids.append(json.loads(line)["id"])
        except json.JSONDecodeError:
            assert not line.endswith("\n"), "only the last line may be cut"
    return ids


def test_crash_mid_run_and_rerun_answers_each_request_once(tmp_path, monkeypatch):
    requests, good_ids, bad_lines = _requests(tmp_path, 30)
    output = str(tmp_path / "answers.jsonl")
    calls = {"n": 0, "crash_at": 3}

    def fake_generate(model, tokenizer, samples, processor, cfg):
        calls["n"] += 1
        if calls["n"] == calls["crash_at"]:
            raise KeyboardInterrupt  # the process dies here
        processor([p for s in samples for p in s.images])  # decodes: a truncated image raises
        return {s.id: f"answer to {s.id}" for s in samples}

    monkeypatch.setattr(infer, "generate_answers", fake_generate)
    cfg = InferConfig(batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        infer.run_requests(None, None, ImageProcessor(), cfg, requests, output)
    with open(output, "a") as f:
        f.write('{"id": "r9", "ans')  # a line the kill cut short
    calls["crash_at"] = -1
    counts = infer.run_requests(None, None, ImageProcessor(), cfg, requests, output)
    answered = _answers(output)
    assert sorted(answered) == sorted(good_ids)  # every good request once; r9 answered again
    errors = [json.loads(line) for line in open(output + ".errors.jsonl")]
    assert {e["line"] for e in errors} == bad_lines
    reasons = {e["line"]: e["error"] for e in errors}
    assert "missing.png" in reasons[4] and "truncated.png" in reasons[8]
    assert "invalid JSON" in reasons[13] and "repeats line 21" in reasons[26]
    assert counts["total"] == 30 == counts["answered"] + counts["skipped_done"] + counts["errors"]
    assert counts["skipped_done"] == len(answered) - counts["answered"] > 0
    again = infer.run_requests(None, None, ImageProcessor(), cfg, requests, output)
    assert again == {"total": 30, "answered": 0, "skipped_done": 26, "errors": 4}
    assert len(open(output + ".errors.jsonl").readlines()) == 4  # rewritten, not appended


@pytest.mark.parametrize("content, kept", [(b"", b""), (b'{"a": 1}\n', b'{"a": 1}\n'),
                                           (b'{"a": 1}\n{"b', b'{"a": 1}\n'), (b'{"b', b"")])
def test_drop_cut_line(tmp_path, content, kept):
    path = tmp_path / "out.jsonl"
    path.write_bytes(content)
    infer.drop_cut_line(str(path))
    assert path.read_bytes() == kept


def test_sigkilled_batch_inference_resumes_without_repeating(demo_data, tmp_path):
    from tiny import REPO, make_tiny_recipe

    from paddle_mm.cli import main
    from paddle_mm.training.loop import train

    run = train(make_tiny_recipe(demo_data, str(tmp_path / "run"), "train.max_steps=1", "infer.batch_size=2",
                                 "infer.max_new_tokens=2"), quiet=True)
    requests, good_ids, _ = _requests(tmp_path, 30)
    output = str(tmp_path / "answers.jsonl")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "paddle_mm.cli", "infer", run, "--input", requests,
                             "--output", output], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if os.path.isfile(output) and len(open(output).readlines()) >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "inference finished before it could be killed"
    before = _answers(output)
    assert 4 <= len(before) < len(good_ids)
    assert main(["infer", run, "--input", requests, "--output", output]) == 0
    answered = _answers(output)
    assert answered[: len(before)] == before and sorted(answered) == sorted(good_ids)


def test_a_request_over_several_images_widens_the_prompt_and_keeps_their_order(tmp_path):
    paths = []
    for name in ("a", "b", "c"):
        paths.append(str(tmp_path / f"{name}.png"))
        Image.new("RGB", (8, 8), "red").save(paths[-1])
    cfg = InferConfig(vqa_prompt="<image>\n{question}\nOne word.")
    s = infer.request_to_sample({"id": "q", "task": "vqa", "images": paths[:2], "prompt": "which has more?"}, cfg)
    assert s.images == paths[:2] and s.turns == [("user", "<image>\n<image>\nwhich has more?\nOne word.")]
    s = infer.request_to_sample({"task": "caption", "images": paths}, cfg)
    assert s.turns[0][1].count("<image>") == 3
    chat = {"task": "chat", "images": paths[::-1], "messages": [{"role": "user", "content": "<image> or <image> or <image>?"}]}
    assert infer.request_to_sample(chat, cfg).images == paths[::-1]
    untagged = {"task": "chat", "images": paths[:2], "messages": [{"role": "user", "content": "same?"}]}
    assert infer.request_to_sample(untagged, cfg).turns == [("user", "<image>\n<image>\nsame?")]
    bad = [({"images": paths[:1], "image": paths[0], "prompt": "q"}, "'image' or 'images', not both"),
           ({"images": paths[0], "prompt": "q"}, "'images' must be a list of image paths, got str"),
           ({"images": [paths[0], str(tmp_path / "gone.png")], "prompt": "q"}, "image not found"),
           ({"task": "chat", "images": paths[:2], "messages": [{"role": "user", "content": "<image> q"}]},
            "1 <image> tags but 2 images")]
    for req, cause in bad:
        with pytest.raises(DataError) as info:
            infer.request_to_sample(req, cfg, "reqs.jsonl", 4)
        assert str(info.value).startswith("reqs.jsonl, record 4: ") and cause in str(info.value)
    with pytest.raises(DataError, match=r"^reqs.jsonl, record 4: the prompt template holds 2 <image> tags"):
        infer.request_to_sample({"images": paths, "prompt": "q"}, InferConfig(vqa_prompt="<image><image>{question}"),
                                "reqs.jsonl", 4)


def test_a_request_with_a_video_puts_its_frames_after_the_images_as_one_clip(tmp_path):
    clip = tmp_path / "clip"
    clip.mkdir()
    for name in ("f10.png", "f2.png", "f1.png", "notes.txt"):  # frames in name order, numbers by value
        (clip / name).write_text("x") if name.endswith(".txt") else Image.new("RGB", (8, 8)).save(clip / name)
    image = str(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "red").save(image)
    cfg = InferConfig(vqa_prompt="<image>\n{question}")
    s = infer.request_to_sample({"image": image, "video": str(clip), "prompt": "what moves?"}, cfg)
    assert s.images == [image] + [str(clip / n) for n in ("f1.png", "f2.png", "f10.png")]
    assert s.videos == [(1, 3)] and s.turns == [("user", "<image>\n" * 4 + "what moves?")]
    frames = [str(clip / "f2.png"), str(clip / "f1.png")]  # a list keeps its order
    chat = {"task": "chat", "video": frames, "messages": [{"role": "user", "content": "first <video> then?"}]}
    s = infer.request_to_sample(chat, cfg)
    assert s.images == frames and s.videos == [(0, 2)] and s.turns == [("user", "first <image>\n<image> then?")]
    (tmp_path / "empty").mkdir()
    bad = [({"video": str(tmp_path / "gone"), "prompt": "q"}, "video folder not found"),
           ({"video": str(tmp_path / "empty"), "prompt": "q"}, "holds no frame files"),
           ({"video": [frames[0], str(tmp_path / "gone.png")], "prompt": "q"}, "video frame not found"),
           ({"video": 3, "prompt": "q"}, "'video' must be a folder or a non-empty list of frame files"),
           ({"task": "chat", "video": frames, "messages": [{"role": "user", "content": "<video> <video>"}]},
            "2 <video> tags but 1 videos")]
    for req, cause in bad:
        with pytest.raises(DataError) as info:
            infer.request_to_sample(req, cfg, "reqs.jsonl", 4)
        assert str(info.value).startswith("reqs.jsonl, record 4: ") and cause in str(info.value)
