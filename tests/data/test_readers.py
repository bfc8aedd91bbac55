import json

import pytest
from files import png, write_json

from paddle_mm.data.readers import (
    IMAGE_TOKEN,
    ReadResult,
    Sample,
    read_captions,
    read_chatml,
    read_dataset,
    read_llava,
    read_vqav2,
)
from paddle_mm.errors import DataError


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def conv(*pairs):
    out = []
    for role, text in pairs:
        out.append({"from": role, "value": text})
    return out


@pytest.fixture
def root(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    png(tmp_path / "sub" / "c.png")
    return tmp_path


def raises(fn, *fragments):
    with pytest.raises(DataError) as info:
        fn()
    for frag in fragments:
        assert frag in str(info.value), (frag, str(info.value))
    return info.value


# ----------------------------------------------------------------------------- LLaVA
def test_llava_happy_path(root):
    data = [
        {"id": "x1", "image": "a.png",
         "conversations": conv(("human", "<image>\nWhat is it?"), ("gpt", "A square."),
                               ("human", "Colour?"), ("gpt", "Red."))},
        {"id": "x2", "image": ["a.png", "sub/c.png"],
         "conversations": conv(("human", "<image> and <image>: same?"), ("gpt", "Yes."))},
        {"conversations": conv(("user", "Hi"), ("assistant", "Hello"))},  # text-only, no id
    ]
    res = read_llava(write_json(root / "train.json", data))
    assert isinstance(res, ReadResult) and res.skipped == []
    s1, s2, s3 = res.samples
    assert isinstance(s1, Sample)
    assert s1.id == "x1" and s1.index == 0 and s1.source == str(root / "train.json")
    assert s1.turns == [("user", "<image>\nWhat is it?"), ("assistant", "A square."),
                        ("user", "Colour?"), ("assistant", "Red.")]
    assert s1.images == [str(root / "a.png")]
    assert s2.images == [str(root / "a.png"), str(root / "sub" / "c.png")]
    assert s3.id == "train-2" and s3.images == [] and s3.turns[0] == ("user", "Hi")


def test_llava_missing_tag_convention(root):
    data = [{"id": "x", "image": "a.png", "conversations": conv(("human", "What?"), ("gpt", "Red."))}]
    (s,) = read_llava(write_json(root / "d.json", data)).samples
    assert s.turns[0] == ("user", IMAGE_TOKEN + "\nWhat?")


def test_llava_system_turn_kept_in_meta(root):
    data = [{"conversations": [{"from": "system", "value": "Be brief."}] + conv(("human", "Q"), ("gpt", "A"))}]
    (s,) = read_llava(write_json(root / "d.json", data)).samples
    assert s.meta["system"] == "Be brief." and s.turns == [("user", "Q"), ("assistant", "A")]


def test_llava_jsonl_and_custom_root(tmp_path):
    png(tmp_path / "imgs" / "a.png")
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"image": "a.png", "conversations": conv(("human", "<image>Q"), ("gpt", "A"))},
        {"image": "a.png", "conversations": conv(("human", "<image>Q2"), ("gpt", "A2"))},
    ])
    res = read_llava(path, image_root=tmp_path / "imgs")
    assert [s.images for s in res.samples] == [[str(tmp_path / "imgs" / "a.png")]] * 2
    assert [s.index for s in res.samples] == [0, 1]


GOOD = {"image": "a.png", "conversations": conv(("human", "<image>Q"), ("gpt", "A"))}


@pytest.mark.parametrize("record, cause", [
    ("just a string", "record must be a JSON object"),
    ({"image": "a.png"}, "missing key 'conversations'"),
    ({"conversations": "hi"}, "key 'conversations' must be list"),
    ({"image": 3, "conversations": conv(("human", "Q"), ("gpt", "A"))}, "key 'image' must be str or list"),
    ({"conversations": conv(("human", ""), ("gpt", "A"))}, "turn 0 (user): text must be a non-empty string"),
    ({"conversations": conv(("human", "Q"), ("gpt", 5))}, "turn 1 (assistant): text must be a non-empty string"),
    ({"conversations": conv(("gpt", "A"), ("human", "Q"))}, "turn 0 is 'assistant' but roles must alternate"),
    ({"conversations": conv(("human", "Q"), ("human", "Q"))}, "turn 1 is 'user' but roles must alternate"),
    ({"conversations": conv(("human", "Q"))}, "no assistant turn"),
    ({"conversations": []}, "conversation is empty"),
    ({"conversations": conv(("bot", "Q"), ("gpt", "A"))}, "unknown role 'bot'"),
    ({"conversations": ["Q", "A"]}, "turn 0 must be an object"),
    ({"image": ["a.png", "b.png"], "conversations": conv(("human", "<image><image><image>"), ("gpt", "A"))},
     "3 <image> tags but 2 images"),
    ({"image": ["a.png", "b.png"], "conversations": conv(("human", "Q"), ("gpt", "A"))},
     "0 <image> tags but 2 images"),
    ({"conversations": conv(("human", "<image>Q"), ("gpt", "A"))}, "1 <image> tags but 0 images"),
    ({"image": "missing.png", "conversations": conv(("human", "<image>Q"), ("gpt", "A"))},
     "image file not found: 'missing.png'"),
    ({"image": "../a.png", "conversations": conv(("human", "<image>Q"), ("gpt", "A"))},
     "escapes the image root"),
    ({"image": "", "conversations": conv(("human", "<image>Q"), ("gpt", "A"))},
     "image path must be a non-empty string"),
])
def test_llava_bad_record(root, record, cause):
    path = write_json(root / "bad.json", [GOOD, record])
    err = raises(lambda: read_llava(path), str(path), "record 1", cause)
    assert err.record == 1 and err.path == str(path)


def test_absolute_and_escaping_paths(tmp_path):
    outside = png(tmp_path / "outside.png")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for image in (str(outside), "../outside.png", "sub/../../outside.png"):
        rec = {"image": image, "conversations": conv(("human", "<image>Q"), ("gpt", "A"))}
        path = write_json(data_dir / "d.json", [rec])
        raises(lambda: read_llava(path), "record 0", repr(image))
        (s,) = read_llava(path, allow_outside_root=True).samples
        assert s.images == [str(outside)]


def test_skip_mode_keeps_good_records(root):
    data = [GOOD, {"conversations": []}, GOOD, "nope", {**GOOD, "image": "gone.png"}]
    res = read_llava(write_json(root / "d.json", data), on_error="skip")
    assert [s.index for s in res.samples] == [0, 2]
    assert [e.record for e in res.skipped] == [1, 3, 4]
    assert "gone.png" in str(res.skipped[2])


def test_jsonl_bad_line_named(root):
    path = write_jsonl(root / "d.jsonl", [GOOD, "", '{"image": "a.png", ', GOOD])
    # line 3 holds the broken object (line 2 is blank)
    raises(lambda: read_llava(path), str(path), "record 2", "invalid JSON on line 3")
    res = read_llava(path, on_error="skip")
    assert [s.index for s in res.samples] == [0, 3]
    assert len(res.skipped) == 1 and res.skipped[0].record == 2


def test_jsonl_without_suffix_detected(root):
    path = write_jsonl(root / "d.json", [GOOD, GOOD])
    assert len(read_llava(path).samples) == 2


def test_file_level_errors(root):
    raises(lambda: read_llava(root / "nope.json"), "nope.json", "file not found")
    bad = root / "broken.json"
    bad.write_text('[\n  {"image": "a.png",\n  oops\n]')
    raises(lambda: read_llava(bad, on_error="skip"), "broken.json", "invalid JSON at line 3, column 3")
    raises(lambda: read_llava(write_json(root / "obj.json", {"a": 1})), "expected a JSON list")


# ----------------------------------------------------------------------------- chatml
def test_chatml_happy_and_errors(root):
    data = [
        {"image": "a.png", "conversations": [["<image>\nWhat?", "Red."], ["Shape?", "Square."]]},
        {"image": ["a.png", "b.png"], "conversations": [["<image><image>Compare", "Same."]]},
        {"conversations": [["Hi", "Hello"]]},
        {"image": "a.png", "conversations": [["What?", "Red."]]},
    ]
    res = read_chatml(write_json(root / "c.json", data))
    s0, s1, s2, s3 = res.samples
    assert s0.turns == [("user", "<image>\nWhat?"), ("assistant", "Red."),
                        ("user", "Shape?"), ("assistant", "Square.")]
    assert s0.id == "c-0" and s0.images == [str(root / "a.png")]
    assert len(s1.images) == 2 and s2.images == []
    assert s3.turns[0][1] == "<image>\nWhat?"

    bad = write_json(root / "bad.json", [
        {"conversations": [["only one"]]},
        {"image": ["a.png"], "conversations": [["<image><image>", "A"]]},
        {"conversations": [["Q", ""]]},
    ])
    res = read_chatml(bad, on_error="skip")
    assert res.samples == []
    causes = [str(e) for e in res.skipped]
    assert "record 0" in causes[0] and "[user_text, assistant_text] pair" in causes[0]
    assert "record 1" in causes[1] and "2 <image> tags but 1 images" in causes[1]
    assert "record 2" in causes[2] and "turn 1 (assistant)" in causes[2]


# ----------------------------------------------------------------------------- captions
def test_captions(root):
    data = [
        {"image": "a.png", "caption": "a red square", "image_id": "coco_1"},
        {"image": "sub/c.png", "caption": ["first ref", "second ref"]},
    ]
    res = read_captions(write_json(root / "cap.json", data))
    s0, s1 = res.samples
    assert s0.id == "coco_1" and s0.turns == [("user", "<image>\nDescribe the image briefly."),
                                              ("assistant", "a red square")]
    assert s0.images == [str(root / "a.png")] and "references" not in s0.meta
    assert s1.id == "cap-1" and s1.turns[1] == ("assistant", "first ref")
    assert s1.meta["references"] == ["first ref", "second ref"]
    (s,) = read_captions(write_json(root / "one.json", data[:1]), prompt="Caption:").samples
    assert s.turns[0] == ("user", "<image>\nCaption:")  # untagged prompt gets the tag prepended


def test_captions_errors(root):
    path = write_json(root / "cap.json", [{"image": "a.png", "caption": []}, {"caption": "x"},
                                          {"image": "a.png", "caption": 3}])
    res = read_captions(path, on_error="skip")
    msgs = [str(e) for e in res.skipped]
    assert "record 0" in msgs[0] and "non-empty list" in msgs[0]
    assert "record 1" in msgs[1] and "missing key 'image'" in msgs[1]
    assert "record 2" in msgs[2] and "key 'caption' must be str or list" in msgs[2]


# ----------------------------------------------------------------------------- VQAv2
def vqa_files(tmp_path, pattern_dir="val2014"):
    png(tmp_path / pattern_dir / "COCO_val2014_000000000042.jpg")
    q = write_json(tmp_path / "q.json", {"questions": [
        {"image_id": 42, "question": "What colour?", "question_id": 420},
        {"image_id": 42, "question": "How many?", "question_id": 421},
    ]})
    answers = [{"answer": "red", "answer_confidence": "yes", "answer_id": i + 1} for i in range(9)]
    answers.append({"answer": "pink", "answer_confidence": "maybe", "answer_id": 10})
    a = write_json(tmp_path / "a.json", {"annotations": [
        {"question_id": 420, "image_id": 42, "answers": answers, "multiple_choice_answer": "red",
         "question_type": "what color", "answer_type": "other"},
        {"question_id": 421, "image_id": 42, "answers": [{"answer": "1"}] * 10,
         "multiple_choice_answer": "1", "question_type": "how many", "answer_type": "number"},
    ]})
    return q, a


def test_vqav2_with_annotations(tmp_path):
    q, a = vqa_files(tmp_path)
    res = read_vqav2(q, a, image_root=tmp_path / "val2014")
    s0, s1 = res.samples
    assert s0.id == "420" and s0.images == [str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")]
    assert s0.turns == [("user", "<image>\nWhat colour?\nAnswer the question using a single word or phrase."),
                        ("assistant", "red")]
    assert s0.meta["answers"] == ["red"] * 9 + ["pink"]
    assert s0.meta["question_id"] == 420 and s0.meta["question_type"] == "what color"
    assert s0.meta["answer_type"] == "other"
    assert s1.turns[1] == ("assistant", "1") and s1.meta["answer_type"] == "number"


def test_vqav2_without_annotations_and_pattern(tmp_path):
    q, _ = vqa_files(tmp_path)
    png(tmp_path / "img" / "42.png")
    res = read_vqav2(q, image_root=tmp_path / "img", image_pattern="{image_id}.png")
    s0, _ = res.samples
    assert s0.images == [str(tmp_path / "img" / "42.png")]
    assert s0.turns[1] == ("assistant", "") and "answers" not in s0.meta
    res = read_dataset(q, "vqav2", image_root=tmp_path / "val2014")
    assert len(res.samples) == 2


def test_vqav2_errors(tmp_path):
    q, a = vqa_files(tmp_path)
    raises(lambda: read_vqav2(q, a), "q.json", "record 0", "image file not found",
           "COCO_val2014_000000000042.jpg")
    write_json(a, {"annotations": [{"question_id": 420, "answers": [], "multiple_choice_answer": "red"}]})
    res = read_vqav2(q, a, image_root=tmp_path / "val2014", on_error="skip")
    assert len(res.samples) == 1 and res.skipped[0].record == 1
    assert "no annotation for question_id 421" in str(res.skipped[0])
    write_json(q, {"questions": [{"image_id": 42, "question_id": 1}]})
    raises(lambda: read_vqav2(q, image_root=tmp_path), "record 0", "missing key 'question'")
    write_json(q, {"nope": []})
    raises(lambda: read_vqav2(q), "q.json", "'questions' list")


def test_read_dataset_dispatch(root):
    path = write_json(root / "d.json", [GOOD])
    assert read_dataset(path, "llava").samples[0].turns == [("user", "<image>Q"), ("assistant", "A")]
    with pytest.raises(ValueError, match="unknown data format"):
        read_dataset(path, "coco")
