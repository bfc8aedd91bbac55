"""The OpenAI chat-completions protocol, without the HTTP: request -> (Sample, decoding settings),
token ids -> text deltas, and OpenAI-style errors.

A request's messages become the turns paddle_mm trains on, rendered later by the model's chat
template (ChatML, or the checkpoint's own) in tokenizer.encode_chat, through
inference.generate_answers. Images arrive as content parts
{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}; local paths only
when the server names a folder they may come from. In a user message with one image the text
goes through the recipe's infer.vqa_prompt (an image alone through infer.caption_prompt), so a
question is worded as the model saw it in training; with several images (several image_url parts in
one message, in their order) the prompt's <image> stands for all of them, one tag a line.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from paddle_mm.config import InferConfig
from paddle_mm.data.image import open_image
from paddle_mm.data.readers import Sample, visual_prompt
from paddle_mm.data.tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS
from paddle_mm.errors import DataError, ImageTooLargeError


@dataclass
class ServerLimits:
    max_request_bytes: int = 16 * 2**20
    max_image_bytes: int = 8 * 2**20  # decoded bytes of one image file
    max_image_pixels: int = 4096 * 4096
    # All the images of one request together: a few KB of solid-colour PNGs can claim 8 images
    # at the per-image limit, and each is decoded in full before it is shrunk to the model's size.
    max_request_pixels: int = 2 * 4096 * 4096
    max_tokens: int = 512  # the most new tokens one request may ask for
    max_images: int = 8  # per request
    max_pending: int = 64  # requests waiting for the model at once (a place taken before the body is read)
    max_connections: int = 128  # open at once; more are answered 503 and closed
    max_arrival_s: float = 60.0  # from a request's first byte to its body's last; then 408
    max_batch: int = 8  # requests answered together in one batched generation
    join: bool = True  # requests may join a running generation (continuous batching, where the backbone allows)


class ApiError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    TYPES = {503: "server_error", 500: "server_error"}  # the rest: invalid_request_error

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class ChatJob:
    # images are in the order of their <image> tags: the model's input arrays when the server
    # gave parse_chat_request its image processor's preprocess, else decoded PIL images
    sample: Sample
    system: str
    infer: InferConfig  # the recipe's settings with the request's sampling parameters applied
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json_body(raw: bytes):
    """A request body's JSON value; ApiError 400 for anything json.loads would not read as strict
    JSON (bad syntax or UTF-8, NaN/Infinity, a 5000-digit number, nesting past the recursion limit)."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: nested too deeply", "invalid_json") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the request body is not valid JSON: {str(e)[:200]}", "invalid_json") from None


def parse_chat_request(body, model_name: str, infer: InferConfig, limits: ServerLimits,
                       local_image_root: str = "", prepare_image: Callable | None = None) -> ChatJob:
    """Check a /v1/chat/completions body and turn it into a ChatJob; ApiError on anything wrong.

    prepare_image (the model's image preprocessing) is applied to each image as soon as it is
    decoded, so a request waiting for the model holds its images at the model's size.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required", "missing_required_parameter", "model")
    if model != model_name:
        raise ApiError(404, f"The model '{model}' does not exist; this server has '{model_name}'",
                       "model_not_found", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_value", "messages")
    for key, default in (("n", 1), ("logprobs", False), ("tools", None), ("tool_choice", None)):
        if body.get(key, default) not in (default, None):
            raise ApiError(400, f"'{key}' is not supported by this server", "unsupported_parameter", key)

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = min(infer.max_new_tokens, limits.max_tokens)
    _check_number(max_tokens, "max_tokens", 1, limits.max_tokens, integer=True)
    settings = replace(infer, max_new_tokens=max_tokens, num_beams=1, batch_size=1)
    if body.get("temperature") is not None:
        temperature = _check_number(body["temperature"], "temperature", 0, 2)
        settings = replace(settings, do_sample=temperature > 0, temperature=temperature or 1.0)
    if body.get("top_p") is not None:
        top_p = _check_number(body["top_p"], "top_p", 0, 1)
        if top_p == 0:
            raise ApiError(400, "'top_p' must be above 0", "invalid_value", "top_p")
        settings = replace(settings, top_p=top_p)
    seed = body.get("seed")
    if seed is not None:
        _check_number(seed, "seed", -(2**63), 2**63 - 1, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "invalid_type", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "invalid_type", "stream_options")

    system, turns, images = _conversation(messages, infer, limits, local_image_root, prepare_image)
    sample = Sample(id="0", images=images, turns=turns, source="request", index=0)
    return ChatJob(sample=sample, system=system, infer=settings, stream=stream,
                   include_usage=bool(options.get("include_usage")), stop=_stop_strings(body.get("stop")), seed=seed)


def _check_number(value, name: str, lo, hi, integer: bool = False):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind} from {lo} to {hi}, got {value!r}", "invalid_value", name)
    return value


def _stop_strings(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "invalid_value", "stop")
    return stops


def _conversation(messages: list, infer: InferConfig, limits: ServerLimits, local_image_root: str,
                  prepare_image: Callable | None):
    """(system text, ChatML turns, images) of the messages."""
    system_texts: list[str] = []
    turns: list[tuple[str, str]] = []
    images = []
    pixels_left = limits.max_request_pixels
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{param} must be an object", "invalid_type", param)
        role = m.get("role")
        texts, urls = _content_parts(m.get("content"), param)
        if role in ("system", "developer"):
            if urls:
                raise ApiError(400, f"{param}: a {role} message cannot hold images", "invalid_value", param)
            system_texts.append("\n".join(texts))
            continue
        if role not in ("user", "assistant"):
            raise ApiError(400, f"{param}: role {role!r} is not supported (system, user, assistant)",
                           "invalid_value", f"{param}.role")
        if role == "assistant" and urls:
            raise ApiError(400, f"{param}: an assistant message cannot hold images", "invalid_value", param)
        if len(images) + len(urls) > limits.max_images:
            raise ApiError(400, f"more than {limits.max_images} images in one request", "too_many_images", param)
        for k, url in enumerate(urls):  # one at a time, each shrunk before the next is decoded
            image, pixels = decode_image_url(url, limits, local_image_root, f"{param}.content[image {k}]",
                                             pixels_left, prepare_image)
            images.append(image)
            pixels_left -= pixels
        text = "\n".join(texts).strip()
        if role == "user":
            text = user_text(text, len(urls), infer)
        if not text:
            raise ApiError(400, f"{param} has no text and no image", "invalid_value", f"{param}.content")
        turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's", "invalid_value", "messages")
    return "\n".join(system_texts), turns, images


def user_text(question: str, num_images: int, infer: InferConfig) -> str:
    """A user turn's text with its <image> tags, worded like the training prompts: the recipe's
    vqa_prompt (an image alone: caption_prompt), its <image> widened to one tag per image."""
    if num_images == 0:
        return question
    template = infer.vqa_prompt if question else infer.caption_prompt
    if template.count(IMAGE_TOKEN) == 1:
        widened = visual_prompt(template, num_images)
        return widened.format(question=question) if question else widened
    return "\n".join([IMAGE_TOKEN] * num_images + ([question] if question else []))


def _content_parts(content, param: str) -> tuple[list[str], list[str]]:
    """(texts, image urls) of a message's content: a string or a list of typed parts."""
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise ApiError(400, f"{param}.content must be a string or a list of parts", "invalid_type", f"{param}.content")
    texts, urls = [], []
    for k, part in enumerate(parts):
        where = f"{param}.content[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            for token in SPECIAL_TOKENS:  # they would break the chat template or the image count
                if token in part["text"]:
                    raise ApiError(400, f"{where}: the text may not contain {token!r}", "invalid_value", where)
            try:  # JSON may carry a lone surrogate ("\ud800"), which no tokenizer can encode
                part["text"].encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{where}: the text is not valid Unicode (a lone surrogate)", "invalid_value",
                               where) from None
            texts.append(part["text"])
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise ApiError(400, f"{where}: image_url needs a 'url' string", "invalid_value", where)
            urls.append(url)
        else:
            raise ApiError(400, f"{where}: expected a part of type 'text' or 'image_url'", "invalid_value", where)
    return texts, urls


_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+(=[^;,]*)?)*),(?P<data>.*)$", re.S)


def decode_image_url(url: str, limits: ServerLimits, local_image_root: str, where: str,
                     pixels_left: int | None = None, prepare: Callable | None = None) -> tuple:
    """A data: URL (base64), or a local path under local_image_root when one is set -> (the RGB
    PIL image, or prepare(it); its pixel count). pixels_left: what the request may still decode."""
    if url.startswith("data:"):
        match = _DATA_URL.match(url)
        if not match or ";base64" not in match.group("params"):
            raise ApiError(400, f"{where}: a data URL must be base64: data:image/png;base64,...", "invalid_image_url")
        payload = match.group("data").strip()
        if not payload:
            raise ApiError(400, f"{where}: the data URL holds no image data", "invalid_image_url")
        if len(payload) * 3 // 4 > limits.max_image_bytes + 2:
            raise ApiError(413, f"{where}: the image is larger than {limits.max_image_bytes} bytes", "image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the data URL is not valid base64", "invalid_image_url") from None
        return _open(io.BytesIO(data), where, limits, pixels_left, prepare)
    if url.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: this server fetches no URLs; send the image as a base64 data URL",
                       "invalid_image_url")
    path = url[len("file://"):] if url.startswith("file://") else url
    if not local_image_root:
        raise ApiError(400, f"{where}: local image paths are refused (the server allows them with "
                       "--allow-local-images DIR); send a base64 data URL", "invalid_image_url")
    root = os.path.realpath(local_image_root)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root or not os.path.isfile(real):
        raise ApiError(400, f"{where}: {path!r} is not a file inside the allowed image folder", "invalid_image_url")
    if os.path.getsize(real) > limits.max_image_bytes:
        raise ApiError(413, f"{where}: the image is larger than {limits.max_image_bytes} bytes", "image_too_large")
    return _open(real, where, limits, pixels_left, prepare)


# Images decoded at once in this process, whatever the number of requests: a full-size decode
# is tens of MB before it is shrunk, and one model thread cannot use more than a few ready.
_DECODING = threading.BoundedSemaphore(2)


def _open(fp, where: str, limits: ServerLimits, pixels_left: int | None, prepare: Callable | None):
    budget = limits.max_image_pixels if pixels_left is None else min(limits.max_image_pixels, pixels_left)
    with _DECODING:
        try:
            image = open_image(fp, where, max(budget, 1))
        except ImageTooLargeError as e:
            if budget < limits.max_image_pixels:
                raise ApiError(413, f"{e}: the request's images may hold {limits.max_request_pixels} pixels "
                               "in all", "image_too_large") from None
            raise ApiError(413, str(e), "image_too_large") from None
        except DataError as e:
            raise ApiError(400, f"{e} (is it an image file?)", "invalid_image") from None
        pixels = image.width * image.height
        out = prepare(image) if prepare is not None else image
        del image  # the full-size decode goes now, not when the request is answered
    return out, pixels


def completion_body(job: ChatJob, model: str, text: str, finish_reason: str, usage: dict) -> dict:
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage}


def chunk_body(job: ChatJob, model: str, delta: dict, finish_reason: str | None = None,
               usage: dict | None = None) -> dict:
    body = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": model,
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                          "logprobs": None}]}
    if usage:
        body["usage"] = usage
    return body
