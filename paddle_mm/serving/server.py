"""`paddle-mm serve`: an OpenAI-compatible HTTP server for one trained run, standard library only.

    GET  /                      the chat page (pick an image, ask, watch the answer stream in)
    GET  /v1/models             the one model this server holds
    POST /v1/chat/completions   text and image content parts; "stream": true for server-sent events

Requests are read and checked on one thread each, but one model thread answers them, one at a
time: decoding holds a KV cache and Paddle's global RNG, and Paddle keeps per-thread kernel
caches, so a new thread per request ran several times slower than one warm thread. Streamed
text goes back through a queue, so a slow reader does not hold up the model. Requests waiting
beyond ServerLimits.max_pending are refused with 503 instead of piling up. Every refusal is an OpenAI-style JSON error with a 4xx
status, and the server goes on serving.
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from paddle_mm.serving.openai_api import (
    ApiError,
    ChatJob,
    ServerLimits,
    StopGeneration,
    TextStream,
    chunk_body,
    completion_body,
    parse_chat_request,
)

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")


class Engine:
    """The model of one run folder and the one thread that runs it, answering one ChatJob at a time."""

    def __init__(self, run_dir: str, model_name: str = "", num_threads: int = 0):
        from paddle_mm.builder import image_processor_for
        from paddle_mm.run_folder import load_run
        from paddle_mm.runtime import configure_cpu

        configure_cpu(num_threads)
        self.recipe, cfg, self.tokenizer, self.model = load_run(run_dir)
        self.image_processor = image_processor_for(self.recipe)
        self.max_positions = cfg.lm.max_position_embeddings
        self.model_name = model_name or os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
        self.lock = threading.Lock()  # held while a job runs
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, name="paddle_mm-model", daemon=True).start()

    def system_prompt(self, job: ChatJob) -> str:
        return job.system or self.recipe.data.system_prompt  # the one the model was trained with

    def check_length(self, job: ChatJob) -> int:
        """The prompt's token count; ApiError if prompt + max_tokens exceed the LM's positions."""
        ids, _ = self.tokenizer.encode_chat(job.sample.turns, self.model.tokens_per_image,
                                            system=self.system_prompt(job), add_generation_prompt=True)
        if len(ids) + job.infer.max_new_tokens > self.max_positions:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; with max_tokens {job.infer.max_new_tokens} "
                           f"that exceeds the model's {self.max_positions} positions", "context_length_exceeded",
                           "messages")
        return len(ids)

    def answer(self, job: ChatJob, on_delta=None) -> tuple[str, str, dict]:
        """(text, finish_reason, usage), computed on the model thread; on_delta(text), called on this
        thread, sees the answer as it grows. If on_delta raises (the client left), decoding stops."""
        prompt_tokens = self.check_length(job)
        events: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        self._jobs.put((job, events, cancelled))
        while True:
            kind, value = events.get()
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
        while True:
            job, events, cancelled = self._jobs.get()
            if cancelled.is_set():
                continue
            try:
                with self.lock:
                    stream = self._generate(job, lambda d: events.put(("delta", d)), cancelled)
                events.put(("done", (stream.finish(), stream.ids, stream.stopped)))
            except Exception as e:  # handed to the request's thread, which answers with an error
                events.put(("error", e))

    def _generate(self, job: ChatJob, on_delta, cancelled: threading.Event) -> TextStream:
        import paddle

        from paddle_mm.inference.generate import generate_answers

        stream = TextStream(self.tokenizer, job.stop, on_delta)

        def on_token(_id, token: int) -> None:
            if cancelled.is_set():
                raise StopGeneration
            stream.add(token)

        if job.seed is not None:
            paddle.seed(job.seed)
        try:
            generate_answers(self.model, self.tokenizer, [job.sample], self.image_processor, job.infer,
                             system=self.system_prompt(job), on_token=on_token)
        except StopGeneration:
            pass
        return stream


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000,
                 limits: ServerLimits | None = None, local_image_root: str = "", access_log: bool = False):
        self.engine = engine
        self.limits = limits or ServerLimits()
        self.local_image_root = local_image_root
        self.access_log = access_log
        self.pending = threading.BoundedSemaphore(self.limits.max_pending)
        super().__init__((host, port), ChatHandler)

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

    def do_GET(self):  # noqa: N802 (the name http.server dispatches to)
        path = self.path.split("?", 1)[0]
        engine = self.server.engine
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
        try:
            body = self._read_json()
            if path != "/v1/chat/completions":
                raise ApiError(404, f"no such path: POST {path}", "not_found")
            server = self.server
            job = parse_chat_request(body, server.engine.model_name, server.engine.recipe.infer, server.limits,
                                     server.local_image_root)
            if not server.pending.acquire(blocking=False):
                raise ApiError(503, f"the server is busy ({server.limits.max_pending} requests waiting); retry later",
                               "server_busy")
            try:
                (self._stream if job.stream else self._complete)(job)
            finally:
                server.pending.release()
        except ApiError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client left; nothing to answer
        except Exception:  # a bug, not the client's fault: say so, keep serving
            traceback.print_exc(file=sys.stderr)
            self._error(ApiError(500, "internal server error (see the server log)", "internal_error"))

    def _model_card(self) -> dict:
        return {"id": self.server.engine.model_name, "object": "model", "created": 0, "owned_by": "paddle_mm"}

    def _read_json(self):
        limit = self.server.limits.max_request_bytes
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise ApiError(411, "chunked request bodies are not accepted; send Content-Length", "length_required")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise ApiError(411, "the request needs a Content-Length header", "length_required") from None
        if length > limit:
            self.close_connection = True
            # Read what was sent (up to a bound), or closing the socket may reset the connection
            # before the client has read this 413.
            left = length if length <= 8 * limit else 0
            while left > 0:
                got = len(self.rfile.read(min(2**20, left)))
                left = left - got if got else 0
            raise ApiError(413, f"the request body has {length} bytes; the limit is {limit}", "request_too_large")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None

    def _complete(self, job: ChatJob) -> None:
        text, finish, usage = self.server.engine.answer(job)
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
            _, finish, usage = self.server.engine.answer(job, lambda d: event(chunk_body(job, model, {"content": d})))
        except ApiError as e:
            event(e.body())
            return
        except (BrokenPipeError, ConnectionResetError):
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
                num_threads: int = 0) -> ChatServer:
    """Load the run and bind; port 0 picks a free port (see .url). Call serve_forever() to run."""
    return ChatServer(Engine(run_dir, model_name, num_threads), host, port, limits, local_image_root, access_log)


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8000, model_name: str = "",
          local_image_root: str = "", limits: ServerLimits | None = None, num_threads: int = 0) -> None:
    server = make_server(run_dir, host, port, model_name, limits, local_image_root, access_log=True,
                         num_threads=num_threads)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"paddle-mm: warning: listening on {host}: anyone who can reach it may use the model "
              "(there is no authentication)", file=sys.stderr)
    print(f"paddle-mm: serving '{server.engine.model_name}' at {server.url}/v1 (chat page: {server.url}/)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
