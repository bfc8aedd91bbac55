"""Streamed text and stop strings (inference/streaming.py), as the server and the Python API use them."""
from __future__ import annotations

import pytest

from paddle_mm.data.tokenizer import Tokenizer
from paddle_mm.inference.streaming import StopGeneration, TextStream

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
