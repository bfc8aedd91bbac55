"""The OpenAI chat-completions protocol, without the HTTP: request -> (Sample, decoding settings),
token ids -> text deltas, and OpenAI-style errors.

A request's messages become the turns paddle_mm trains on, rendered later by the model's chat
template (ChatML, or the checkpoint's own) in tokenizer.encode_chat, through
inference.generate_answers. Images arrive as content parts
{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}; local paths only
when the server names a folder they may come from. In a user message with one image the text
goes through the recipe's infer.vqa_prompt (an image alone through infer.caption_prompt), so a
question is worded as the model saw it in training; with several images their tags come first.
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import time
import uuid
from dataclasses import dataclass, field, replace

from paddle_mm.config import InferConfig
from paddle_mm.data.image import open_image
from paddle_mm.data.readers import Sample
from paddle_mm.data.tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS
from paddle_mm.errors import DataError, ImageTooLargeError
from paddle_mm.inference.streaming import StopGeneration, TextStream  # noqa: F401 (the server's names)


@dataclass
class ServerLimits:
    max_request_bytes: int = 16 * 2**20
    max_image_bytes: int = 8 * 2**20  # decoded bytes of one image file
    max_image_pixels: int = 4096 * 4096
    max_tokens: int = 512  # the most new tokens one request may ask for
    max_images: int = 8  # per request
    max_pending: int = 64  # requests waiting for the model at once; more are refused with 503


class ApiError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error body."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
             411: "invalid_request_error", 413: "invalid_request_error", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class ChatJob:
    sample: Sample  # images are decoded PIL images, in the order of their <image> tags
    system: str
    infer: InferConfig  # the recipe's settings with the request's sampling parameters applied
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


def parse_chat_request(body, model_name: str, infer: InferConfig, limits: ServerLimits,
                       local_image_root: str = "") -> ChatJob:
    """Check a /v1/chat/completions body and turn it into a ChatJob; ApiError on anything wrong."""
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

    system, turns, images = _conversation(messages, infer, limits, local_image_root)
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


def _conversation(messages: list, infer: InferConfig, limits: ServerLimits, local_image_root: str):
    """(system text, ChatML turns, images) of the messages."""
    system_texts: list[str] = []
    turns: list[tuple[str, str]] = []
    images = []
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
        images += [decode_image_url(url, limits, local_image_root, f"{param}.content[image {k}]")
                   for k, url in enumerate(urls)]
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
    """A user turn's text with its <image> tags, worded like the training prompts."""
    if num_images == 1:
        template = infer.vqa_prompt if question else infer.caption_prompt
        if template.count(IMAGE_TOKEN) == 1:
            return template.format(question=question) if question else template
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


def decode_image_url(url: str, limits: ServerLimits, local_image_root: str, where: str):
    """A data: URL (base64), or a local path under local_image_root when one is set -> RGB PIL image."""
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
        return _open(io.BytesIO(data), where, limits)
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
    return _open(real, where, limits)


def _open(fp, where: str, limits: ServerLimits):
    try:
        return open_image(fp, where, limits.max_image_pixels)
    except ImageTooLargeError as e:
        raise ApiError(413, str(e), "image_too_large") from None
    except DataError as e:
        raise ApiError(400, f"{e} (is it an image file?)", "invalid_image") from None


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
