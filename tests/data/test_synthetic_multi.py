"""The opt-in two-image and clip questions (paddle_mm.data.synthetic_multi)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paddle_mm.data import synthetic_multi as multi
from paddle_mm.data.readers import read_llava, read_vqav2


def _kinds(scene):
    return {(o["colour"], o["shape"]) for o in scene["objects"]}


def test_pair_questions_are_answered_by_both_images_together():
    rng = np.random.default_rng(0)
    answers = Counter()
    for _ in range(300):
        a, b, qas = multi.sample_pair(rng)
        by_type = {qa["question_type"]: qa for qa in qas}
        shape = by_type["compare_count"]["question"].removeprefix("which image has more ").removesuffix("s?")
        na, nb = (sum(o["shape"] == shape for o in s["objects"]) for s in (a, b))
        assert na != nb and by_type["compare_count"]["answer"] == ("first" if na > nb else "second")
        colour, kind = by_type["in_both"]["question"].removeprefix("is the ").removesuffix(" in both images?").split()
        in_a, in_b = (colour, kind) in _kinds(a), (colour, kind) in _kinds(b)
        assert by_type["in_both"]["answer"] == ("yes" if in_a and in_b else "no")
        assert in_a or in_b  # a "no" object is in one image: neither image alone answers
        answers.update(qa["answer"] for qa in qas)
    for one, other in (("first", "second"), ("yes", "no")):
        assert abs(answers[one] - answers[other]) < 0.2 * (answers[one] + answers[other])


def test_clip_questions_follow_the_frames():
    rng = np.random.default_rng(1)
    directions = Counter()
    for _ in range(200):
        scenes, qas = multi.sample_clip(rng, frames=4)
        by_type = {qa["question_type"]: qa["answer"] for qa in qas}
        movers = [s["objects"][0] for s in scenes]
        x = [m["bbox"][0] for m in movers]
        y = [m["bbox"][1] for m in movers]
        dx, dy = multi.DIRECTIONS[by_type["motion"]]
        assert np.diff(x).tolist() == [8 * dx] * 3 and np.diff(y).tolist() == [8 * dy] * 3
        assert all(min(m["bbox"]) >= 0 and max(m["bbox"]) <= 47 for m in movers)
        assert len(scenes[0]["objects"]) == 1 and len(scenes[-1]["objects"]) == 2
        shown = [len(s["objects"]) for s in scenes]
        assert shown == sorted(shown)  # once it appears, it stays
        new = scenes[-1]["objects"][1]
        assert new["shape"] == by_type["appears"] != movers[0]["shape"]
        nx0, ny0, nx1, ny1 = new["bbox"]
        for m in movers:  # never overlaps the moving shape
            x0, y0, x1, y1 = m["bbox"]
            assert nx1 < x0 or x1 < nx0 or ny1 < y0 or y1 < ny0
        directions[by_type["motion"]] += 1
    assert set(directions) == set(multi.DIRECTIONS) and min(directions.values()) > 30


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi")
    return out, multi.generate_multi_data(out, 6, 2, 3, seed=0)


def test_files_read_back_through_the_readers(data):
    out, files = data
    samples = read_llava(files["test"]["llava"]).samples
    assert [s.id for s in samples] == [f"test-{k}-{i:05d}" for i in range(3) for k in ("pair", "clip")]
    pair, clip = samples[0], samples[1]
    assert pair.images == [str(out / f"images/test_pairs/0000{k}.png") for k in (0, 1)] and pair.videos == []
    assert clip.images == [str(out / f"videos/test/00000/{f}.png") for f in range(4)] and clip.videos == [(0, 4)]
    assert clip.turns[0][1].startswith("<image>\n<image>\n<image>\n<image>\n")
    questions = read_vqav2(files["test"]["vqa_questions"], files["test"]["vqa_annotations"],
                           image_pattern=multi.pair_image_pattern("test"), prompt_template="<image>\n{question}").samples
    assert len(questions) == 12 and Counter(q.meta["question_type"] for q in questions) == {t: 3 for t in multi.MULTI_TYPES}
    by_id = {q.id: q for q in questions}
    # each evaluation question is one of its record's training-style turns, worded the same way
    for record in (pair, clip):
        first = by_id[str((2 * 0 + (record is clip)) * 10)]
        assert first.images == record.images and first.turns[0][1] == record.turns[0][1]
        assert first.meta["answers"] == [record.turns[1][1]] * 10
    with Image.open(pair.images[0]) as im:
        assert im.size == (48, 48)


def test_deterministic_cached_and_splits_differ(data, tmp_path):
    out, files = data
    again = multi.generate_multi_data(tmp_path, 6, 2, 3, seed=0)
    for split in ("train", "val", "test"):
        for key, path in files[split].items():
            assert Path(path).read_bytes() == Path(again[split][key]).read_bytes(), (split, key)
    assert (out / "videos/train/00000/3.png").read_bytes() == (tmp_path / "videos/train/00000/3.png").read_bytes()
    stamp = Path(again["train"]["llava"]).stat().st_mtime_ns
    multi.generate_multi_data(tmp_path, 6, 2, 3, seed=0)  # cached: nothing rewritten
    assert Path(again["train"]["llava"]).stat().st_mtime_ns == stamp
    train, test = (json.loads(Path(files[s]["llava"]).read_text()) for s in ("train", "test"))
    assert [r["conversations"] for r in train[:6]] != [r["conversations"] for r in test[:6]]
    corpus = Path(files["corpus"]).read_text()
    assert "which shape appears?" in corpus and "<image>" not in corpus and "<video>" not in corpus
