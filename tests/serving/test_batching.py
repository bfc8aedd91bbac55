"""Concurrent requests share one batched generation, and each answers as it would alone."""
from __future__ import annotations

import threading
import time

import openai

from .test_server import _image_part, side_server


def _ask(client, served, data_url, image: int, question: str, **kw):
    content = [_image_part(data_url(served["images"][image]))] + ([{"type": "text", "text": question}] if question else [])
    return client.chat.completions.create(model=served["model"], messages=[{"role": "user", "content": content}],
                                          **{"temperature": 0, **kw})


def _while_busy(engine, asks) -> None:
    """Run the asks on threads of their own while the model thread waits for the engine's lock,
    until all but one are queued (that one is held by the model thread), then let them go as one
    batch and wait for every answer."""
    with engine.lock:
        threads = [threading.Thread(target=ask) for ask in asks]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while engine._jobs.qsize() < len(asks) - 1 and time.time() < deadline:  # noqa: SLF001
            time.sleep(0.01)
    for t in threads:
        t.join(60)


REQUESTS = [(0, "what colour is the circle?", {"max_tokens": 8}),
            (1, "", {"max_tokens": 3}),  # its own, shorter budget
            (2, "how many shapes are there?", {"max_tokens": 8}),
            (3, "", {"max_tokens": 8})]


def test_concurrent_requests_are_one_generation_each_answered_as_alone(served, data_url):
    engine = served["server"].engine
    with side_server(engine) as (server, client):
        alone = [_ask(client, served, data_url, i, q, **kw) for i, q, kw in REQUESTS]
        before = engine.batch_sizes.copy()
        together: dict[int, object] = {}
        _while_busy(engine, [lambda k=k, r=r: together.__setitem__(k, _ask(client, served, data_url, r[0], r[1], **r[2]))
                             for k, r in enumerate(REQUESTS)])  # the model is busy: all four wait, then go as one batch
    assert engine.batch_sizes - before == {4: 1}
    for k, (i, q, kw) in enumerate(REQUESTS):
        a, b = alone[k].choices[0], together[k].choices[0]
        assert b.message.content == a.message.content, REQUESTS[k]
        assert b.finish_reason == a.finish_reason
        assert together[k].usage.completion_tokens == alone[k].usage.completion_tokens <= kw["max_tokens"]
    assert together[1].usage.completion_tokens == 3 and together[1].choices[0].finish_reason == "length"


def test_a_request_arriving_mid_generation_joins_it(served, data_url, monkeypatch):
    """Continuous batching: a request that comes while a generation runs joins it at the next step
    (engine.joins), rather than waiting for it to end, and is answered as it would be alone."""
    from paddle_mm.lm.decoding import RunningBatch

    engine = served["server"].engine
    first, second = (3, "", {"max_tokens": 12}), (0, "what colour is the circle?", {"max_tokens": 8})
    with side_server(engine) as (_, client):
        alone = [_ask(client, served, data_url, i, q, **kw) for i, q, kw in (first, second)]
        step, running = RunningBatch.step, threading.Event()

        def step_once_the_second_waits(self):
            if not running.is_set():
                running.set()
                deadline = time.time() + 30
                while engine._jobs.qsize() < 1 and time.time() < deadline:  # noqa: SLF001
                    time.sleep(0.01)
            return step(self)

        monkeypatch.setattr(RunningBatch, "step", step_once_the_second_waits)
        # A lone newcomer waits up to gather_s for company (test below); none here, so it joins at once.
        monkeypatch.setattr(engine, "gather_s", 0.0)
        before, out = engine.joins.copy(), {}
        thread = threading.Thread(target=lambda: out.__setitem__(0, _ask(client, served, data_url, first[0], first[1],
                                                                          **first[2])))
        thread.start()
        assert running.wait(30)
        out[1] = _ask(client, served, data_url, second[0], second[1], **second[2])
        thread.join(60)
    assert engine.joins - before == {1: 1}
    for k in (0, 1):
        assert out[k].choices[0].message.content == alone[k].choices[0].message.content
        assert out[k].usage.completion_tokens == alone[k].usage.completion_tokens


def test_newcomers_wait_for_company_and_join_together(served, data_url, monkeypatch):
    """With a join group of two, a newcomer does not join the running generation alone: it waits
    (up to gather_s) until a second one comes, and both join at one step, each answered as alone."""
    from paddle_mm.lm.decoding import RunningBatch

    engine = served["server"].engine
    asks = [(3, "", {"max_tokens": 12}), (0, "what colour is the circle?", {"max_tokens": 6}),
            (1, "how many shapes are there?", {"max_tokens": 6})]
    with side_server(engine) as (_, client):
        alone = [_ask(client, served, data_url, i, q, **kw) for i, q, kw in asks]
        step, calls = RunningBatch.step, []

        def waiting(n: int) -> None:
            deadline = time.time() + 30
            while engine._jobs.qsize() + len(engine._held) < n and time.time() < deadline:  # noqa: SLF001
                time.sleep(0.01)

        def step_as_they_come(self):
            calls.append(len(calls) + 1)
            if len(calls) == 1:
                engine.gather_s = 30.0  # from here on only the group decides (the first batch did not wait)
            waiting({1: 1, 2: 2}.get(len(calls), 0))  # the second request is queued by step 1, the third by step 2
            return step(self)

        monkeypatch.setattr(RunningBatch, "step", step_as_they_come)
        monkeypatch.setattr(engine, "gather_s", engine.gather_s)  # restored after
        monkeypatch.setattr(engine, "_join_group", lambda: 2)
        before, out = engine.joins.copy(), {}

        def ask(k: int) -> threading.Thread:
            thread = threading.Thread(target=lambda: out.__setitem__(k, _ask(client, served, data_url, asks[k][0],
                                                                              asks[k][1], **asks[k][2])))
            thread.start()
            return thread

        threads = [ask(0)]
        deadline = time.time() + 30
        while not calls and time.time() < deadline:
            time.sleep(0.01)
        threads.append(ask(1))
        while len(calls) < 2 and time.time() < deadline:
            time.sleep(0.01)
        threads.append(ask(2))
        for thread in threads:
            thread.join(60)
    assert engine.joins - before == {2: 1}
    for k in range(3):
        assert out[k].choices[0].message.content == alone[k].choices[0].message.content
        assert out[k].usage.completion_tokens == alone[k].usage.completion_tokens


def test_a_request_failing_to_join_fails_alone(served, data_url, monkeypatch):
    """A prefill that fails for one of the jobs joining together: the others are answered, that one
    gets the error."""
    import paddle_mm.inference.generate as generate

    engine = served["server"].engine
    real = generate.prompt_embeddings

    def failing_on_boom(model, tokenizer, samples, *args, **kwargs):
        if any("boom" in text for s in samples for _, text in s.turns):
            raise RuntimeError("boom")
        return real(model, tokenizer, samples, *args, **kwargs)

    monkeypatch.setattr(generate, "prompt_embeddings", failing_on_boom)
    with side_server(engine) as (_, client):
        alone = _ask(client, served, data_url, 0, "what colour is the circle?", max_tokens=8)
        out: dict[str, object] = {}
        before = engine.batch_sizes.copy()

        def ask(question):
            try:
                out[question] = _ask(client, served, data_url, 0, question, max_tokens=8)
            except openai.APIStatusError as e:
                out[question] = e

        _while_busy(engine, [lambda q=q: ask(q) for q in ("boom?", "what colour is the circle?")])
    assert engine.batch_sizes - before == {2: 1}  # the two went as one batch, whose prefill failed
    assert isinstance(out["boom?"], openai.APIStatusError) and out["boom?"].status_code >= 500
    assert out["what colour is the circle?"].choices[0].message.content == alone.choices[0].message.content


def test_a_seeded_request_is_answered_alone(served, data_url):
    engine = served["server"].engine
    with side_server(engine) as (_, client):
        before = engine.batch_sizes.copy()
        results = []
        _while_busy(engine, [lambda s=s: results.append(_ask(client, served, data_url, 0, "describe it", max_tokens=4,
                                                             seed=s, temperature=1.0)) for s in (None, 3)])
    assert len(results) == 2
    assert engine.batch_sizes - before == {1: 2}


def test_an_api_key_is_asked_of_v1_requests_only(served):
    import http.client
    import json

    from paddle_mm.serving.server import ChatServer

    server = ChatServer(served["server"].engine, port=0, api_key="s3cret")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        def get(path, headers=None):
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            body = r.read()
            conn.close()
            return r.status, body

        status, body = get("/v1/models")
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert get("/v1/models", {"Authorization": "Bearer wrong"})[0] == 401
        assert get("/v1/models", {"Authorization": "Bearer s3cret"})[0] == 200
        assert get("/")[0] == 200  # the chat page itself asks for the key in the browser
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=30)
        try:
            bad.chat.completions.create(model=served["model"], messages=[{"role": "user", "content": "hi"}])
            raise AssertionError("a request with a wrong key was answered")
        except openai.AuthenticationError as e:
            assert e.status_code == 401
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0, timeout=30)
        r = good.chat.completions.create(model=served["model"], max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content is not None
    finally:
        server.shutdown()
        server.server_close()


def test_a_batch_waits_for_connected_clients_requests(served, data_url):
    """The clients of a batch just answered ask again a moment later: the next batch waits for
    them (up to gather_s) while more clients are connected than requests are queued, and a lone
    client's request does not wait."""
    import http.client
    import json

    from paddle_mm.serving.server import Engine

    engine = Engine(served["run_dir"], num_threads=1)  # its own, so no other test's open connections count
    body = json.dumps({"model": served["model"], "max_tokens": 2, "temperature": 0, "messages": [{"role": "user",
                       "content": [_image_part(data_url(served["images"][0])), {"type": "text", "text": "?"}]}]})
    with side_server(engine) as (server, _):
        def ask(conn, out):
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            out.append((r.status, json.loads(r.read()), time.monotonic()))

        engine.gather_s = 10.0  # far longer than the test's gap, so the wait is what decides the batch
        conns = [http.client.HTTPConnection(*server.server_address[:2], timeout=60) for _ in range(2)]
        for c in conns:
            c.connect()
        deadline = time.time() + 30
        while engine._connected < 2 and time.time() < deadline:  # noqa: SLF001
            time.sleep(0.01)
        before = engine.batch_sizes.copy()
        first, second = [], []
        t0 = time.monotonic()
        t = threading.Thread(target=ask, args=(conns[0], first))
        t.start()
        time.sleep(0.5)  # the first request is queued alone; the second client asks later
        ask(conns[1], second)
        t.join(60)
        assert engine.batch_sizes - before == {2: 1}
        assert first[0][0] == second[0][0] == 200 and first[0][2] - t0 >= 0.5
        conns[1].close()
        while engine._connected > 1 and time.time() < deadline:  # noqa: SLF001
            time.sleep(0.01)
        alone, t1 = [], time.monotonic()
        ask(conns[0], alone)  # connected clients: 1, queued: 1, so no wait
        assert alone[0][0] == 200 and alone[0][2] - t1 < 5.0
        conns[0].close()


def test_no_join_answers_batch_by_batch(served, data_url, monkeypatch):
    """paddle-mm serve --no-join: ServerLimits(join=False) reaches the engine, whose requests then
    go through whole-batch generation (no RunningBatch) and are answered as with joining."""
    from paddle_mm.cli import build_parser
    from paddle_mm.lm.decoding import RunningBatch
    from paddle_mm.serving.server import ServerLimits, make_server

    assert build_parser().parse_args(["serve", served["run_dir"], "--no-join"]).no_join
    server = make_server(served["run_dir"], port=0, limits=ServerLimits(join=False), num_threads=1)
    try:
        assert server.engine.join is False
        with side_server(served["server"].engine) as (_, client):
            joined = _ask(client, served, data_url, 3, "", max_tokens=12)
        calls, step = [], RunningBatch.step
        monkeypatch.setattr(RunningBatch, "step", lambda self: calls.append(1) or step(self))
        with side_server(server.engine) as (_, client):
            whole = _ask(client, served, data_url, 3, "", max_tokens=12)
        assert not calls and whole.choices[0].message.content == joined.choices[0].message.content
    finally:
        server.server_close()
