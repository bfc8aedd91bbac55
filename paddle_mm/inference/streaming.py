"""Token ids in, text out, for answers that stream or stop on strings: one implementation for the
server (serving/) and the Python API (api/)."""
from __future__ import annotations

from collections.abc import Callable


class StopGeneration(Exception):
    """Raised from a token callback to end decoding early (a stop string was produced)."""


class TextStream:
    """Token ids in, text out: each delta extends what has been sent, and the deltas add up to
    finish()'s text, decode(ids).strip() cut before the first stop string (what a non-streamed
    answer is: inference.generate_answers strips the same way).

    Text is held back while it ends in whitespace, a partial UTF-8 character or what could
    be the start of a stop string.
    """

    def __init__(self, tokenizer, stop: list[str], on_delta: Callable[[str], None] | None = None):
        self.tokenizer, self.stop, self.on_delta = tokenizer, stop, on_delta
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        text, stopped = self._cut(self.tokenizer.decode(self.ids).lstrip())
        if stopped:
            self.stopped = True
            raise StopGeneration
        self._send(_safe_prefix(text, self.stop))

    def finish(self) -> str:
        text, self.stopped = self._cut(self.tokenizer.decode(self.ids).strip())
        self._send(text)
        return text

    def _cut(self, text: str) -> tuple[str, bool]:
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            delta, self.sent = text[len(self.sent):], text
            if self.on_delta is not None:
                self.on_delta(delta)


def _safe_prefix(text: str, stops: list[str]) -> str:
    hold = 0
    for s in stops:  # the longest end of `text` that a stop string begins with
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if s.startswith(text[-k:]):
                hold = k
                break
    return text[: len(text) - hold].rstrip().rstrip("\ufffd")
