"""Tests of the synthetic demo dataset generator (paddle_mm.data.synthetic)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paddle_mm.data import synthetic as syn

FILE_KEYS = ("llava", "captions", "vqa_questions", "vqa_annotations", "scenes")


def _load(paths, key):
    return json.loads(Path(paths[key]).read_text(encoding="utf-8"))


def _tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return out, syn.generate_split(out, "test", 50, seed=3)


@pytest.fixture(scope="module")
def big_train(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn_big")
    return out, syn.generate_split(out, "train", 200, seed=7)


def _at(pos: str) -> str:
    return "in the center" if pos == "center" else f"at the {pos}"


def _expected_answer(qtype: str, question: str, objs: list[dict]) -> str:
    """Recompute an answer from the scene and assert the question has exactly one referent."""
    if qtype == "count":
        assert question == "how many shapes are there?"
        return str(len(objs))
    if qtype == "colour":
        shape = question.removeprefix("what colour is the ").removesuffix("?")
        hits = [o for o in objs if o["shape"] == shape]
        assert len(hits) == 1, question
        return hits[0]["colour"]
    if qtype == "shape":
        hits = [o for o in objs if question == f"what shape is {_at(o['position'])}?"]
        assert len(hits) == 1, question
        return hits[0]["shape"]
    if qtype == "position":
        colour, shape = question.removeprefix("where is the ").removesuffix("?").split(" ")
        hits = [o for o in objs if (o["colour"], o["shape"]) == (colour, shape)]
        assert len(hits) == 1, question
        return hits[0]["position"]
    assert qtype == "presence"
    colour, shape = question.removeprefix("is there a ").removesuffix("?").split(" ")
    assert colour in syn.COLOURS and shape in syn.SHAPES
    return "yes" if any((o["colour"], o["shape"]) == (colour, shape) for o in objs) else "no"


def test_deterministic_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    syn.generate_split(a, "train", 20, seed=5)
    syn.generate_split(b, "train", 20, seed=5)
    ta, tb = _tree_bytes(a), _tree_bytes(b)
    assert len(ta) == 20 + 5 and ta == tb


def test_seeds_and_splits_differ(tmp_path):
    base = _load(syn.generate_split(tmp_path / "a", "train", 20, seed=5), "scenes")
    other_seed = _load(syn.generate_split(tmp_path / "b", "train", 20, seed=6), "scenes")
    assert [s["objects"] for s in base] != [s["objects"] for s in other_seed]
    png_a = (tmp_path / "a/images/train/00000.png").read_bytes()
    png_b = (tmp_path / "b/images/train/00000.png").read_bytes()
    assert png_a != png_b
    # Same seed, other split name: different files names and ids, different captions layout.
    val = syn.generate_split(tmp_path / "a", "val", 20, seed=5)
    assert Path(val["llava"]).read_bytes() != (tmp_path / "a/train_llava.json").read_bytes()


def test_file_layouts(test_split):
    out, paths = test_split
    assert set(FILE_KEYS) <= set(paths)
    llava = _load(paths, "llava")
    assert len(llava) == 50
    for i, rec in enumerate(llava):
        assert set(rec) == {"id", "image", "conversations"}
        assert rec["id"] == f"test-{i:05d}" and rec["image"] == f"images/test/{i:05d}.png"
        assert (out / rec["image"]).is_file()
        conv = rec["conversations"]
        assert len(conv) % 2 == 0 and 10 <= len(conv) <= 12  # 4-5 questions + the caption request
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in conv[1:])
    caps = _load(paths, "captions")
    for i, rec in enumerate(caps):
        assert set(rec) == {"image", "caption", "image_id"}
        assert rec["image_id"] == f"test-{i:05d}"
        assert isinstance(rec["caption"], list) and len(rec["caption"]) == 1  # test layout
    qs = _load(paths, "vqa_questions")["questions"]
    anns = _load(paths, "vqa_annotations")["annotations"]
    assert len(qs) == len(anns) == sum(len(r["conversations"]) // 2 - 1 for r in llava)
    assert len({q["question_id"] for q in qs}) == len(qs)
    pattern = syn.vqa_image_pattern("test")
    for q, a in zip(qs, anns):
        assert set(q) == {"image_id", "question", "question_id"}
        assert isinstance(q["image_id"], int) and q["question_id"] // 10 == q["image_id"]
        assert (out / pattern.format(image_id=q["image_id"])).is_file()
        assert a["question_id"] == q["question_id"] and a["image_id"] == q["image_id"]
        assert a["question_type"] in syn.QUESTION_TYPES
        assert a["answer_type"] == {"count": "number", "presence": "yes/no"}.get(a["question_type"], "other")
        assert len(a["answers"]) == 10
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert all(x["answer"] == a["multiple_choice_answer"] and x["answer_confidence"] == "yes"
                   for x in a["answers"])


def test_train_captions_are_strings(tmp_path):
    caps = _load(syn.generate_split(tmp_path, "train", 5, seed=1), "captions")
    assert all(isinstance(c["caption"], str) for c in caps)


def test_questions_unambiguous_and_answers_match(test_split):
    _, paths = test_split
    scenes = _load(paths, "scenes")
    llava = _load(paths, "llava")
    anns = {a["question_id"]: a for a in _load(paths, "vqa_annotations")["annotations"]}
    qs = _load(paths, "vqa_questions")["questions"]
    types = Counter()
    for q in qs:
        a = anns[q["question_id"]]
        objs = scenes[q["image_id"]]["objects"]
        assert _expected_answer(a["question_type"], q["question"], objs) == a["multiple_choice_answer"]
        types[a["question_type"]] += 1
    assert set(types) == set(syn.QUESTION_TYPES)
    for rec, scene in zip(llava, scenes):
        objs = scene["objects"]
        assert 1 <= len(objs) <= 3
        assert len({(o["row"], o["col"]) for o in objs}) == len(objs)  # distinct cells
        asked = [t["value"].removeprefix("<image>\n") for t in rec["conversations"][::2]]
        answered = [t["value"] for t in rec["conversations"][1::2]]
        # The questions in their order, with the caption request inserted at one turn.
        k = asked.index(syn.CAPTION_PROMPT)
        assert answered[k] == scene["caption"]
        assert asked[:k] + asked[k + 1:] == [qa["question"] for qa in scene["qas"]]
        # One question per type; colour is the only type that may be impossible.
        img_types = [qa["question_type"] for qa in scene["qas"]]
        assert len(img_types) == len(set(img_types))
        assert set(syn.QUESTION_TYPES) - set(img_types) <= {"colour"}


def test_presence_balanced(big_train):
    _, paths = big_train
    anns = _load(paths, "vqa_annotations")["annotations"]
    pres = Counter(a["multiple_choice_answer"] for a in anns if a["question_type"] == "presence")
    assert sum(pres.values()) == 200 and set(pres) == {"yes", "no"}
    assert 70 <= pres["yes"] <= 130


def test_pixels_and_sizes(test_split):
    out, paths = test_split
    for scene in _load(paths, "scenes"):
        img = Image.open(out / scene["image"])
        assert img.size == (48, 48) and img.mode == "RGB"
        px = np.asarray(img).astype(int)
        for o in scene["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            assert o["col"] * 16 <= x0 <= x1 < (o["col"] + 1) * 16
            assert o["row"] * 16 <= y0 <= y1 < (o["row"] + 1) * 16
            assert 0.65 * 16 - 1 <= x1 - x0 + 1 <= 0.9 * 16 + 1
            centre = px[o["row"] * 16 + 8, o["col"] * 16 + 8]
            assert np.abs(centre - np.array(syn.COLOURS[o["colour"]])).max() <= 15
        # An empty cell shows only the noisy light-gray background.
        used = {(o["row"], o["col"]) for o in scene["objects"]}
        for r in range(3):
            for c in range(3):
                if (r, c) not in used:
                    patch = px[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16]
                    assert np.abs(patch - syn.BACKGROUND).max() <= 8


def test_caption_reading_order(test_split):
    _, paths = test_split
    for scene in _load(paths, "scenes"):
        objs = scene["objects"]
        assert [(o["row"], o["col"]) for o in objs] == sorted((o["row"], o["col"]) for o in objs)
        parts = [f"a {o['colour']} {o['shape']} {_at(o['position'])}" for o in objs]
        expected = {1: "{}", 2: "{} and {}", 3: "{}, {} and {}"}[len(parts)].format(*parts)
        assert scene["caption"] == expected


def test_caption_examples():
    scene = {"objects": [
        {"colour": "red", "shape": "circle", "position": "top left"},
        {"colour": "blue", "shape": "square", "position": "center"},
        {"colour": "green", "shape": "triangle", "position": "bottom right"}]}
    assert syn.caption(scene) == ("a red circle at the top left, a blue square in the center "
                                  "and a green triangle at the bottom right")
    assert syn.caption({"objects": scene["objects"][:1]}) == "a red circle at the top left"


def test_unsupported_grid_raises(tmp_path):
    with pytest.raises(ValueError):
        syn.generate_split(tmp_path, "train", 2, seed=0, grid=4)


def test_demo_data_and_cache(tmp_path):
    res = syn.generate_demo_data(tmp_path, 20, 10, 10, seed=2)
    for split in ("train", "val", "test"):
        assert all(Path(res[split][k]).is_file() for k in FILE_KEYS)
    assert len(_load(res["train"], "llava")) == 20 and len(_load(res["val"], "llava")) == 10
    # Splits use distinct seeds, so their first scenes differ.
    firsts = [json.dumps(_load(res[s], "scenes")[0]["objects"]) for s in ("train", "val", "test")]
    assert len(set(firsts)) == 3
    corpus = Path(res["corpus"]).read_text(encoding="utf-8").splitlines()
    scenes = _load(res["train"], "scenes")
    assert len(corpus) == sum(1 + 2 * len(s["qas"]) for s in scenes)
    assert scenes[0]["caption"] in corpus and "<image>" not in "".join(corpus)
    manifest = json.loads(Path(res["manifest"]).read_text())
    assert manifest["num_train"] == 20 and manifest["seed"] == 2
    # Same parameters: cached, nothing is rewritten.
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert syn.generate_demo_data(tmp_path, 20, 10, 10, seed=2) == res
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before
    # Other parameters: regenerated.
    syn.generate_demo_data(tmp_path, 30, 10, 10, seed=2)
    assert len(_load(res["train"], "llava")) == 30
    assert json.loads(Path(res["manifest"]).read_text())["num_train"] == 30


def _content_digest(root: Path) -> str:
    """sha256 over every file's name and content, a PNG's by its decoded pixels (so a zlib build
    that compresses differently does not count as a change to the data)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(np.asarray(Image.open(p)).tobytes() if p.suffix == ".png" else p.read_bytes())
    return h.hexdigest()


def test_default_demo_data_is_what_it_was(tmp_path):
    """The demo's figures rest on these files: the multi-image and clip questions are opt-in
    (data/synthetic_multi.py), so generate_demo_data writes exactly what it wrote before them
    (digest taken at commit 6fa70cd, before they were added)."""
    syn.generate_demo_data(tmp_path, 12, 4, 4, seed=0)
    assert _content_digest(tmp_path) == "d150752350ee79bf2dff82002f68758189e7876e08c92ce85f18005e73647fc0"
