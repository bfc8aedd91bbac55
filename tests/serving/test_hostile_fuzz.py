"""Fuzzing the request parser (body bytes -> JSON -> ChatJob) and the header checks: whatever
comes in, the only exception out is ApiError, so the server never answers a 500."""
from __future__ import annotations

import base64
import email.message
import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from paddle_mm.config import InferConfig
from paddle_mm.serving.http_guard import LOOPBACK_NAMES, check_content_type, check_origin, content_length
from paddle_mm.serving.openai_api import ApiError, ServerLimits, parse_chat_request, parse_json_body

LIMITS = ServerLimits(max_tokens=16, max_image_pixels=64 * 64, max_request_pixels=100 * 64)


def _png(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "red").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_scalar = st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=12)
_json = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=25)
_url = st.sampled_from([_png(8, 8), _png(64, 64), _png(200, 2), "data:image/png;base64,", "data:,x", "file:///etc/passwd",
                        "http://example.com/a.png", "data:image/png;base64,@@@", "data:image/png;base64," + "A" * 40])
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20) | _json}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": _url}) | _url | _json}),
    _json)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]) | _json,
                                  "content": st.text(max_size=20) | st.lists(_part, max_size=3) | _json})
_body = st.fixed_dictionaries(
    {"model": st.sampled_from(["m", "other"]) | _json, "messages": st.lists(_message, max_size=4) | _json},
    optional={k: _json | st.integers(-5, 40) | st.floats(-1, 3) for k in
              ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stream", "stream_options",
               "stop", "n", "logprobs", "tools")})


def _parse(raw: bytes) -> None:
    try:
        parse_chat_request(parse_json_body(raw), "m", InferConfig(max_new_tokens=8), LIMITS)
    except ApiError as e:
        assert 400 <= e.status < 500 and e.message


@settings(max_examples=400, deadline=None)
@given(body=_body)
def test_fuzzed_request_objects_parse_or_raise_api_error(body):
    _parse(json.dumps(body).encode())


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_fuzzed_body_bytes_parse_or_raise_api_error(raw):
    _parse(raw)


_header_value = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=30)


@settings(max_examples=300, deadline=None)
@given(headers=st.lists(st.tuples(st.sampled_from(["Content-Length", "Transfer-Encoding", "Content-Type",
                                                   "Content-Encoding", "Host", "Origin"]), _header_value), max_size=6))
def test_fuzzed_headers_pass_or_raise_api_error(headers):
    message = email.message.Message()
    for name, value in headers:
        message[name] = value
    for check in (content_length, check_content_type, lambda h: check_origin(h, LOOPBACK_NAMES)):
        try:
            result = check(message)
        except ApiError as e:
            assert 400 <= e.status < 500
        else:
            if check is content_length:
                assert isinstance(result, int) and result >= 0
