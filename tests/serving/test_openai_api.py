"""Request parsing and streamed text, without a server."""
from __future__ import annotations

import pytest

from paddle_mm.config import InferConfig
from paddle_mm.serving.openai_api import (
    ApiError,
    ServerLimits,
    parse_chat_request,
    user_text,
)


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
    assert user_text("compare them", 2, infer) == "<image>\n<image>\nQ: compare them"
    assert user_text("", 2, infer) == "<image>\n<image>\nDescribe the image briefly."
    assert user_text("compare", 2, InferConfig(vqa_prompt="{question}")) == "<image>\n<image>\ncompare"
    assert user_text("hello", 0, infer) == "hello"


def test_several_image_parts_in_one_message_keep_their_order():
    import base64
    import io

    import numpy as np
    from PIL import Image

    def url(colour):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), colour).save(buf, format="PNG")
        return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}}

    messages = [{"role": "user", "content": [url("red"), {"type": "text", "text": "which is blue?"}, url("blue")]},
                {"role": "assistant", "content": "second"},
                {"role": "user", "content": [url("green"), {"type": "text", "text": "and this?"}]}]
    job = parse_chat_request({"model": "m", "messages": messages}, "m", InferConfig(), ServerLimits())
    colours = [tuple(np.asarray(im)[0, 0]) for im in job.sample.images]
    assert colours == [(255, 0, 0), (0, 0, 255), (0, 128, 0)]
    assert job.sample.turns == [("user", "<image>\n<image>\nwhich is blue?"), ("assistant", "second"),
                                ("user", "<image>\nand this?")]
    with pytest.raises(ApiError, match="more than 2 images"):
        parse_chat_request({"model": "m", "messages": messages}, "m", InferConfig(), ServerLimits(max_images=2))
