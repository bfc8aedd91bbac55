"""The server over a Qwen2-VL run built here: several image parts of different sizes in one
message, each at its own token count, answered as the library answers the same request."""
from __future__ import annotations

import base64
import io
import threading

import openai
import pytest
from PIL import Image
from tiny import TINY_QWEN2_VL, make_tiny_recipe


@pytest.fixture(scope="module")
def qwen_served(tmp_path_factory, demo_data):
    from paddle_mm.serving.server import make_server
    from paddle_mm.training.loop import train

    root = tmp_path_factory.mktemp("serve-qwen")
    run = train(make_tiny_recipe(demo_data, str(root / "tiny-qwen"), *TINY_QWEN2_VL, "train.max_steps=2",
                                 "infer.max_new_tokens=8"), quiet=True)
    scenes = [f"{demo_data['data']}/images/test/{i:05d}.png" for i in range(2)]
    images = []
    for k, (path, size) in enumerate(zip(scenes, [(48, 48), (112, 56)])):
        images.append(str(root / f"{k}.png"))
        Image.open(path).resize(size).save(images[-1])
    server = make_server(run, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"server": server, "url": server.url, "run_dir": run, "images": images}
    server.shutdown()
    server.server_close()


def _data_url(path: str) -> str:
    buf = io.BytesIO(open(path, "rb").read())
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_two_image_parts_of_different_sizes_answer_as_the_library(qwen_served):
    from paddle_mm.builder import image_processor_for
    from paddle_mm.inference.generate import generate_answers, prompt_length
    from paddle_mm.inference.requests import request_to_sample
    from paddle_mm.run_folder import load_run

    a, b = qwen_served["images"]
    question = "which image has more circles?"
    client = openai.OpenAI(base_url=qwen_served["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.chat.completions.create(
        model="tiny-qwen", temperature=0, max_tokens=6,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(a)}},
                                               {"type": "image_url", "image_url": {"url": _data_url(b)}},
                                               {"type": "text", "text": question}]}])
    recipe, _, tok, model = load_run(qwen_served["run_dir"])
    proc = image_processor_for(recipe)
    recipe.infer.max_new_tokens = 6
    sample = request_to_sample({"id": "x", "task": "vqa", "images": [a, b], "prompt": question}, recipe.infer)
    assert r.choices[0].message.content == generate_answers(model, tok, [sample], proc, recipe.infer)["x"]
    assert 0 < r.usage.completion_tokens <= 6
    # 4 + 8 image tokens (48 x 48 -> 56 x 56, 112 x 56 as it is), not one count for both
    assert r.usage.prompt_tokens == prompt_length(model, tok, proc, sample)
    ids, _ = tok.encode_chat(sample.turns, [4, 8], add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(ids)
