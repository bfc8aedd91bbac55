"""`paddle-mm serve` on a Hugging Face LLaVA folder as downloaded answers what transformers generates."""
from __future__ import annotations

import os
import threading

import openai
from reference_fixtures import REFERENCE
from safetensors.numpy import load_file

from paddle_mm.serving.openai_api import ServerLimits
from paddle_mm.serving.server import make_server

FOLDER = os.path.join(REFERENCE, "pipeline", "llava_llama", "hf5")
IMAGE = os.path.join(REFERENCE, "pipeline", "images", "tall.png")


def test_served_folder_answers_with_its_template_and_image_settings(data_url):
    server = make_server(FOLDER, port=0, limits=ServerLimits(max_tokens=16))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model=server.engine.model_name, temperature=0, max_tokens=16, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
                                         {"type": "text", "text": "what colour is the circle?"}]}])
        tok = server.engine.tokenizer
        greedy = load_file(os.path.join(FOLDER, "reference.safetensors"))["tall.greedy"].tolist()
        if greedy and greedy[-1] in tok.stop_ids:
            greedy = greedy[:-1]
        assert r.choices[0].message.content == tok.decode(greedy).strip()
    finally:
        server.shutdown()
        server.server_close()
