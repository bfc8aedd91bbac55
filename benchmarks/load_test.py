"""A bounded load test of `paddle-mm serve` on loopback: N clients share a fixed number of requests.

    python benchmarks/load_test.py RUN_DIR [--clients 1 4 8] [--max-batch 1 8] [--join both] [--requests 40] [--bad-every 5]

For each client count it starts the server on 127.0.0.1 with a port of its own, sends the
requests (about the run's test images, VQA questions and caption requests in turn; every
k-th one deliberately bad: an image_url without data), after a warm-up, and prints latency p50/p95, throughput, and how many requests were
answered (200), refused (a JSON error with a 4xx/5xx status) or failed (no usable answer:
connection error, timeout, garbage). The server answers the requests waiting together in one
batched generation, so throughput grows with the clients while a batch step costs little more
than one row's; with joining (the default), requests also join a generation already running and
rows leave it as they end, instead of each batch lasting as long as its longest answer
(`--join both` prints the batch limits with joining off and on).

The clients run in a process of their own (`--clients-in process`, the default), as real clients
do: client threads inside the server's process take the interpreter lock from the model thread,
whose decode steps are mostly Python dispatch. `--clients-in server` keeps them in the server's
process, as this benchmark did before.
"""
from __future__ import annotations

import argparse
import base64
import glob
import http.client
import json
import multiprocessing
import os
import threading
import time

QUESTIONS = ["what colour is the circle?", "how many shapes are there?", "what shape is at the center?",
             "is there a red square?"]


def image_body(model: str, image_png: bytes, question: str, max_tokens: int) -> dict:
    """A greedy request about one image: a VQA question, or a caption request when question is empty."""
    url = "data:image/png;base64," + base64.b64encode(image_png).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}] + ([{"type": "text", "text": question}] if question else [])
    return {"model": model, "temperature": 0, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}


def bad_body(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}}, {"type": "text", "text": "?"}]}]}


def run_load(url: str, bodies: list[dict], clients: int, timeout: float = 120.0) -> dict:
    """Send every body once from `clients` threads (each on its own keep-alive connection)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    lock = threading.Lock()
    next_index = [0]
    results: list[tuple[str, float, int]] = []  # (outcome, seconds, completion tokens)

    def client() -> None:
        conn = None
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(bodies):
                break
            t0 = time.perf_counter()
            try:
                conn = conn or http.client.HTTPConnection(host, int(port), timeout=timeout)
                conn.request("POST", "/v1/chat/completions", body=json.dumps(bodies[i]),
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = json.loads(response.read())
                if response.status == 200:
                    outcome, tokens = "answered", payload["usage"]["completion_tokens"]
                    assert isinstance(payload["choices"][0]["message"]["content"], str)
                else:
                    outcome, tokens = "refused", 0
                    assert payload["error"]["message"]
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception:  # noqa: BLE001 (any failure is what this test counts)
                outcome, tokens = "failed", 0
                if conn is not None:
                    conn.close()
                conn = None
            with lock:
                results.append((outcome, time.perf_counter() - t0, tokens))
        if conn is not None:
            conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies = sorted(s for outcome, s, _ in results if outcome == "answered")
    count = {k: sum(1 for o, _, _ in results if o == k) for k in ("answered", "refused", "failed")}
    return {"clients": clients, "requests": len(bodies), **count, "lost": len(bodies) - len(results),
            "wall_s": wall, "p50_s": _percentile(latencies, 50), "p95_s": _percentile(latencies, 95),
            "requests_per_s": count["answered"] / wall,
            "tokens_per_s": sum(t for _, _, t in results) / wall}


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def make_bodies(model: str, images: list[str], requests: int, max_tokens: int, bad_every: int) -> list[dict]:
    pngs = [open(p, "rb").read() for p in images]
    return [bad_body(model) if bad_every and (i + 1) % bad_every == 0
            else image_body(model, pngs[i % len(pngs)], "" if i % 2 else QUESTIONS[i // 2 % len(QUESTIONS)], max_tokens)
            for i in range(requests)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--images", default="", help="glob of PNGs to ask about (default: the demo's test images)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--bad-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="the model's CPU threads (0: every core)")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 8],
                        help="the server's batch limits to compare (1: one request at a time, the reference)")
    parser.add_argument("--join", choices=["on", "off", "both"], default="both",
                        help="whether requests join a running generation (max-batch > 1)")
    parser.add_argument("--clients-in", choices=["process", "server"], default="process",
                        help="the clients' threads in a process of their own, or in the server's")
    args = parser.parse_args()

    from paddle_mm.serving.server import ChatServer, Engine

    pattern = args.images or os.path.join(os.path.dirname(os.path.abspath(args.run_dir)), "data", "images",
                                          "test", "*.png")
    images = sorted(glob.glob(pattern))[:20]
    if not images:
        raise SystemExit(f"no images match {pattern}; give --images")
    engine = Engine(args.run_dir, num_threads=args.threads)
    bodies = make_bodies(engine.model_name, images, args.requests, args.max_tokens, args.bad_every)
    print(f"{args.requests} requests ({args.max_tokens} new tokens max, every {args.bad_every}th bad) "
          f"against {args.run_dir}, {args.threads or 'all'} model thread(s), {os.cpu_count()} cores, "
          f"clients in {'their own process' if args.clients_in == 'process' else 'the server process'}")
    # spawn, not fork: a forked copy of a process running Paddle's threads may hang.
    clients_process = multiprocessing.get_context("spawn").Pool(1) if args.clients_in == "process" else None

    def load(url: str, clients: int) -> dict:
        if clients_process is None:
            return run_load(url, bodies, clients)
        return clients_process.apply(run_load, (url, bodies, clients))

    # Paddle's first calls at each sequence length are slow (kernel and allocator set-up): warm up.
    server = ChatServer(engine, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    load(server.url, 2)
    server.shutdown()
    server.server_close()
    print(f"{'batch':>6} {'clients':>7} {'answered':>8} {'refused':>7} {'failed':>6} {'lost':>4} {'p50 s':>7} "
          f"{'p95 s':>7} {'req/s':>6} {'tok/s':>6} {'wall s':>7} {'x 1 client':>10}")
    joins = {"on": [True], "off": [False], "both": [False, True]}[args.join]
    for max_batch, join in [(b, j) for b in args.max_batch for j in (joins if b > 1 else [False])]:
        engine.max_batch, engine.join = max_batch, join
        label = f"{max_batch}{'+j' if join else ''}"
        single = None
        for clients in args.clients:
            server = ChatServer(engine, "127.0.0.1", 0)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            engine.batch_sizes.clear()
            engine.joins.clear()
            try:
                r = load(server.url, clients)
            finally:
                server.shutdown()
                server.server_close()
            single = single or r["requests_per_s"]
            print(f"{label:>6} {r['clients']:>7} {r['answered']:>8} {r['refused']:>7} {r['failed']:>6} "
                  f"{r['lost']:>4} {r['p50_s']:>7.3f} {r['p95_s']:>7.3f} {r['requests_per_s']:>6.2f} "
                  f"{r['tokens_per_s']:>6.1f} {r['wall_s']:>7.1f} {r['requests_per_s'] / single:>9.2f}x")
            if max_batch > 1:  # how the requests met: generations started and joins, by request count
                print(f"{'':>15} batches by size {dict(sorted(engine.batch_sizes.items()))}, "
                      f"joins by size {dict(sorted(engine.joins.items()))}")
    if clients_process is not None:
        clients_process.close()
        clients_process.join()


if __name__ == "__main__":
    main()
