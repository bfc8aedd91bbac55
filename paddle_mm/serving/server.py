"""`paddle-mm serve`: an OpenAI-compatible HTTP server for one trained run, standard library only.

    GET  /                      the chat page (pick an image, ask, watch the answer stream in)
    GET  /v1/models             the one model this server holds
    POST /v1/chat/completions   text and image content parts; "stream": true for server-sent events

Requests are read and checked on one thread each, but one model thread answers them: decoding
holds a KV cache and Paddle's global RNG, and Paddle keeps per-thread kernel caches, so a new
thread per request ran several times slower than one warm thread. The model thread takes every
request waiting when it is free (up to ServerLimits.max_batch, those with the same sampling
settings and no seed) and answers them in one batched generation: a batch of 8 decodes nearly
as fast per step as a batch of 1, so concurrent clients share the model's time instead of
queueing for it. Each row ends at its own stop string, max_tokens or departed client, and
leaves the batch; between steps, requests that arrived meanwhile join it (continuous batching,
decoding.RunningBatch, where the backbone allows: otherwise a batch runs to its longest
answer and newcomers wait for the next). Streamed
text goes back through a queue per request, so a slow reader does not hold up the model.

Crafted requests are refused early and cheaply (see ServerLimits and http_guard.py): a request
is framed by one plain Content-Length, JSON only, its Host/Origin checked when bound to the
loopback; it takes a place among ServerLimits.max_pending before its body is read (503 past
them), must arrive within max_arrival_s (408), and its images are decoded one at a time within a
per-request pixel budget and kept at the model's size while it waits. Connections past
max_connections get a 503 and are closed. A generation stops when its client leaves. Every
refusal is an OpenAI-style JSON error with a 4xx status, and the server goes on serving.
"""
from __future__ import annotations

import collections
import hmac
import json
import os
import queue
import re
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from paddle_mm.inference.streaming import StopGeneration, TextStream
from paddle_mm.serving.http_guard import (
    LOOPBACK_NAMES,
    ArrivalTimer,
    check_content_type,
    check_origin,
    client_gone,
    content_length,
    is_loopback,
)
from paddle_mm.serving.openai_api import (
    ApiError,
    ChatJob,
    ServerLimits,
    chunk_body,
    completion_body,
    parse_chat_request,
    parse_json_body,
)

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


class Engine:
    """The model of one run folder and the one thread that runs it, answering one ChatJob at a time."""

    def __init__(self, run_dir: str, model_name: str = "", num_threads: int = 0, max_batch: int = 8,
                 join: bool = True):
        from paddle_mm.api import load  # a run folder or a downloaded one, as the Python API loads it
        from paddle_mm.runtime import configure_cpu

        vlm = load(run_dir)
        configure_cpu(num_threads)  # after load, which sets every core
        self.recipe, self.tokenizer, self.model, self.image_processor = (vlm.recipe, vlm.tokenizer, vlm.model,
                                                                         vlm.image_processor)
        self.max_positions = self.model.config.lm.max_position_embeddings
        self.model_name = model_name or os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
        self.lock = threading.Lock()  # held while a batch runs
        self.max_batch = max_batch
        self._jobs: queue.Queue = queue.Queue()
        self._held: list = []  # taken from the queue but not batchable with the batch then formed
        # Open client connections (ChatServer counts them). A batch about to start waits up to
        # gather_s while more clients are connected than requests are queued: without it, the clients
        # of the batch just answered, asking again a few ms later, found the next batch started
        # without them, and 8 clients settled into two alternating batches of 4 (measured).
        self.gather_s = 0.02
        self._connected = 0
        self._arrival = threading.Condition()
        self.batch_sizes: collections.Counter = collections.Counter()  # generations started, by batch size
        self.join = join  # requests may join a running generation (where joinable())
        self.joins: collections.Counter = collections.Counter()  # requests joining a running one, by count
        threading.Thread(target=self._work, name="paddle_mm-model", daemon=True).start()

    def system_prompt(self, job: ChatJob) -> str:
        return job.system or self.recipe.data.system_prompt  # the one the model was trained with

    def check_length(self, job: ChatJob) -> int:
        """The prompt's token count; ApiError if prompt + max_tokens exceed the LM's positions."""
        from paddle_mm.inference.generate import prompt_length

        n = prompt_length(self.model, self.tokenizer, self.image_processor, job.sample, self.system_prompt(job))
        if n + job.infer.max_new_tokens > self.max_positions:
            raise ApiError(400, f"the prompt has {n} tokens; with max_tokens {job.infer.max_new_tokens} "
                           f"that exceeds the model's {self.max_positions} positions", "context_length_exceeded",
                           "messages")
        return n

    def connected(self, change: int) -> None:
        """A client connection opened (+1) or closed (-1)."""
        with self._arrival:
            self._connected += change
            self._arrival.notify_all()

    def _gather(self) -> None:
        """Before a batch forms: wait (up to gather_s) while it is not full and connected clients
        have no request queued, as the clients just answered will soon ask again."""
        deadline = time.monotonic() + self.gather_s
        with self._arrival:
            while 1 + len(self._held) + self._jobs.qsize() < min(self.max_batch, self._connected):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._arrival.wait(left)

    def answer(self, job: ChatJob, on_delta=None, gone=None) -> tuple[str, str, dict]:
        """(text, finish_reason, usage), computed on the model thread; on_delta(text), called on this
        thread, sees the answer as it grows. If on_delta raises, or gone() turns true (the client
        left; asked a few times a second, queued or not), decoding stops (ConnectionAbortedError)."""
        prompt_tokens = self.check_length(job)
        events: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        with self._arrival:
            self._jobs.put((job, events, cancelled))
            self._arrival.notify_all()
        while True:
            try:
                kind, value = events.get(timeout=None if gone is None else 0.25)
            except queue.Empty:
                if gone():
                    cancelled.set()
                    raise ConnectionAbortedError("the client left before its answer") from None
                continue
            if kind == "delta":
                if on_delta is not None:
                    try:
                        on_delta(value)
                    except BaseException:
                        cancelled.set()
                        raise
            elif kind == "error":
                raise value
            else:
                text, ids, stopped = value
                break
        # Decoding stops at eos before max_new_tokens, so a full budget means it was cut short.
        finish = "length" if not stopped and len(ids) >= job.infer.max_new_tokens else "stop"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                 "total_tokens": prompt_tokens + len(ids)}
        return text, finish, usage

    def _work(self) -> None:
        from paddle_mm.inference.generate import joinable

        while True:
            first = self._held.pop(0) if self._held else self._jobs.get()
            if self.max_batch > 1:
                self._gather()
            with self.lock:
                batch = self._batch_with(first)
                self.batch_sizes[len(batch)] += 1
                live = [entry for entry in batch if not entry[2].is_set()]  # clients that left while queued
                if not live:
                    continue
                if self.join and self.max_batch > 1 and live[0][0].seed is None \
                        and joinable(self.model, live[0][0].infer):
                    self._run_joined(live)
                    continue
                streams = self._generate(live)
            for (_, events, _), stream in zip(live, streams):
                if stream is not None:
                    events.put(("done", (stream.finish(), stream.ids, stream.stopped)))

    def _batch_with(self, first) -> list:
        """The oldest waiting job and every waiting job that can share its generation (the same
        sampling settings, no seed: a seeded request is answered alone, so its seed alone decides
        its sample), up to max_batch; the rest wait for the next batch, in order."""
        return [first] + self._take(first[0], self.max_batch - 1)

    def _take(self, template: ChatJob, room: int) -> list:
        """Up to `room` waiting jobs that can share a generation with `template`, oldest first."""
        taken, kept = [], []
        for entry in self._held + self._drain():
            if len(taken) < room and self._batchable(template, entry[0]):
                taken.append(entry)
            else:
                kept.append(entry)
        self._held = kept
        return taken

    def _run_joined(self, batch: list) -> None:
        """Decode the batch's rows together; after every step, the rows that ended are answered and
        leave, and jobs waiting meanwhile that can share the generation join it, up to max_batch rows."""
        import paddle

        from paddle_mm.lm.decoding import RunningBatch
        from paddle_mm.runtime import copying_views

        template = batch[0][0]
        a = template.infer
        running = RunningBatch(self.model.language_model, self.tokenizer.stop_ids, a.do_sample, a.temperature, a.top_p)
        owners: dict[int, tuple] = {}  # id(row) -> ((job, events, cancelled), stream)
        with paddle.no_grad(), copying_views():
            self._join(running, batch, owners)
            self._decode_joined(template, running, owners)

    def _decode_joined(self, template: ChatJob, running, owners: dict) -> None:
        waiting_since = None  # when jobs were first seen waiting to join
        while running.rows:
            try:
                ended = running.step()
            except Exception as e:  # noqa: BLE001 (each request's thread answers with the error)
                for row in running.rows:
                    owners.pop(id(row))[0][1].put(("error", e))
                return
            for row in ended:
                self._answered(owners.pop(id(row)))
            room = self.max_batch - len(running.rows)
            waiting = len(self._held) + self._jobs.qsize()
            if not (running.rows and room > 0 and waiting):
                waiting_since = None
                continue
            waiting_since = waiting_since or time.monotonic()
            if min(room, waiting) < self._join_group() and time.monotonic() - waiting_since < self.gather_s:
                continue
            newcomers = [e for e in self._take(template, room) if not e[2].is_set()]
            if newcomers:
                self.joins[len(newcomers)] += 1
                self._join(running, newcomers, owners)
            waiting_since = None

    def _join_group(self) -> int:
        """How many jobs join a running generation together: half the clients the batch could hold.
        A join's vision pass and prefill cost about the same for 1 or 4 prompts of a small model
        (per-op dispatch), and in a full server rows end about one a step, so joining each
        newcomer at once spent half the model thread on prefills of one or two prompts (py-spy, 8
        clients). Newcomers wait for room and company, at most gather_s."""
        return max(1, min(self.max_batch, self._connected) // 2)

    def _join(self, running, entries: list, owners: dict) -> None:
        """Prefill these jobs into the running batch. If that fails, those that have had no text yet
        are tried again one by one, and one failing alone gets the error."""
        from paddle_mm.inference.generate import prompt_embeddings
        from paddle_mm.lm.decoding import Row

        rows, streams = [], []
        for job, events, cancelled in entries:
            stream = self._stream(job, events)
            rows.append(Row(job.infer.max_new_tokens,
                            lambda token, stream=stream, cancelled=cancelled: _ends_row(stream, cancelled, token)))
            streams.append(stream)
        try:
            embeds, mask = prompt_embeddings(self.model, self.tokenizer, [job.sample for job, _, _ in entries],
                                             self.image_processor, self.system_prompt(entries[0][0]))
            ended = running.add(embeds, mask, rows)
        except Exception as e:  # noqa: BLE001
            for entry, stream in zip(entries, streams):
                if len(entries) == 1 or stream.ids:
                    entry[1].put(("error", e))
                else:
                    self._join(running, [entry], owners)
            return
        owners.update({id(row): (entry, stream) for row, entry, stream in zip(rows, entries, streams)})
        for row in ended:
            self._answered(owners.pop(id(row)))

    def _stream(self, job: ChatJob, events: queue.Queue) -> TextStream:
        """The answer's text as it grows, its deltas sent to the request's thread."""
        return TextStream(self.tokenizer, job.stop, lambda d: events.put(("delta", d)))

    @staticmethod
    def _answered(owner: tuple) -> None:
        (_, events, _), stream = owner
        events.put(("done", (stream.finish(), stream.ids, stream.stopped)))

    def _drain(self) -> list:
        out = []
        while True:
            try:
                out.append(self._jobs.get_nowait())
            except queue.Empty:
                return out

    def _generate(self, batch: list) -> list[TextStream | None]:
        """Answer (job, events, cancelled) entries in one generation; each row stops on its own.
        A failure goes to the requests as an error (None in their place); one request's failure
        does not fail its batch-mates that have had no text yet: they are answered again alone."""
        streams = [self._stream(job, events) for job, events, _ in batch]
        try:
            self._generate_together(batch, streams)
            return streams
        except Exception as e:  # noqa: BLE001 (handed to the request's thread, which answers with an error)
            if len(batch) == 1:
                batch[0][1].put(("error", e))
                return [None]
            out = []
            for entry, stream in zip(batch, streams):
                if stream.ids:  # it has had tokens already: a second answer would repeat its text
                    entry[1].put(("error", e))
                    out.append(None)
                else:
                    out += self._generate([entry])
            return out

    def _generate_together(self, batch: list, streams: list[TextStream]) -> None:
        from dataclasses import replace

        import paddle

        from paddle_mm.inference.generate import generate_answers

        jobs = [job for job, _, _ in batch]

        def on_token(row_id: str, token: int) -> bool:
            """True ends the row: its client left, its stop string came, or its own max_tokens is reached."""
            k = int(row_id)
            return _ends_row(streams[k], batch[k][2], token) or len(streams[k].ids) >= jobs[k].infer.max_new_tokens

        if len(jobs) == 1 and jobs[0].seed is not None:
            paddle.seed(jobs[0].seed)
        # Rows are numbered: requests may share a sample id.
        infer = replace(jobs[0].infer, max_new_tokens=max(j.infer.max_new_tokens for j in jobs), batch_size=len(jobs))
        generate_answers(self.model, self.tokenizer, [replace(j.sample, id=str(k)) for k, j in enumerate(jobs)],
                         self.image_processor, infer, system=self.system_prompt(jobs[0]), on_token=on_token)

    def _batchable(self, first: ChatJob, other: ChatJob) -> bool:
        """Whether two jobs can share one generation: the same sampling and system prompt, neither seeded."""
        a, b = first.infer, other.infer
        return first.seed is None and other.seed is None and self.system_prompt(first) == self.system_prompt(other) \
            and (a.do_sample, a.temperature, a.top_p, a.num_beams) == (b.do_sample, b.temperature, b.top_p, b.num_beams)


def _ends_row(stream: TextStream, cancelled: threading.Event, token: int) -> bool:
    """Add a new token to a row's stream; True when the row ends there (its client left, or its
    stop string came)."""
    if cancelled.is_set():
        return True
    try:
        stream.add(token)
    except StopGeneration:
        return True
    return False


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000,
                 limits: ServerLimits | None = None, local_image_root: str = "", access_log: bool = False,
                 allowed_hosts: tuple[str, ...] = (), api_key: str = ""):
        self.engine = engine
        self.api_key = api_key  # "" : no key asked for
        self.limits = limits or ServerLimits()
        self.local_image_root = local_image_root
        self.access_log = access_log
        self.pending = threading.BoundedSemaphore(self.limits.max_pending)
        self.connections = threading.BoundedSemaphore(self.limits.max_connections)
        self.arrival = ArrivalTimer(self.limits.max_arrival_s)
        super().__init__((host, port), ChatHandler)
        # Bound to the loopback, only local names may reach it (DNS rebinding); bound elsewhere the
        # operator chose to expose it, and its names are not ours to guess (None: no check).
        loopback = is_loopback(self.server_address[0])
        self.allowed_hosts = LOOPBACK_NAMES + tuple(h.lower() for h in allowed_hosts) if loopback else None

    def process_request(self, request, client_address):
        """One thread per connection, up to max_connections; past them a 503 and the door closes."""
        if not self.connections.acquire(blocking=False):
            self._turn_away(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start, so it will not release its place
            self.connections.release()
            raise

    def process_request_thread(self, request, client_address):
        self.engine.connected(+1)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.engine.connected(-1)
            self.connections.release()

    def _turn_away(self, request) -> None:
        err = ApiError(503, f"the server has {self.limits.max_connections} connections open; retry later",
                       "server_busy")
        body = json.dumps(err.body()).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)  # on the accepting thread: never wait on this client
            request.sendall(head + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def server_close(self):
        self.arrival.close()
        super().server_close()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class ChatHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
    server_version = "paddle_mm"
    disable_nagle_algorithm = True  # each streamed event goes out at once
    timeout = 120  # a client silent this long (idle keep-alive included) is dropped
    server: ChatServer

    def handle_one_request(self):
        """http.server's, with the arrival clock running from the request's first byte (the wait
        for it is a keep-alive connection's idle time, bounded by `timeout`) until its body is read."""
        try:
            if not self.rfile.peek(1):
                self.close_connection = True  # the client closed between requests
                return
        except OSError:  # idle past `timeout`, or reset
            self.close_connection = True
            return
        self.server.arrival.start(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.arrival.stop(self.connection)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a bad request line, too many or too long headers, an unknown
        method) as JSON too; a request cut off by the arrival clock as 408."""
        self.request_version = self.protocol_version  # a line that failed to parse still gets a status line
        if self.server.arrival.stop(self.connection):
            self._error(self._arrived_late())
            return
        self.close_connection = True
        short = self.responses.get(code, ("error",))[0]
        self._error(ApiError(code, message or short, re.sub(r"[^a-z]+", "_", short.lower())))

    def _arrived_late(self) -> ApiError:
        self.close_connection = True
        return ApiError(408, f"the request took longer than {self.server.limits.max_arrival_s:g} s to arrive",
                        "request_timeout")

    def do_GET(self):  # noqa: N802 (the name http.server dispatches to)
        late = self.server.arrival.stop(self.connection)  # a GET has no body: it has arrived
        path = self.path.split("?", 1)[0]
        engine = self.server.engine
        try:
            if late:  # its headers were cut off
                raise self._arrived_late()
            self._check_origin()
        except ApiError as e:
            self._error(e)
            return
        if path.startswith("/v1/"):
            try:
                self._check_api_key()
            except ApiError as e:
                self._error(e)
                return
        if path in ("/", "/chat"):
            with open(PAGE, "rb") as f:
                self._send(200, f.read(), "text/html; charset=utf-8")
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [self._model_card()]})
        elif path == f"/v1/models/{engine.model_name}":
            self._send_json(200, self._model_card())
        elif path.startswith("/v1/models/"):
            self._error(ApiError(404, f"The model '{path[len('/v1/models/'):]}' does not exist", "model_not_found"))
        elif path == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._error(ApiError(404, f"no such path: GET {path}", "not_found"))

    def do_POST(self):  # noqa: N802
        path = self.path.split("?", 1)[0]
        server = self.server
        keep_alive = not self.close_connection
        self.close_connection = True  # until the body is read, any answer ends the connection
        try:
            if server.arrival.late(self.connection):  # its headers were cut off
                raise self._arrived_late()
            length = content_length(self.headers)  # framing we cannot trust: no body is read at all
            try:
                if path != "/v1/chat/completions":
                    raise ApiError(404, f"no such path: POST {path}", "not_found")
                self._check_api_key()
                self._check_origin()
                check_content_type(self.headers)
                if length > server.limits.max_request_bytes:
                    raise ApiError(413, f"the request body has {length} bytes; the limit is "
                                   f"{server.limits.max_request_bytes}", "request_too_large")
                if not server.pending.acquire(blocking=False):
                    raise ApiError(503, f"the server is busy ({server.limits.max_pending} requests waiting); "
                                   "retry later", "server_busy")
            except ApiError:
                self._discard(length)
                raise
            try:
                body = parse_json_body(self._read_body(length))
                self.close_connection = not keep_alive
                job = parse_chat_request(body, server.engine.model_name, server.engine.recipe.infer, server.limits,
                                         server.local_image_root,
                                         # a native-resolution processor keeps the decoded images as they are
                                         getattr(server.engine.image_processor, "preprocess", None))
                (self._stream if job.stream else self._complete)(job)
            finally:
                server.pending.release()
        except ApiError as e:
            self._error(e)
        except ConnectionError:  # the client left (a broken pipe, a reset, or gone while waiting)
            self.close_connection = True
        except Exception:  # a bug, not the client's fault: say so, keep serving
            traceback.print_exc(file=sys.stderr)
            self._error(ApiError(500, "internal server error (see the server log)", "internal_error"))

    def _model_card(self) -> dict:
        return {"id": self.server.engine.model_name, "object": "model", "created": 0, "owned_by": "paddle_mm"}

    def _check_api_key(self) -> None:
        """With an api_key, /v1/ requests must carry `Authorization: Bearer <key>` (as OpenAI's and
        vLLM's servers ask); compared in constant time."""
        key = self.server.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "a valid API key is needed: send the header 'Authorization: Bearer <key>'"
                           if not given else "the API key is not valid", "invalid_api_key")

    def _check_origin(self) -> None:
        if self.server.allowed_hosts is not None:
            check_origin(self.headers, self.server.allowed_hosts)

    def _discard(self, length: int) -> None:
        """Read and drop the body of a refused request (up to a bound, and within the arrival
        clock), or closing the socket with it unread may reset the connection before the client
        has read the refusal."""
        left = length if length <= 8 * self.server.limits.max_request_bytes else 0
        try:
            while left > 0:
                got = len(self.rfile.read(min(2**20, left)))
                left = left - got if got else 0
        except OSError:
            pass

    def _read_body(self, length: int) -> bytes:
        try:
            raw, stalled = self.rfile.read(length), False
        except TimeoutError:  # one read waited `timeout`: the arrival clock's job, done by the socket
            raw, stalled = b"", True
        late = self.server.arrival.stop(self.connection)
        if len(raw) < length:
            self.close_connection = True
            if late or stalled:
                raise self._arrived_late()
            raise ApiError(400, f"the body ended after {len(raw)} of its {length} bytes", "incomplete_body")
        return raw

    def _complete(self, job: ChatJob) -> None:
        text, finish, usage = self.server.engine.answer(job, gone=lambda: client_gone(self.connection))
        self._send_json(200, completion_body(job, self.server.engine.model_name, text, finish, usage))

    def _stream(self, job: ChatJob) -> None:
        model = self.server.engine.model_name
        self.server.engine.check_length(job)  # refuse with a status code while one can still be sent
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self.end_headers()
        self.close_connection = True

        def event(obj) -> None:
            self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
            self.wfile.flush()

        event(chunk_body(job, model, {"role": "assistant", "content": ""}))
        try:
            _, finish, usage = self.server.engine.answer(job, lambda d: event(chunk_body(job, model, {"content": d})),
                                                         gone=lambda: client_gone(self.connection))
        except ApiError as e:
            event(e.body())
            return
        except ConnectionError:
            raise
        except Exception:
            traceback.print_exc(file=sys.stderr)
            event(ApiError(500, "internal server error (see the server log)", "internal_error").body())
            return
        event(chunk_body(job, model, {}, finish))
        if job.include_usage:
            event(chunk_body(job, model, {}, usage=usage))
        event(b"[DONE]")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, err: ApiError) -> None:
        try:
            self._send_json(err.status, err.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        if self.server.access_log:
            super().log_message(format, *args)


def make_server(run_dir: str, host: str = "127.0.0.1", port: int = 8000, model_name: str = "",
                limits: ServerLimits | None = None, local_image_root: str = "", access_log: bool = False,
                num_threads: int = 0, allowed_hosts: tuple[str, ...] = (), api_key: str = "") -> ChatServer:
    """Load the run and bind; port 0 picks a free port (see .url). Call serve_forever() to run.
    allowed_hosts: Host names accepted besides the loopback's, when bound to it (a proxy's).
    api_key: when set, /v1/ requests without `Authorization: Bearer <api_key>` get a 401."""
    limits = limits or ServerLimits()
    return ChatServer(Engine(run_dir, model_name, num_threads, limits.max_batch, limits.join), host, port, limits,
                      local_image_root, access_log, allowed_hosts, api_key)


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8000, model_name: str = "",
          local_image_root: str = "", limits: ServerLimits | None = None, num_threads: int = 0,
          allowed_hosts: tuple[str, ...] = (), api_key: str = "") -> None:
    server = make_server(run_dir, host, port, model_name, limits, local_image_root, access_log=True,
                         num_threads=num_threads, allowed_hosts=allowed_hosts, api_key=api_key)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"paddle-mm: warning: listening on {host}: anyone who can reach it may use the model "
              "(no --api-key was given)", file=sys.stderr)
    print(f"paddle-mm: serving '{server.engine.model_name}' at {server.url}/v1 (chat page: {server.url}/)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
