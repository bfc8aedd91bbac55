"""Request parsing and streamed text, without a server."""
from __future__ import annotations

import pytest

from paddle_mm.config import InferConfig
from paddle_mm.data.tokenizer import Tokenizer
from paddle_mm.serving.openai_api import (
    ApiError,
    ServerLimits,
    StopGeneration,
    TextStream,
    parse_chat_request,
    user_text,
)

TEXT = "naïve café — a red circle,  then 3 squares"


@pytest.fixture(scope="module")
def tok(demo_data):
    return Tokenizer.load(demo_data["tokenizer"])


def _stream(tok, stop):
    deltas = []
    stream = TextStream(tok, stop, deltas.append)
    stopped_at = None
    for i, t in enumerate(tok.encode(" " + TEXT + " \n")):
        try:
            stream.add(t)
        except StopGeneration:
            stopped_at = i
            break
    return stream, deltas, stopped_at


def test_deltas_add_up_to_the_stripped_text_and_never_split_a_character(tok):
    assert len(tok.encode("é")) == 2  # a character spread over two byte tokens: the case to hold back
    stream, deltas, stopped_at = _stream(tok, [])
    assert stopped_at is None
    final = stream.finish()
    assert final == TEXT and "".join(deltas) == final
    assert all("\ufffd" not in d for d in deltas) and len(deltas) > 5


def test_a_stop_string_ends_decoding_and_none_of_it_is_sent(tok):
    stream, deltas, stopped_at = _stream(tok, ["red ci", "zzz"])
    assert stopped_at is not None and stream.stopped
    final = stream.finish()
    assert final == "naïve café — a " and "".join(deltas) == final


def _request(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return parse_chat_request(body, "m", InferConfig(max_new_tokens=32), ServerLimits(max_tokens=64))


def test_sampling_parameters_map_onto_the_recipe_settings():
    job = _request()
    assert (job.infer.max_new_tokens, job.infer.do_sample, job.infer.num_beams) == (32, False, 1)
    job = _request(temperature=0.7, top_p=0.5, max_tokens=10, seed=3, stop="\n", stream=True)
    assert (job.infer.do_sample, job.infer.temperature, job.infer.top_p) == (True, 0.7, 0.5)
    assert (job.infer.max_new_tokens, job.seed, job.stop, job.stream) == (10, 3, ["\n"], True)
    assert _request(temperature=0).infer.do_sample is False
    assert _request(max_completion_tokens=5).infer.max_new_tokens == 5


@pytest.mark.parametrize("kw, param", [
    ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 65}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"n": 2}, "n"), ({"stop": ["a"] * 5}, "stop"),
    ({"stream": "yes"}, "stream"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "a <|im_end|> b"}]}, "messages[0].content[0]"),
])
def test_bad_parameters_name_the_parameter(kw, param):
    with pytest.raises(ApiError) as caught:
        _request(**kw)
    assert caught.value.status == 400 and caught.value.param == param


def test_user_turns_are_worded_like_the_training_prompts():
    infer = InferConfig(caption_prompt="<image>\nDescribe the image briefly.", vqa_prompt="<image>\nQ: {question}")
    assert user_text("what shape?", 1, infer) == "<image>\nQ: what shape?"
    assert user_text("", 1, infer) == "<image>\nDescribe the image briefly."
    assert user_text("compare them", 2, infer) == "<image>\n<image>\ncompare them"
    assert user_text("hello", 0, infer) == "hello"
