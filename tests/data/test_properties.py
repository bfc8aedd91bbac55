"""Property-based tests: any input to the readers, the chat template or the collator either
works or raises the project's own error (DataError) with a message; nothing else escapes."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from paddle_mm.data.dataset import collate
from paddle_mm.data.readers import ReadResult, read_captions, read_chatml, read_llava, read_vqav2
from paddle_mm.data.tokenizer import IGNORE_INDEX, IMAGE_TOKEN, Tokenizer
from paddle_mm.errors import DataError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that often looks like what the formats expect, sometimes not at all.
TEXT = st.one_of(st.sampled_from(["", " ", "a.png", "sub/c.png", "../x.png", "/etc/passwd", "missing.png",
                                  IMAGE_TOKEN, f"{IMAGE_TOKEN}\nwhat?", "human", "gpt", "user", "assistant",
                                  "system", "<|im_end|>", "red"]), st.text(max_size=20))
KEYS = st.one_of(st.sampled_from(["id", "image", "conversations", "from", "value", "caption", "image_id",
                                  "question_id", "question", "answers", "multiple_choice_answer"]), st.text(max_size=5))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=False), TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
                    max_leaves=20)
TURN = st.fixed_dictionaries({"from": TEXT, "value": TEXT}) | JSON
RECORD = st.one_of(
    st.fixed_dictionaries({"conversations": st.lists(TURN, max_size=4)},
                          optional={"id": SCALARS, "image": TEXT | st.lists(TEXT, max_size=3)}),
    st.fixed_dictionaries({"image": TEXT, "caption": TEXT | st.lists(TEXT, max_size=3)}, optional={"image_id": SCALARS}),
    st.fixed_dictionaries({"conversations": st.lists(st.lists(TEXT, max_size=3), max_size=3)},
                          optional={"image": TEXT}),
    JSON,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prop")
    (folder / "sub").mkdir()
    for name in ("a.png", "sub/c.png"):
        Image.new("RGB", (4, 4)).save(folder / name)
    return folder


def _works_or_data_error(call) -> ReadResult | None:
    try:
        return call()
    except DataError as e:
        assert str(e) and e.path
        return None


@SETTINGS
@given(records=st.lists(RECORD, max_size=5), jsonl=st.booleans())
def test_readers_take_any_records(root, records, jsonl):
    path = root / ("data.jsonl" if jsonl else "data.json")
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    for reader in (read_llava, read_chatml, read_captions):
        strict = _works_or_data_error(lambda: reader(str(path)))
        lenient = _works_or_data_error(lambda: reader(str(path), on_error="skip"))
        if strict is not None:  # every record good: skipping changes nothing
            assert lenient == ReadResult(strict.samples, []) and len(strict.samples) == len(records)
        else:  # a bad record is skipped; only a problem of the file as a whole still raises
            assert lenient is not None
        # skipping never loses count of a record, and each skip names its record
        assert len(lenient.samples) + len(lenient.skipped) == len(records)
        assert all(isinstance(e, DataError) and e.record is not None for e in lenient.skipped)
        assert [s.index for s in lenient.samples] == sorted(s.index for s in lenient.samples)


def _nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a": ' * depth + "1" + "}" * depth


# Python's json decoder recurses once per level; past the recursion limit (1,000 levels, fewer
# when called deep in a stack) it raises RecursionError, which the readers turn into a DataError.
DEPTHS = st.sampled_from([1, 50, 900, 1_000, 5_000, 100_000]) | st.integers(1, 20_000)


@SETTINGS
@given(depth=DEPTHS, kind=st.sampled_from(["list", "dict"]), where=st.sampled_from(["file", "record", "line"]))
def test_readers_take_any_nesting_depth(root, depth, kind, where):
    good = {"image": "a.png", "caption": "red"}
    if where == "file":
        path, text = root / "deep.json", _nested(depth, kind)
    elif where == "record":  # one record of a JSON list
        path, text = root / "deep.json", f"[{json.dumps(good)}, {{\"caption\": {_nested(depth, kind)}}}]"
    else:  # one line of a JSONL file, between good ones
        path, text = root / "deep.jsonl", "\n".join([json.dumps(good), _nested(depth, kind), json.dumps(good)])
    path.write_text(text)
    result = _works_or_data_error(lambda: read_captions(str(path), on_error="skip"))
    if where == "line":  # a bad line is that record's problem: the lines around it are read
        assert result is not None and [s.index for s in result.samples] == [0, 2]
        assert [e.record for e in result.skipped] == [1]
    elif where == "record" and result is not None:  # parsed: the deep record is skipped, the good one read
        assert [s.index for s in result.samples] == [0] and [e.record for e in result.skipped] == [1]


@SETTINGS
@given(content=st.binary(max_size=60) | st.text(max_size=60).map(str.encode))
def test_readers_take_any_file_content(root, content):
    path = root / "raw.json"
    path.write_bytes(content)
    for reader in (read_llava, read_chatml, read_captions):
        _works_or_data_error(lambda: reader(str(path), on_error="skip"))
    _works_or_data_error(lambda: read_vqav2(str(path), str(path), on_error="skip"))


@SETTINGS
@given(questions=JSON | st.fixed_dictionaries({"questions": st.lists(JSON, max_size=3)}),
       annotations=JSON | st.fixed_dictionaries({"annotations": st.lists(JSON, max_size=3)}))
def test_vqav2_reader_takes_any_question_and_annotation_files(root, questions, annotations):
    (root / "q.json").write_text(json.dumps(questions))
    (root / "a.json").write_text(json.dumps(annotations))
    _works_or_data_error(lambda: read_vqav2(str(root / "q.json"), str(root / "a.json"), image_pattern="{image_id}"))


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.word_level(["what", "red", "circle", "?", "is", "a"])


@SETTINGS
@given(turns=st.lists(st.tuples(st.sampled_from(["user", "assistant", "system", "gpt", ""]) | st.text(max_size=4),
                                TEXT | st.integers() | st.none()), max_size=5),
       tokens_per_image=st.integers(1, 5), system=TEXT, generation=st.booleans())
def test_chat_template_takes_any_turns(tokenizer, turns, tokens_per_image, system, generation):
    try:
        ids, labels = tokenizer.encode_chat(turns, tokens_per_image, system=system, add_generation_prompt=generation)
    except DataError as e:
        assert str(e)
        return
    assert len(ids) == len(labels)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    tags = sum(text.count(IMAGE_TOKEN) for _, text in [("system", system)] * bool(system) + list(turns))
    assert ids.count(tokenizer.image_token_id) == tags * tokens_per_image
    assert all(label == IGNORE_INDEX for token, label in zip(ids, labels) if token == tokenizer.image_token_id)


ITEM = st.fixed_dictionaries({
    "id": st.text(max_size=3),
    "input_ids": st.lists(st.integers(0, 50), max_size=6).map(lambda x: np.asarray(x, dtype="int64")),
    "labels": st.lists(st.integers(-100, 50), max_size=6).map(lambda x: np.asarray(x, dtype="int64")),
    "pixel_values": st.none() | st.integers(1, 2).flatmap(
        lambda n: st.sampled_from([4, 5]).map(lambda s: np.zeros([n, 3, s, s], dtype="float32"))),
})


def _must_fail(items) -> bool:
    """What collate refuses: no items, ids and labels of different lengths, images of two shapes."""
    shapes = {x["pixel_values"].shape[1:] for x in items if x["pixel_values"] is not None}
    return not items or any(len(x["input_ids"]) != len(x["labels"]) for x in items) or len(shapes) > 1


@SETTINGS
@given(items=st.lists(ITEM, max_size=4), side=st.sampled_from(["right", "left"]))
def test_collate_refuses_exactly_the_batches_it_cannot_stack(items, side):
    try:
        batch = collate(items, pad_token_id=0, padding_side=side)
    except DataError as e:
        assert str(e) and _must_fail(items)
        return
    assert not _must_fail(items)
    b, length = batch["input_ids"].shape
    assert b == len(items) and batch["labels"].shape == (b, length) == batch["attention_mask"].shape


@st.composite
def valid_batches(draw):
    """Items collate must accept: matching ids and labels, one image size, each row its own values."""
    size = draw(st.sampled_from([2, 3, 5]))
    items = []
    for k in range(draw(st.integers(1, 5))):
        n = draw(st.integers(1, 7))
        images = draw(st.none() | st.integers(1, 3))
        items.append({
            "id": f"s{k}",
            "input_ids": np.asarray(draw(st.lists(st.integers(0, 60), min_size=n, max_size=n)), dtype="int64"),
            "labels": np.asarray(draw(st.lists(st.integers(0, 60) | st.just(IGNORE_INDEX), min_size=n, max_size=n)),
                                 dtype="int64"),
            # distinct values per item and image, so an order or row mix-up shows
            "pixel_values": None if images is None else
            (100 * k + np.arange(images * 3 * size * size, dtype="float32")).reshape(images, 3, size, size),
        })
    return items


@SETTINGS
@given(items=valid_batches(), side=st.sampled_from(["right", "left"]), pad=st.integers(0, 60))
def test_collate_pads_each_row_on_its_side_and_stacks_images_in_row_order(items, side, pad):
    batch = collate(items, pad_token_id=pad, padding_side=side)
    length = max(len(x["input_ids"]) for x in items)
    assert batch["ids"] == [x["id"] for x in items]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (len(items), length)
    assert batch["input_ids"].dtype == batch["labels"].dtype == np.int64
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        real = slice(0, n) if side == "right" else slice(length - n, length)
        padding = np.ones(length, bool)
        padding[real] = False
        np.testing.assert_array_equal(batch["input_ids"][row, real], x["input_ids"])
        np.testing.assert_array_equal(batch["labels"][row, real], x["labels"])
        assert (batch["input_ids"][row, padding] == pad).all()
        assert (batch["labels"][row, padding] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(batch["attention_mask"][row], (~padding).astype("int64"))
    if side == "left":  # generation: every row's last real token in the last column
        assert (batch["attention_mask"][:, -1] == 1).all()
    images = [x["pixel_values"] for x in items if x["pixel_values"] is not None]
    if images:
        np.testing.assert_array_equal(batch["pixel_values"], np.concatenate(images))
    else:
        assert batch["pixel_values"] is None
