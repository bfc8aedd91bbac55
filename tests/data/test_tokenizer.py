import json
import random

import numpy as np
import paddle
import pytest

from paddle_mm.data.tokenizer import (
    EOS,
    IGNORE_INDEX,
    IM_END,
    IM_START,
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    Tokenizer,
)
from paddle_mm.errors import CheckpointError, DataError

WORDS = "the a red blue green circle square triangle is on left right of image what colour shape small big".split()


def make_corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]
        lines.append(" ".join(words) + rng.choice(["", "?", "."]))
    return lines


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe(make_corpus(), vocab_size=400)


def split_messages(tok: Tokenizer, ids: list[int]) -> list[tuple[str, int, int]]:
    """(role, body start, body end inclusive of <|im_end|>) for each ChatML message in ids."""
    starts = [i for i, t in enumerate(ids) if t == tok.im_start_id]
    out = []
    for s in starts:
        role_ids = []
        j = s + 1
        newline = tok.encode("\n")
        while ids[j:j + len(newline)] != newline:
            role_ids.append(ids[j])
            j += 1
        body_start = j + len(newline)
        end = ids.index(tok.im_end_id, body_start) if tok.im_end_id in ids[body_start:] else len(ids) - 1
        out.append((tok.decode(role_ids), body_start, end))
    return out


# the worked example of docs/ARCHITECTURE.md ---------------------------------------------

def test_word_level_worked_example_gives_4_by_2048_embedding():
    tok = Tokenizer.word_level(["thank", "you", "very", "much"])
    ids = tok.encode("thank you very much")
    assert len(ids) == 4
    assert len(set(ids)) == 4
    assert tok.decode(ids) == "thank you very much"
    paddle.seed(0)
    table = paddle.nn.Embedding(tok.vocab_size, 2048)
    emb = table(paddle.to_tensor(ids))
    assert emb.shape == [4, 2048]
    np.testing.assert_array_equal(emb.numpy(), table.weight.numpy()[ids])


def test_word_level_unknown_word_maps_to_unk():
    tok = Tokenizer.word_level(["thank", "you"])
    assert tok.encode("thank zebra") == [tok.encode("thank")[0], tok.token_to_id("<unk>")]


# BPE training, save and load ----------------------------------------------------------------

def test_special_tokens_are_single_tokens_with_stable_ids(bpe):
    expected = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for token, i in expected.items():
        assert bpe.token_to_id(token) == i
        assert bpe.encode(token) == [i]
    assert (bpe.eos_token_id, bpe.im_start_id, bpe.im_end_id, bpe.image_token_id) == (0, 1, 2, 3)
    other = Tokenizer.train_bpe(make_corpus(50, seed=7), vocab_size=300)
    assert [other.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    words = Tokenizer.word_level(["x"])
    assert [words.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]


def test_role_names_are_single_tokens(bpe):
    for role in ("user", "assistant", "system"):
        assert len(bpe.encode(role)) == 1, role


def test_save_and_load_round_trip(bpe, tmp_path):
    file = bpe.save(str(tmp_path / "run"))
    assert file == str(tmp_path / "run" / "tokenizer.json")
    assert not (tmp_path / "run" / "tokenizer.json.tmp").exists()
    from_file = Tokenizer.load(file)
    from_folder = Tokenizer.load(str(tmp_path / "run"))
    texts = make_corpus(20, seed=3) + ["café 東京", "what colour is the circle?"]
    for text in texts:
        ids = bpe.encode(text)
        assert from_file.encode(text) == ids
        assert from_folder.encode(text) == ids
    for loaded in (from_file, from_folder):
        assert loaded.vocab_size == bpe.vocab_size
        assert [loaded.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]


@pytest.mark.parametrize("text", [
    "the red circle is on the left of the square.",
    "  two  spaces\tand a tab\nand a newline",
    "café 東京",
    "emoji 🙂 and ümlauts",
])
def test_decode_encode_round_trip_byte_level(bpe, text):
    ids = bpe.encode(text)
    assert ids
    assert bpe.decode(ids) == text


def test_bpe_merges_frequent_words(bpe):
    # a frequent corpus word is one token, not one per byte
    assert len(bpe.encode("circle")) == 1
    assert len(bpe.encode("café 東京")) > len("café 東京")  # unseen characters fall back to bytes


# chat template -----------------------------------------------------------------------------

def test_encode_chat_labels_cover_only_assistant_text_and_im_end(bpe):
    turns = [("user", f"{IMAGE_TOKEN}\nwhat colour is the circle?"), ("assistant", "red")]
    ids, labels = bpe.encode_chat(turns, tokens_per_image=4, system="be brief")
    assert len(ids) == len(labels)
    text = bpe.decode(ids, skip_special_tokens=False)
    assert text == (
        f"{IM_START}system\nbe brief{IM_END}\n"
        f"{IM_START}user\n{IMAGE_TOKEN * 4}\nwhat colour is the circle?{IM_END}\n"
        f"{IM_START}assistant\nred{IM_END}\n"
    )
    learned = [(i, t) for i, (t, lab) in enumerate(zip(ids, labels)) if lab != IGNORE_INDEX]
    assert [t for _, t in learned] == bpe.encode("red") + [bpe.im_end_id]
    for i, t in learned:
        assert labels[i] == ids[i]
    # the labelled span is contiguous and followed only by the trailing newline
    first = learned[0][0]
    assert labels[first:first + len(learned)] == ids[first:first + len(learned)]
    assert labels[first + len(learned):] == [IGNORE_INDEX] * len(bpe.encode("\n"))


def test_encode_chat_image_span_is_ignored_and_expanded(bpe):
    turns = [("user", f"{IMAGE_TOKEN} and {IMAGE_TOKEN} compare"), ("assistant", "same")]
    ids, labels = bpe.encode_chat(turns, tokens_per_image=5)
    positions = [i for i, t in enumerate(ids) if t == bpe.image_token_id]
    assert len(positions) == 10
    assert all(labels[i] == IGNORE_INDEX for i in positions)
    # two separate runs of 5
    runs = np.split(positions, np.where(np.diff(positions) != 1)[0] + 1)
    assert [len(r) for r in runs] == [5, 5]
    ids1, _ = bpe.encode_chat([("user", IMAGE_TOKEN), ("assistant", "x")], tokens_per_image=1)
    assert ids1.count(bpe.image_token_id) == 1


def test_encode_chat_multi_turn_masks_every_user_turn(bpe):
    answers = ["red circle", "blue square", "the left one"]
    turns = []
    for q, a in zip(["what colour?", "and the shape?", "which side?"], answers):
        turns += [("user", q), ("assistant", a)]
    ids, labels = bpe.encode_chat(turns, tokens_per_image=2, system="short answers")
    messages = split_messages(bpe, ids)
    assert [m[0] for m in messages] == ["system"] + ["user", "assistant"] * 3
    expected = [IGNORE_INDEX] * len(ids)
    for role, start, end in messages:
        if role == "assistant":
            expected[start:end + 1] = ids[start:end + 1]
    assert labels == expected
    learned_text = bpe.decode([lab for lab in labels if lab != IGNORE_INDEX], skip_special_tokens=True)
    assert learned_text == "".join(answers)
    assert labels.count(bpe.im_end_id) == 3  # each answer's closing <|im_end|> is learned


def test_add_generation_prompt_ends_with_open_assistant_header(bpe):
    ids, labels = bpe.encode_chat([("user", f"{IMAGE_TOKEN}\ndescribe")], tokens_per_image=3,
                                  add_generation_prompt=True)
    header = [bpe.im_start_id] + bpe.encode("assistant\n")
    assert ids[-len(header):] == header
    assert bpe.decode(ids, skip_special_tokens=False).endswith(f"{IM_START}assistant\n")
    assert labels == [IGNORE_INDEX] * len(ids)
    plain, _ = bpe.encode_chat([("user", f"{IMAGE_TOKEN}\ndescribe")], tokens_per_image=3)
    assert ids == plain + header


def test_encode_chat_refuses_an_image_tag_in_an_assistant_turn(bpe):
    """Its image tokens would carry labels (found by test_properties: [("assistant", "<image>")])."""
    with pytest.raises(DataError, match="assistant turn holds an <image> tag"):
        bpe.encode_chat([("user", "hi"), ("assistant", "see <image>")], 4)


def test_encode_chat_unknown_role_raises(bpe):
    with pytest.raises(DataError, match="unknown role 'robot'"):
        bpe.encode_chat([("user", "hi"), ("robot", "beep")], tokens_per_image=1)


def test_eos_is_endoftext_and_pad_is_eos(bpe):
    assert bpe.eos_token_id == bpe.token_to_id(EOS)
    assert bpe.pad_token_id == bpe.eos_token_id
    assert bpe.special_ids() == {"eos": 0, "pad": 0, "bos": 0}


# load errors ------------------------------------------------------------------------------

def test_load_missing_path_raises_checkpoint_error(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(CheckpointError, match="no tokenizer.json") as info:
        Tokenizer.load(str(missing))
    assert str(missing) in str(info.value)


def test_load_folder_without_tokenizer_json_raises(tmp_path):
    with pytest.raises(CheckpointError) as info:
        Tokenizer.load(str(tmp_path))
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"model": {"type": "Nope"}})])
def test_load_malformed_json_raises_checkpoint_error(tmp_path, content):
    file = tmp_path / "tokenizer.json"
    file.write_text(content)
    for path in (file, tmp_path):
        with pytest.raises(CheckpointError, match="cannot load tokenizer") as info:
            Tokenizer.load(str(path))
        assert str(file) in str(info.value)
