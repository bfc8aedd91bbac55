"""A tiny trained run behind a live server on a free loopback port, shared by the serving tests."""
from __future__ import annotations

import base64
import threading

import pytest
from tiny import make_tiny_recipe

# Small limits, so the tests can cross them with small files.
LIMITS = dict(max_request_bytes=400_000, max_image_bytes=100_000, max_image_pixels=200 * 200,
              max_request_pixels=300 * 200, max_tokens=16)


@pytest.fixture(scope="session")
def served(tmp_path_factory, demo_data):
    from paddle_mm.serving.openai_api import ServerLimits
    from paddle_mm.serving.server import make_server
    from paddle_mm.training.loop import train

    root = tmp_path_factory.mktemp("serve")
    run = train(make_tiny_recipe(demo_data, str(root / "tiny-vlm"), "train.max_steps=3", "infer.max_new_tokens=8"),
                quiet=True)
    server = make_server(run, port=0, limits=ServerLimits(**LIMITS), local_image_root=demo_data["data"])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"server": server, "url": server.url, "run_dir": run, "model": server.engine.model_name,
           "images": [f"{demo_data['data']}/images/test/{i:05d}.png" for i in range(10)]}
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def data_url():
    """data_url(path or bytes, mime) -> a base64 data: URL, the way clients send images."""
    def make(source, mime: str = "image/png") -> str:
        if isinstance(source, str):
            with open(source, "rb") as f:
                source = f.read()
        return f"data:{mime};base64," + base64.b64encode(source).decode()

    return make
