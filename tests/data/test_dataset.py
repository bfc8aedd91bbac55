import numpy as np
import pytest
from PIL import Image

from paddle_mm.data.dataset import ConversationDataset, collate, encode_sample
from paddle_mm.data.image import ImageProcessor, ImageProcessorConfig
from paddle_mm.data.readers import Sample
from paddle_mm.data.tokenizer import IGNORE_INDEX, IMAGE_TOKEN, Tokenizer
from paddle_mm.errors import DataError

TPI = 4  # tokens per image
PAD = 0


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    # Word level: header = [<|im_start|>, role], body = words + <|im_end|>; whitespace is dropped.
    return Tokenizer.word_level(["user", "assistant", "system", "what", "colour", "is", "it", "red", "blue", "green"])


@pytest.fixture
def processor() -> ImageProcessor:
    return ImageProcessor(ImageProcessorConfig(size=8, resize="exact"))


def png(path, color) -> str:
    Image.new("RGB", (8, 8), color).save(path)
    return str(path)


def sample(turns, images=None, index=0, source="data/train.json", id_=None) -> Sample:
    """A Sample; without images, one path per <image> tag (encoding reads no image file)."""
    if images is None:
        images = ["unread.png"] * sum(text.count(IMAGE_TOKEN) for _, text in turns)
    return Sample(id=id_ or f"s{index}", images=list(images), turns=list(turns), source=source, index=index)


def qa(answer: str = "red", image: bool = True) -> list[tuple[str, str]]:
    question = f"{IMAGE_TOKEN}\nwhat colour" if image else "what colour"
    return [("user", question), ("assistant", answer)]


# encode_sample ----------------------------------------------------------------------------

def test_encode_sample_ids_and_labels(tok):
    enc = encode_sample(sample(qa()), tok, TPI, max_length=64)
    assert enc.input_ids.dtype == np.int64 and enc.labels.dtype == np.int64
    assert len(enc.input_ids) == 13  # 2 + 4 + 2 + 1 (user) + 2 + 1 + 1 (assistant)
    assert (enc.input_ids == tok.image_token_id).sum() == TPI
    learned = enc.labels[enc.labels != IGNORE_INDEX].tolist()
    assert learned == [tok.encode("red")[0], tok.im_end_id]


def test_encode_sample_too_long_names_file_record_and_lengths(tok):
    with pytest.raises(DataError) as info:
        encode_sample(sample(qa(), index=7, source="data/train.json"), tok, TPI, max_length=12)
    err = info.value
    assert err.path == "data/train.json" and err.record == 7
    message = str(err)
    assert "data/train.json" in message and "record 7" in message
    assert "13" in message and "12" in message
    # exactly max_length is fine: nothing is cut
    assert len(encode_sample(sample(qa()), tok, TPI, max_length=13).input_ids) == 13


def test_encode_sample_empty_loss_mask_raises(tok):
    with pytest.raises(DataError, match="empty loss mask") as info:
        encode_sample(sample([("user", "what colour")], index=3, source="x.jsonl"), tok, TPI, max_length=64)
    assert "x.jsonl, record 3" in str(info.value)


def test_encode_sample_uses_system_prompt(tok):
    plain = encode_sample(sample(qa()), tok, TPI, max_length=64)
    with_system = encode_sample(sample(qa()), tok, TPI, max_length=64, system="it is")
    assert len(with_system.input_ids) == len(plain.input_ids) + 5  # header 2 + 2 words + im_end
    np.testing.assert_array_equal(with_system.input_ids[5:], plain.input_ids)


# ConversationDataset --------------------------------------------------------------------------

def test_dataset_skip_counts_bad_and_keeps_good(tok, processor, tmp_path):
    red = png(tmp_path / "red.png", (255, 0, 0))
    samples = [
        sample(qa("red"), [red], index=0),
        sample([("user", "what colour")], index=1),  # nothing to learn
        sample(qa("blue"), [red], index=2),
        sample(qa("red green blue red green blue"), [red], index=3),  # too long for 16
    ]
    data = ConversationDataset(samples, tok, processor, TPI, max_length=16, on_error="skip")
    assert len(data) == 2
    assert [item.sample.index for item in data.items] == [0, 2]
    assert [err.record for err in data.skipped] == [1, 3]
    item = data[1]
    assert item["id"] == "s2"
    assert item["pixel_values"].shape == (1, 3, 8, 8)
    assert item["labels"][item["labels"] != IGNORE_INDEX].tolist() == [tok.encode("blue")[0], tok.im_end_id]


def test_dataset_raise_stops_at_first_bad_record(tok, processor):
    samples = [sample(qa(image=False), index=0), sample([("user", "what")], index=1, source="bad.json")]
    with pytest.raises(DataError, match="bad.json, record 1"):
        ConversationDataset(samples, tok, processor, TPI, max_length=64)


def test_dataset_item_without_images_has_no_pixels(tok, processor):
    data = ConversationDataset([sample(qa(image=False))], tok, processor, TPI, max_length=64)
    assert data[0]["pixel_values"] is None


# collate ------------------------------------------------------------------------------------

def items_for_collate(tok, processor, tmp_path):
    red = png(tmp_path / "red.png", (255, 0, 0))
    blue = png(tmp_path / "blue.png", (0, 0, 255))
    green = png(tmp_path / "green.png", (0, 255, 0))
    two_images = [("user", f"{IMAGE_TOKEN} {IMAGE_TOKEN}\nwhat colour"), ("assistant", "blue green")]
    samples = [
        sample(qa("red"), [red], index=0),  # 13 tokens
        sample(qa("red", image=False), index=1),  # 9 tokens, no image
        sample(two_images, [blue, green], index=2),  # 18 tokens
    ]
    data = ConversationDataset(samples, tok, processor, TPI, max_length=64)
    return [data[i] for i in range(3)], {"red": red, "blue": blue, "green": green}


def test_collate_right_padding(tok, processor, tmp_path):
    items, _ = items_for_collate(tok, processor, tmp_path)
    batch = collate(items, PAD, padding_side="right")
    lengths = [len(x["input_ids"]) for x in items]
    assert lengths == [13, 9, 18]
    assert batch["input_ids"].shape == (3, 18)
    assert batch["ids"] == ["s0", "s1", "s2"]
    for row, (x, n) in enumerate(zip(items, lengths)):
        np.testing.assert_array_equal(batch["input_ids"][row, :n], x["input_ids"])
        np.testing.assert_array_equal(batch["labels"][row, :n], x["labels"])
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (18 - n)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == PAD).all()


def test_collate_left_padding_ends_every_row_with_its_last_token(tok, processor, tmp_path):
    items, _ = items_for_collate(tok, processor, tmp_path)
    batch = collate(items, PAD, padding_side="left")
    assert batch["input_ids"][:, -1].tolist() == [int(x["input_ids"][-1]) for x in items]
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        np.testing.assert_array_equal(batch["input_ids"][row, 18 - n:], x["input_ids"])
        assert batch["attention_mask"][row].tolist() == [0] * (18 - n) + [1] * n
        assert (batch["labels"][row, :18 - n] == IGNORE_INDEX).all()


def test_collate_stacks_pixels_in_row_order(tok, processor, tmp_path):
    items, paths = items_for_collate(tok, processor, tmp_path)
    batch = collate(items, PAD)
    pixels = batch["pixel_values"]
    assert pixels.shape == (3, 3, 8, 8)  # red (row 0), then blue, green (row 2)
    expected = processor([paths["red"], paths["blue"], paths["green"]])
    np.testing.assert_array_equal(pixels, expected)
    # the number of image positions matches the stacked images, as the model requires
    assert (batch["input_ids"] == tok.image_token_id).sum() == pixels.shape[0] * TPI


def test_collate_without_images_gives_none(tok, processor):
    data = ConversationDataset([sample(qa("red", image=False)), sample(qa("blue", image=False), index=1)],
                               tok, processor, TPI, max_length=64)
    batch = collate([data[0], data[1]], PAD)
    assert batch["pixel_values"] is None
    assert batch["input_ids"].shape == (2, 9)
    assert batch["attention_mask"].all()


# several images per sample, each with its own token count ----------------------------------

def test_each_image_may_take_its_own_token_count_in_tag_order(tok):
    s = sample([("user", f"{IMAGE_TOKEN} what {IMAGE_TOKEN} colour"), ("assistant", "red")], images=["a", "b"])
    enc = encode_sample(s, tok, [2, 5], max_length=64)
    ids = enc.input_ids.tolist()
    first = ids.index(tok.image_token_id)
    assert ids[first: first + 2] == [tok.image_token_id] * 2 and ids[first + 2] != tok.image_token_id
    second = ids.index(tok.image_token_id, first + 2)
    assert ids[second: second + 5] == [tok.image_token_id] * 5 and ids[second + 5] != tok.image_token_id
    assert sum(t == tok.image_token_id for t in ids) == 7


def test_token_counts_that_do_not_fit_the_images_name_the_record_and_both_counts(tok):
    s = sample([("user", f"{IMAGE_TOKEN}{IMAGE_TOKEN} what"), ("assistant", "red")], images=["a", "b"], index=7)
    with pytest.raises(DataError) as info:
        encode_sample(s, tok, [3, 3, 3], max_length=64)
    assert str(info.value) == "data/train.json, record 7: the text holds 2 images but 3 token counts were given"
    assert info.value.reason == "tag_mismatch"
    with pytest.raises(DataError, match="record 7: the text holds more images than the 1 token counts"):
        encode_sample(s, tok, [3], max_length=64)


def test_collate_stacks_the_images_of_rows_with_several_or_none_in_reading_order(tok, processor, tmp_path):
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}
    paths = {name: png(tmp_path / f"{name}.png", rgb) for name, rgb in colours.items()}
    two = [("user", f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nwhat colour"), ("assistant", "red blue")]
    rows = [sample(two, [paths["green"], paths["red"]]), sample(qa("red", image=False), index=1),
            sample(two, [paths["blue"], paths["green"]], index=2)]
    data = ConversationDataset(rows, tok, processor, TPI, max_length=64)
    batch = collate([data[i] for i in range(3)], PAD)
    expected = processor([paths["green"], paths["red"], paths["blue"], paths["green"]])
    np.testing.assert_array_equal(batch["pixel_values"], expected)
    assert [(r == tok.image_token_id).sum() for r in batch["input_ids"]] == [2 * TPI, 0, 2 * TPI]
