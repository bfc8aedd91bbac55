"""The server through the official openai client: VQA, captions, streamed chat, bad requests."""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import threading
import time

import numpy as np
import openai
import pytest
from PIL import Image

from paddle_mm.builder import image_processor_for
from paddle_mm.inference.generate import generate_answers
from paddle_mm.inference.requests import request_to_sample
from paddle_mm.run_folder import load_run


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def library_answer(served):
    """What `paddle-mm infer` answers for a request, with the same greedy settings."""
    recipe, _, tok, model = load_run(served["run_dir"])
    proc = image_processor_for(recipe)

    def answer(request: dict, max_new_tokens: int) -> str:
        recipe.infer.max_new_tokens = max_new_tokens
        sample = request_to_sample({"id": "x", **request}, recipe.infer)
        return generate_answers(model, tok, [sample], proc, recipe.infer)["x"]

    return answer


def _image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def test_models_lists_the_run(client, served):
    assert [m.id for m in client.models.list()] == [served["model"]] == ["tiny-vlm"]
    assert client.models.retrieve("tiny-vlm").id == "tiny-vlm"


def test_vqa_request_answers_as_the_library_does(client, served, data_url, library_answer):
    image = served["images"][0]
    question = "what colour is the circle?"
    r = client.chat.completions.create(
        model=served["model"], temperature=0, max_tokens=6,
        messages=[{"role": "user", "content": [_image_part(data_url(image)), {"type": "text", "text": question}]}])
    text = r.choices[0].message.content
    assert text and text == library_answer({"task": "vqa", "image": image, "prompt": question}, 6)
    assert r.choices[0].finish_reason in ("stop", "length") and r.object == "chat.completion"
    assert 0 < r.usage.completion_tokens <= 6
    assert r.usage.prompt_tokens > 9  # the image alone is 9 positions in the tiny model


def test_caption_request_is_an_image_without_text(client, served, data_url, library_answer):
    image = served["images"][1]
    r = client.chat.completions.create(model=served["model"], max_tokens=8,
                                       messages=[{"role": "user", "content": [_image_part(data_url(image))]}])
    assert r.choices[0].message.content == library_answer({"task": "caption", "image": image}, 8)


def test_streamed_multi_turn_chat_adds_up_to_the_plain_answer(client, served, data_url):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [_image_part(data_url(served["images"][2])),
                                     {"type": "text", "text": "how many shapes are there?"}]},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "is there a red circle?"},
    ]
    plain = client.chat.completions.create(model=served["model"], messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=served["model"], messages=messages, max_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2  # streamed piece by piece, not in one block
    assert "".join(deltas) == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_sampling_with_a_seed_repeats_and_stop_strings_cut(client, served, data_url):
    kw = dict(model=served["model"], temperature=1.5, top_p=0.9, seed=7, max_tokens=10,
              messages=[{"role": "user", "content": [_image_part(data_url(served["images"][3])),
                                                     {"type": "text", "text": "describe it"}]}])
    first = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == first
    greedy = client.chat.completions.create(**{**kw, "temperature": 0}).choices[0].message.content
    stop = greedy[len(greedy) // 2:][:2]
    cut = client.chat.completions.create(**{**kw, "temperature": 0, "stop": [stop]}).choices[0]
    assert cut.message.content == greedy[:greedy.index(stop)] and cut.finish_reason == "stop"


def _noise_png(size: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")  # noise: PNG cannot shrink it
    return buf.getvalue()


def _wide_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1000, 50), "red").save(buf, "PNG")  # 50,000 pixels > 40,000, in a few hundred bytes
    return buf.getvalue()


@pytest.mark.parametrize("case, status, code", [
    ("no image data", 400, "invalid_image_url"),
    ("not an image", 400, "invalid_image"),
    ("oversized image", 413, "image_too_large"),
    ("too many pixels", 413, "image_too_large"),
    ("unknown model", 404, "model_not_found"),
    ("too many tokens asked", 400, "invalid_value"),
    ("image tag typed as text", 400, "invalid_value"),
    ("last message not the user's", 400, "invalid_value"),
])
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(client, served, data_url, case, status, code):
    model, url, max_tokens = served["model"], data_url(served["images"][0]), 4
    text = {"type": "text", "text": "what is it?"}
    if case == "no image data":
        url = "data:image/png;base64,"
    elif case == "not an image":
        url = data_url(b"just some text, not a picture\n" * 10, "text/plain")
    elif case == "oversized image":
        url = data_url(_noise_png(190))  # about 108 KB > 100 KB
    elif case == "too many pixels":
        url = data_url(_wide_png())
    elif case == "unknown model":
        model = "gpt-4o"
    elif case == "too many tokens asked":
        max_tokens = 17
    elif case == "image tag typed as text":
        text = {"type": "text", "text": "<image> what is it?"}
    messages = [{"role": "user", "content": [_image_part(url), text]}]
    if case == "last message not the user's":
        messages.append({"role": "assistant", "content": "a circle"})
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
    err = caught.value
    assert err.status_code == status
    assert err.body["code"] == code and err.body["message"] and err.body["type"] == "invalid_request_error"
    # ... and the next good request is answered.
    ok = client.chat.completions.create(model=served["model"], max_tokens=2,
                                        messages=[{"role": "user", "content": [_image_part(data_url(served["images"][0]))]}])
    assert ok.choices[0].message.content is not None


def _raw_post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def test_malformed_and_oversized_bodies_are_refused(served):
    status, body = _raw_post(served["url"], b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = _raw_post(served["url"], b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = _raw_post(served["url"], b" " * 500_000)  # over max_request_bytes (400,000)
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_unknown_paths_are_json_404s(served):
    host, port = served["url"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/v2/nothing")
    response = conn.getresponse()
    assert response.status == 404 and json.loads(response.read())["error"]["code"] == "not_found"
    conn.close()


def test_requests_beyond_the_waiting_limit_are_refused_with_503(served, data_url):
    from paddle_mm.serving.openai_api import ServerLimits

    engine = served["server"].engine
    kw = dict(model=served["model"], max_tokens=2, messages=[{"role": "user", "content": "hello"}])
    results = []
    with side_server(engine, ServerLimits(max_pending=1)) as (server, client):
        with engine.lock:  # the model is busy: the first request waits for it, holding the one slot
            first = threading.Thread(target=lambda: results.append(client.chat.completions.create(**kw)))
            first.start()
            deadline = time.time() + 30
            while server.pending._value and time.time() < deadline:  # noqa: SLF001 (the slot count)
                time.sleep(0.01)
            with pytest.raises(openai.APIStatusError) as caught:
                client.chat.completions.create(**kw)
            assert caught.value.status_code == 503 and caught.value.body["code"] == "server_busy"
        first.join(60)
        assert len(results) == 1 and results[0].choices[0].message.content is not None


def test_local_image_paths_only_inside_the_folder_the_server_allows(client, served, data_url):
    image = served["images"][4]
    messages = [{"role": "user", "content": [_image_part("file://" + image)]}]
    by_path = client.chat.completions.create(model=served["model"], messages=messages, max_tokens=4)
    by_data = client.chat.completions.create(model=served["model"], max_tokens=4,
                                             messages=[{"role": "user", "content": [_image_part(data_url(image))]}])
    assert by_path.choices[0].message.content == by_data.choices[0].message.content
    with side_server(served["server"].engine) as (_, default_client):  # no --allow-local-images
        with pytest.raises(openai.BadRequestError, match="allow-local-images"):
            default_client.chat.completions.create(model=served["model"], messages=messages, max_tokens=4)


def test_local_paths_that_resolve_outside_the_allowed_folder_are_refused(served, tmp_path):
    """Every path made here: a good image outside the folder (answered by a server that allows
    its own folder, so only the folder check can refuse it), reached directly, through '..',
    through a symbolic link inside the folder, and in a sibling folder whose name begins with
    the allowed one's."""
    import os
    import shutil

    allowed, sibling = tmp_path / "allowed", tmp_path / "allowed-not"
    allowed.mkdir()
    sibling.mkdir()
    outside = tmp_path / "outside.png"
    shutil.copyfile(served["images"][5], outside)
    shutil.copyfile(served["images"][5], allowed / "inside.png")
    shutil.copyfile(served["images"][5], sibling / "x.png")
    os.symlink(outside, allowed / "link-out.png")
    os.symlink(allowed / "inside.png", allowed / "link-in.png")

    def ask(client, path):
        return client.chat.completions.create(model=served["model"], max_tokens=2,
                                              messages=[{"role": "user", "content": [_image_part("file://" + path)]}])

    engine = served["server"].engine
    with side_server(engine, local_image_root=str(tmp_path)) as (_, wide):
        expected = ask(wide, str(outside)).choices[0].message.content  # the file itself is a good image
    with side_server(engine, local_image_root=str(allowed)) as (_, client):
        assert ask(client, str(allowed / "inside.png")).choices[0].message.content == expected
        assert ask(client, str(allowed / "link-in.png")).choices[0].message.content == expected  # stays inside
        for path in (str(outside), f"{allowed}/../outside.png", str(allowed / "link-out.png"), str(sibling / "x.png")):
            with pytest.raises(openai.BadRequestError) as caught:
                ask(client, path)
            assert caught.value.body["code"] == "invalid_image_url", path
            assert "is not a file inside the allowed image folder" in caught.value.body["message"], path


@contextlib.contextmanager
def side_server(engine, limits=None, local_image_root=""):
    """A second server on the same model, with other settings."""
    from paddle_mm.serving.server import ChatServer

    server = ChatServer(engine, port=0, limits=limits, local_image_root=local_image_root)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server, openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    finally:
        server.shutdown()
        server.server_close()


def test_serve_command_binds_loopback_and_answers(served):
    import os
    import re
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
           "PADDLE_MM_API_KEY": "k3y"}  # the key may come from the environment
    proc = subprocess.Popen([sys.executable, "-m", "paddle_mm.cli", "serve", served["run_dir"], "--port", "0",
                             "--model-name", "demo", "--threads", "1", "--max-batch", "2"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in proc.stderr:  # the server names its address once it listens
            match = re.search(r"serving 'demo' at (http://[\d.]+:\d+)/v1", line)
            if match:
                url = match.group(1)
                break
        assert url and url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["demo"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60).models.list()
    finally:
        proc.terminate()
        proc.wait(30)
