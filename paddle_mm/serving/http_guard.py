"""The HTTP checks that come before a request body is read, and the timer on how long a request
may take to arrive. Each check is cheap and refuses with an ApiError, so a crafted request costs
the server a header parse, not a body read, a decode or a place in the model's queue.

Why each one exists:
- Content-Length is the only framing accepted, and it must be one plain decimal: a negative value
  once passed the size check and then read the stream to its end; a body under a
  Transfer-Encoding (chunked, gzip, ...) would be framed by a header we do not honour.
- Content-Type must be application/json: a web page can POST text/plain to any address without
  the browser asking first (a "simple" request), so without this any page could make the server
  work; application/json needs a CORS preflight, which this server never grants.
- Host (and Origin) must name the loopback when the server is bound to it: DNS rebinding points
  an attacker's name at 127.0.0.1, and the browser then sends that name as Host. Jupyter and vLLM
  refuse such requests the same way.
"""
from __future__ import annotations

import re
import select
import socket
import threading
import time
from urllib.parse import urlsplit

from paddle_mm.serving.openai_api import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_DECIMAL = re.compile(r"[0-9]{1,19}")  # 19 digits: below 2**63, and far above any limit


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or host.startswith("127.")


def content_length(headers) -> int:
    """The body's byte count: ApiError unless the framing is one plain decimal Content-Length."""
    codings = headers.get_all("Transfer-Encoding")
    if codings:
        raise ApiError(411, f"request bodies under a Transfer-Encoding ({', '.join(codings)[:80]}) are not "
                       "accepted; send Content-Length", "length_required")
    lengths = headers.get_all("Content-Length") or []
    if not lengths:
        raise ApiError(411, "the request needs a Content-Length header", "length_required")
    if len(lengths) > 1:
        raise ApiError(400, f"the request has {len(lengths)} Content-Length headers; send one", "bad_length")
    text = lengths[0].strip(" \t")
    if not _DECIMAL.fullmatch(text):
        raise ApiError(400, f"Content-Length must be a decimal byte count, got {text[:40]!r}", "bad_length")
    return int(text)


def check_content_type(headers) -> None:
    """ApiError 415 unless the body is declared as JSON, not compressed."""
    coding = (headers.get("Content-Encoding") or "identity").strip().lower()
    if coding != "identity":
        raise ApiError(415, f"Content-Encoding {coding[:40]!r} is not accepted; send the JSON as it is",
                       "unsupported_media_type")
    kind = (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"the request body must be sent as Content-Type: application/json, not {kind[:60]!r}",
                       "unsupported_media_type")


def check_origin(headers, allowed_hosts: tuple[str, ...]) -> None:
    """ApiError 403 unless Host (when sent) and Origin (when sent) name one of allowed_hosts."""
    host = headers.get("Host")
    if host is not None and _hostname(host) not in allowed_hosts:
        raise ApiError(403, f"Host {host[:80]!r} is not this server's (it listens on the loopback; "
                       "serve with --allow-host NAME to accept another name)", "forbidden_host")
    origin = headers.get("Origin")
    if origin is not None:
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or _hostname(parts.netloc) not in allowed_hosts:
            raise ApiError(403, f"requests from the web page at {origin[:80]!r} are not accepted", "forbidden_origin")


def _hostname(netloc: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:80' -> '::1', lower-cased."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:netloc.find("]")] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def client_gone(sock: socket.socket) -> bool:
    """True once the peer has closed its end (it will read no answer): a peek at the socket that
    does not block and does not take bytes a pipelined next request may hold. select() first: on a
    socket with a timeout, Python waits for data before a recv, MSG_DONTWAIT or not."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):  # reset, or already closed
        return True


class ArrivalTimer:
    """Cuts off requests whose headers and body take longer than `seconds` to arrive.

    A socket timeout bounds each read, not their sum, so a client sending a byte a minute
    would hold a thread for ever. One thread watches the deadlines and shuts the late socket
    for reading: the handler's read then ends at once, and it can still answer 408.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._due: dict[socket.socket, float] = {}
        self._late: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._watch, name="paddle_mm-arrival", daemon=True).start()

    def start(self, sock: socket.socket) -> None:
        with self._lock:
            self._due[sock] = time.monotonic() + self.seconds
            self._late.discard(sock)

    def stop(self, sock: socket.socket) -> bool:
        """End the watch on sock; True if its deadline had passed (its reads were cut)."""
        with self._lock:
            self._due.pop(sock, None)
            late = sock in self._late
            self._late.discard(sock)
            return late

    def late(self, sock: socket.socket) -> bool:
        """True if sock's deadline has passed: what it sent was cut short, whatever it looks like."""
        with self._lock:
            return sock in self._late

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(0.25, self.seconds / 4)):
            now = time.monotonic()
            with self._lock:
                late = [s for s, due in self._due.items() if due <= now]
                for sock in late:
                    del self._due[sock]
                    self._late.add(sock)
            for sock in late:
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass  # already closed by the client
