"""Crafted requests against the live server: each gets its 4xx (a JSON error) cheaply, and the
server answers a normal request right after. Raw sockets, because a well-behaved client library
would not send most of these."""
from __future__ import annotations

import base64
import contextlib
import http.client
import importlib.util
import io
import json
import os
import socket
import threading
import time

import pytest
from PIL import Image

from paddle_mm.serving.openai_api import ServerLimits
from paddle_mm.serving.server import ChatServer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = "tiny-vlm"
GOOD = json.dumps({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hello"}]}).encode()


def _addr(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _request(body: bytes, headers: dict | None = None, path: str = "/v1/chat/completions",
             method: str = "POST") -> bytes:
    """A request's bytes; headers None-valued are left out, so a test can drop the defaults."""
    base = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body))}
    lines = [f"{method} {path} HTTP/1.1"]
    for k, v in {**base, **(headers or {})}.items():
        for value in v if isinstance(v, list) else [v]:
            if value is not None:
                lines.append(f"{k}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _exchange(url: str, data: bytes, timeout: float = 30) -> tuple[int, dict]:
    """Send raw bytes, read one response: (status, JSON body)."""
    with socket.create_connection(_addr(url), timeout=timeout) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


def _assert_still_serving(url: str) -> None:
    status, body = _exchange(url, _request(GOOD))
    assert status == 200 and isinstance(body["choices"][0]["message"]["content"], str)


def _png(size: tuple[int, int], colour="red", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def _image_body(*images: bytes, mime: str = "image/png") -> bytes:
    parts = [{"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(i).decode()}}
             for i in images]
    return json.dumps({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": parts}]}).encode()


CASES = {
    # framing
    "negative Content-Length": (_request(b"{}", {"Content-Length": "-1"}), 400, "bad_length"),
    "signed Content-Length": (_request(b"{}", {"Content-Length": "+2"}), 400, "bad_length"),
    "hex Content-Length": (_request(b"{}", {"Content-Length": "0x2"}), 400, "bad_length"),
    "two Content-Lengths": (_request(b"{}", {"Content-Length": ["2", "2"]}), 400, "bad_length"),
    "no Content-Length": (_request(b"", {"Content-Length": None}), 411, "length_required"),
    "chunked": (_request(b"2\r\n{}\r\n0\r\n\r\n", {"Content-Length": None, "Transfer-Encoding": "chunked"}),
                411, "length_required"),
    "gzip, chunked beside a Content-Length": (_request(b"{}", {"Transfer-Encoding": "gzip, chunked"}),
                                              411, "length_required"),
    "a 20-digit Content-Length": (_request(b"{}", {"Content-Length": "9" * 20}), 400, "bad_length"),
    "a body past the limit": (_request(b" " * 400_001), 413, "request_too_large"),
    "a 1 TB Content-Length": (_request(b"", {"Content-Length": str(10**12)}), 413, "request_too_large"),
    # what the body is declared as
    "text/plain (a form any web page can post)": (_request(GOOD, {"Content-Type": "text/plain"}), 415,
                                                  "unsupported_media_type"),
    "no Content-Type": (_request(GOOD, {"Content-Type": None}), 415, "unsupported_media_type"),
    "form-encoded": (_request(GOOD, {"Content-Type": "application/x-www-form-urlencoded"}), 415,
                     "unsupported_media_type"),
    "gzip-encoded body": (_request(GOOD, {"Content-Encoding": "gzip"}), 415, "unsupported_media_type"),
    # DNS rebinding and cross-site pages
    "a rebinding Host": (_request(GOOD, {"Host": "attacker.example:8000"}), 403, "forbidden_host"),
    "a look-alike Host": (_request(GOOD, {"Host": "127.0.0.1.attacker.example"}), 403, "forbidden_host"),
    "a foreign Origin": (_request(GOOD, {"Origin": "http://attacker.example"}), 403, "forbidden_origin"),
    "a null Origin": (_request(GOOD, {"Origin": "null"}), 403, "forbidden_origin"),
    "a GET with a rebinding Host": (_request(b"", {"Host": "attacker.example", "Content-Length": None},
                                             "/v1/models", "GET"), 403, "forbidden_host"),
    # bodies
    "deep nesting": (_request(b"[" * 100_000 + b"]" * 100_000), 400, "invalid_json"),
    "deep nesting in a message": (_request(json.dumps({"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "x", "more": json.loads("[" * 500 + "]" * 500)}]}]
    }).encode()), 200, None),  # nesting the parser never walks is no harm
    "NaN": (_request(b'{"model": "tiny-vlm", "temperature": NaN, "messages": []}'), 400, "invalid_json"),
    "a 5000-digit number": (_request(b'{"max_tokens": ' + b"9" * 5000 + b"}"), 400, "invalid_json"),
    "a lone surrogate": (_request(b'{"model": "tiny-vlm", "max_tokens": 2, "messages": [{"role": "user", '
                                  b'"content": "hi \\ud800"}]}'), 400, "invalid_value"),
    "not UTF-8": (_request(b'{"model": "\xff"}'), 400, "invalid_json"),
    "a body shorter than its Content-Length": (_request(b"{}", {"Content-Length": "10"}), 400, "incomplete_body"),
    "a bad request line": (b"POST /v1/chat/completions HTTP/1.1 extra\r\n\r\n", 400, "bad_request"),
    "a request line past 64 KiB": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "request_uri_too_long"),
    "more than 100 headers": (_request(GOOD, {f"X-{i}": "y" for i in range(101)}), 431,
                              "request_header_fields_too_large"),
    "an unknown method": (_request(b"", {"Content-Length": None}, "/", "BREW"), 501, "not_implemented"),
    # images
    "an image bomb (solid 4096 x 4096 PNG)": (_request(_image_body(_png((4096, 4096)))), 413, "image_too_large"),
    "images past the request's pixel budget": (_request(_image_body(_png((200, 200)), _png((200, 200)))), 413,
                                               "image_too_large"),
    "a TIFF": (_request(_image_body(_png((32, 32), fmt="TIFF"), mime="image/tiff")), 400, "invalid_image"),
    "an EPS file": (_request(_image_body(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
                                         mime="application/postscript")), 400, "invalid_image"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_crafted_request_gets_its_error_and_the_server_keeps_serving(served, case):
    data, status, code = CASES[case]
    if case == "a body shorter than its Content-Length":  # the client sends 2 of 10 bytes, then stops
        with socket.create_connection(_addr(served["url"]), timeout=30) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            response = http.client.HTTPResponse(sock)
            response.begin()
            got, body = response.status, json.loads(response.read())
    else:
        got, body = _exchange(served["url"], data)
    assert got == status, body
    if code is not None:
        assert body["error"]["code"] == code and body["error"]["message"]
    _assert_still_serving(served["url"])


def test_images_within_the_budget_and_in_allowed_formats_are_answered(served):
    for fmt, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("BMP", "image/bmp"),
                      ("GIF", "image/gif")):
        status, body = _exchange(served["url"], _request(_image_body(_png((64, 48), "blue", fmt), mime=mime)))
        assert status == 200, (fmt, body)


@contextlib.contextmanager
def side_server(engine, **limits):
    server = ChatServer(engine, port=0, limits=ServerLimits(max_tokens=16, **limits))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_a_request_trickled_past_the_arrival_limit_gets_408(served):
    with side_server(served["server"].engine, max_arrival_s=1.0) as server:
        for first, rest in ((b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127", b".0.0.1\r\n"),  # in the headers
                            (_request(GOOD)[:-10], b"")):  # in the body
            with socket.create_connection(_addr(server.url), timeout=30) as sock:
                t0 = time.monotonic()
                sock.sendall(first)
                for byte in rest:  # a byte every 0.3 s: no single read waits long
                    time.sleep(0.3)
                    with contextlib.suppress(OSError):
                        sock.sendall(bytes([byte]))
                response = http.client.HTTPResponse(sock)
                response.begin()
                assert response.status == 408 and json.loads(response.read())["error"]["message"]
                assert time.monotonic() - t0 < 10
        _assert_still_serving(server.url)


def test_connections_past_the_cap_are_turned_away_and_places_come_back(served):
    with side_server(served["server"].engine, max_connections=2) as server:
        idle = [socket.create_connection(_addr(server.url), timeout=30) for _ in range(2)]
        time.sleep(0.3)  # both accepted, each holding a thread
        status, body = _exchange(server.url, _request(GOOD))
        assert status == 503 and body["error"]["code"] == "server_busy"
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 10
        while server.connections._value < 2 and time.monotonic() < deadline:  # noqa: SLF001
            time.sleep(0.05)
        _assert_still_serving(server.url)


def test_the_queue_place_is_taken_before_the_body_is_read(served):
    with side_server(served["server"].engine, max_pending=1) as server:
        slow = socket.create_connection(_addr(server.url), timeout=30)
        data = _request(GOOD)
        slow.sendall(data[:-5])  # headers and most of the body: it holds the one place while it uploads
        deadline = time.monotonic() + 10
        while server.pending._value and time.monotonic() < deadline:  # noqa: SLF001
            time.sleep(0.02)
        status, body = _exchange(server.url, _request(_image_body(_png((4096, 4096)))))
        assert status == 503 and body["error"]["code"] == "server_busy"  # refused before its image is decoded
        slow.sendall(data[-5:])
        response = http.client.HTTPResponse(slow)
        response.begin()
        assert response.status == 200
        slow.close()


def test_a_non_streamed_generation_stops_when_its_client_leaves(served, monkeypatch):
    engine = served["server"].engine
    generated = []
    real = engine._generate  # noqa: SLF001
    monkeypatch.setattr(engine, "_generate", lambda job, *a: generated.append(job) or real(job, *a))
    with side_server(engine) as server:
        with engine.lock:  # the model is busy, so the request waits in the queue
            sock = socket.create_connection(_addr(server.url), timeout=30)
            sock.sendall(_request(GOOD))
            deadline = time.monotonic() + 10
            while server.pending._value == server.limits.max_pending and time.monotonic() < deadline:  # noqa: SLF001
                time.sleep(0.02)
            sock.close()  # the client gives up
            while server.pending._value < server.limits.max_pending and time.monotonic() < deadline:  # noqa: SLF001
                time.sleep(0.05)
            assert server.pending._value == server.limits.max_pending  # noqa: SLF001 (its handler let go)
        time.sleep(0.3)
        assert generated == []  # the model thread skipped it
        _assert_still_serving(server.url)


def test_slow_clients_do_not_stop_well_behaved_ones(served):
    """A bounded load test: 6 slowloris connections trickling headers, beside 4 clients sending 8
    good requests; every good request is answered and every slow one is cut at the arrival limit."""
    spec = importlib.util.spec_from_file_location("load_test", os.path.join(REPO, "benchmarks", "load_test.py"))
    lt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lt)
    with side_server(served["server"].engine, max_arrival_s=2.0, max_connections=16) as server:
        slow_statuses = []

        def slowloris() -> None:
            with socket.create_connection(_addr(server.url), timeout=30) as sock:
                try:
                    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
                    for _ in range(40):
                        time.sleep(0.25)
                        sock.sendall(b"X-a: b\r\n")
                except OSError:
                    pass
                try:
                    response = http.client.HTTPResponse(sock)
                    response.begin()
                    slow_statuses.append(response.status)
                except (OSError, http.client.HTTPException):
                    slow_statuses.append("cut")

        slow = [threading.Thread(target=slowloris) for _ in range(6)]
        for t in slow:
            t.start()
        t0 = time.monotonic()
        bodies = lt.make_bodies(MODEL, served["images"][:2], requests=8, max_tokens=2, bad_every=0)
        r = lt.run_load(server.url, bodies, clients=4, timeout=60)
        assert (r["answered"], r["failed"], r["lost"]) == (8, 0, 0)
        for t in slow:
            t.join(30)
        assert slow_statuses and all(s in (408, "cut") for s in slow_statuses) and len(slow_statuses) == 6
        assert time.monotonic() - t0 < 60


def test_the_client_gone_check_never_waits():
    """On a socket with a timeout, a plain non-blocking peek still waited for data: the check
    then held a queued request's thread for the whole socket timeout."""
    from paddle_mm.serving.http_guard import client_gone

    ours, theirs = socket.socketpair()
    ours.settimeout(120)
    t0 = time.monotonic()
    assert client_gone(ours) is False and time.monotonic() - t0 < 1
    theirs.sendall(b"next request")  # pipelined bytes are not a goodbye, and are not taken
    assert client_gone(ours) is False and ours.recv(4) == b"next"
    theirs.close()
    ours.recv(100)
    assert client_gone(ours) is True
    ours.close()
