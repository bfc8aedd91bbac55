"""A checkpoint's own chat template (Jinja), found in its folder and rendered as transformers renders it.

Models trained here from scratch use ChatML (data/tokenizer.py writes it token by token); a
checkpoint downloaded from a hub brings the template it was trained with, and prompting it
in another one makes it answer worse. The template is looked for where transformers 4.x and
5.x `save_pretrained` put it: chat_template.jinja, chat_template.json, or a "chat_template"
entry of tokenizer_config.json / processor_config.json.

Rendering uses the environment transformers uses (a sandbox with trim_blocks and
lstrip_blocks, loop controls, `raise_exception`, a `tojson` that does not escape HTML,
`strftime_now`, the `{% generation %}` tag), with the tokenizer's special tokens as variables.

Training labels need the characters each assistant message adds. They are found by rendering
the conversation prefix by prefix: the text the assistant message adds after the generation
prompt of the turns before it. A template that rewrites earlier turns (so a prefix is not a
prefix of the whole) is refused with the turn it changed.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from datetime import datetime

from paddle_mm.errors import CheckpointError, DataError
from paddle_mm.fileio import read_json_object

TEMPLATE_FILE = "chat_template.jinja"
_JSON_TEMPLATE_FILE = "chat_template.json"
_CONFIG_FILES = ("tokenizer_config.json", "processor_config.json")
_IMAGE = "<image>"
_VIDEO = "<video>"  # one video part (Qwen2-VL's templates render it as <|vision_start|><|video_pad|>...)


def _read_json(path: str) -> dict:
    return read_json_object(path, lambda reason: CheckpointError(f"{path}: {reason}"))


def _pick(value, source: str) -> str | None:
    """A template entry: a string, or transformers' list of {"name", "template"} (the "default" one)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise CheckpointError(f"{source}: chat_template is neither a string nor a list with a 'default' entry")


def find_chat_template(folder: str) -> tuple[str, str] | None:
    """(template text, the file it came from) of a checkpoint folder, or None when it has none."""
    path = os.path.join(folder, TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    path = os.path.join(folder, _JSON_TEMPLATE_FILE)
    if os.path.isfile(path):
        text = _pick(_read_json(path).get("chat_template"), path)
        if text:
            return text, path
    for name in _CONFIG_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            text = _pick(_read_json(path).get("chat_template"), path)
            if text:
                return text, path
    return None


def special_token_strings(folder: str) -> dict[str, str]:
    """bos_token, eos_token, pad_token, unk_token of a folder's tokenizer_config.json (as strings)."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    raw = _read_json(path)
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = raw.get(key)
        if isinstance(value, dict):  # older files store an AddedToken as a dict
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _environment():
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("a checkpoint's chat template needs the 'jinja2' package: pip install jinja2") from e

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' masks; it renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env, jinja2.exceptions.TemplateError


class ChatTemplate:
    """A Jinja chat template with the special-token strings it may refer to."""

    def __init__(self, text: str, origin: str, special_tokens: dict[str, str] | None = None):
        env, self._error = _environment()
        self.text = text
        self.origin = origin
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = env.from_string(text)
        except self._error as e:
            raise CheckpointError(f"{origin}: the chat template does not compile: {e}") from None
        # Processor templates (LLaVA's) read content as a list of {"type": "image"} / {"type": "text"}
        # parts; tokenizer templates (Qwen2's, Llama's) print content as a string.
        probe = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
        try:
            self.parts = "'type'" not in self._render_raw(probe, True)
        except Exception:  # a string template may fail on a list in any way (concatenation, filters)
            self.parts = False

    @classmethod
    def from_folder(cls, folder: str) -> ChatTemplate | None:
        found = find_chat_template(folder)
        return None if found is None else cls(found[0], found[1], special_token_strings(folder))

    def _render_raw(self, messages, add_generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except self._error as e:
            raise DataError("<conversation>", f"the chat template of {self.origin} refused it: {e}") from None

    def _message(self, role: str, text: str) -> dict:
        if not self.parts:
            return {"role": role, "content": text}
        content = []
        for i, piece in enumerate(re.split(f"({_IMAGE}|{_VIDEO})", text)):
            if i % 2:
                content.append({"type": "image" if piece == _IMAGE else "video"})
            elif piece.strip():
                content.append({"type": "text", "text": piece.strip("\n")})
        return {"role": role, "content": content}

    def render(self, turns: Sequence[tuple[str, str]], system: str = "", add_generation_prompt: bool = False) -> str:
        messages = [self._message(r, t) for r, t in ([("system", system)] if system else []) + list(turns)]
        return self._render_raw(messages, add_generation_prompt)

    def assistant_spans(self, turns: Sequence[tuple[str, str]], system: str = "") -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) characters each assistant message adds.

        Trailing whitespace after a message (a newline between turns) is not part of its span.
        """
        full = self.render(turns, system)
        spans = []
        for k, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            before = self.render(turns[:k], system, add_generation_prompt=True)
            upto = self.render(turns[: k + 1], system)
            if not upto.startswith(before) or not full.startswith(upto):
                raise DataError("<conversation>", f"the chat template of {self.origin} renders turn {k + 1} "
                                "differently once later turns follow, so its assistant text cannot be labelled")
            end = len(upto.rstrip())
            if end > len(before):
                spans.append((len(before), end))
        return full, spans
