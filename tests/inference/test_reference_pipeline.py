"""The whole path a user takes, against transformers 4.57 and 5.x (tools/make_pipeline_fixtures.py):
a folder as save_pretrained wrote it, an image file and a question give the prompt ids, the pixels,
the logits and the greedy tokens transformers' processor, apply_chat_template and generate gave;
a conversation's labels are transformers' assistant mask."""
from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stdout

import numpy as np
import pytest
from reference_fixtures import REFERENCE

from paddle_mm.data.tokenizer import IGNORE_INDEX

PIPELINE = os.path.join(REFERENCE, "pipeline")
TAGS = ("hf457", "hf5")
IMAGES = ("wide", "tall", "square")  # 45 x 30, 23 x 50, 32 x 32
LLAVAS = ("llava_llama", "llava_qwen2")


def _folder(name: str, tag: str) -> str:
    return os.path.join(PIPELINE, name, tag)


def _image(key: str) -> str:
    return os.path.join(PIPELINE, "images", f"{key}.png")


def _reference(folder: str) -> tuple[dict, dict]:
    from safetensors.numpy import load_file

    with open(os.path.join(folder, "reference.json"), encoding="utf-8") as f:
        meta = json.load(f)
    return load_file(os.path.join(folder, "reference.safetensors")), meta


def _without_stop(tokens: np.ndarray, stop_ids) -> list[int]:
    """transformers keeps the eos it stopped on; paddle_mm's answers end before it."""
    out = tokens.tolist()
    return out[:-1] if out and out[-1] in stop_ids else out


def _logits_and_greedy(model, tokenizer, ids: list[int], pixels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The model's logits [L, V] of one prompt with its images, and its 16 greedy tokens."""
    import paddle

    input_ids, pixel_values = paddle.to_tensor([ids]), paddle.to_tensor(pixels)
    mask = paddle.ones_like(input_ids)
    with paddle.no_grad():
        _, logits = model(input_ids, mask, pixel_values)
    greedy = model.generate(input_ids, mask, pixel_values, max_new_tokens=16, eos_token_id=tokenizer.stop_ids)[0]
    return logits.numpy()[0], greedy


_LOADED: dict = {}


def _load(folder: str):
    """Load each fixture once for the module (loading builds a whole model)."""
    if folder not in _LOADED:
        from paddle_mm.builder import image_processor_for
        from paddle_mm.run_folder import load_run

        recipe, _, tokenizer, model = load_run(folder)
        _LOADED[folder] = (recipe, tokenizer, model, image_processor_for(recipe))
    return _LOADED[folder]


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("name", LLAVAS)
def test_llava_folder_gives_transformers_prompt_pixels_logits_and_greedy_tokens(name, tag):

    folder = _folder(name, tag)
    ref, meta = _reference(folder)
    recipe, tokenizer, model, processor = _load(folder)
    assert tokenizer.template is not None and tokenizer.template.origin.endswith("chat_template.jinja")
    turns = [("user", recipe.infer.vqa_prompt.format(question=meta["question"]))]
    for key in IMAGES:
        assert tokenizer.template.render(turns, add_generation_prompt=True) == meta["prompts"][key]
        ids, _ = tokenizer.encode_chat(turns, model.tokens_per_image, add_generation_prompt=True)
        assert ids == ref[f"{key}.input_ids"].tolist(), key
        pixels = processor([_image(key)])
        assert np.abs(pixels[0] - ref[f"{key}.pixel_values"]).max() <= 1e-5, key
        logits, greedy = _logits_and_greedy(model, tokenizer, ids, pixels)
        assert np.abs(logits - ref[f"{key}.logits"]).max() <= 1e-4, key
        assert greedy == _without_stop(ref[f"{key}.greedy"], tokenizer.stop_ids), key


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("name", LLAVAS)
def test_paddle_mm_infer_on_the_folder_answers_what_transformers_generates(name, tag):
    from paddle_mm.cli import main

    folder = _folder(name, tag)
    ref, meta = _reference(folder)
    _, tokenizer, _, _ = _load(folder)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["infer", folder, "--image", _image("tall"), "--prompt", meta["question"],
                     "--max-new-tokens", "16"]) in (0, None)
    expected = tokenizer.decode(_without_stop(ref["tall.greedy"], tokenizer.stop_ids)).strip()
    assert out.getvalue().strip() == expected


@pytest.mark.parametrize("name", LLAVAS)
def test_converted_folder_keeps_the_template_and_the_image_settings(name, tmp_path):

    from paddle_mm.builder import image_processor_for
    from paddle_mm.run_folder import load_run
    from paddle_mm.weights.convert import convert

    folder = _folder(name, "hf5")
    ref, meta = _reference(folder)
    converted = convert(folder, str(tmp_path / "pm"), "llava")
    recipe, _, tokenizer, model = load_run(converted)
    turns = [("user", recipe.infer.vqa_prompt.format(question=meta["question"]))]
    ids, _ = tokenizer.encode_chat(turns, model.tokens_per_image, add_generation_prompt=True)
    assert ids == ref["wide.input_ids"].tolist()
    pixels = image_processor_for(recipe)([_image("wide")])
    assert np.abs(pixels[0] - ref["wide.pixel_values"]).max() <= 1e-5
    assert _logits_and_greedy(model, tokenizer, ids, pixels)[1] == _without_stop(ref["wide.greedy"], tokenizer.stop_ids)


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("name", LLAVAS)
def test_conversation_labels_are_transformers_assistant_mask(name, tag):
    """transformers 4.57's processors return an all-zero assistant mask (it reads the offsets of the
    text before the image tokens were widened); 5.x's is right and is the reference for both."""
    folder = _folder(name, tag)
    ref, meta = _reference(folder)
    ref5, _ = _reference(_folder(name, "hf5"))
    if tag == "hf457":
        assert ref["conversation.assistant_masks"].sum() == 0
    _, tokenizer, model, _ = _load(folder)
    turns = [(r, ("<image>\n" + t) if k == 0 else t) for k, (r, t) in enumerate(meta["conversation"])]
    ids, labels = tokenizer.encode_chat(turns, model.tokens_per_image)
    assert ids == ref["conversation.input_ids"].tolist() == ref5["conversation.input_ids"].tolist()
    mask = [int(label != IGNORE_INDEX) for label in labels]
    assert mask == ref5["conversation.assistant_masks"].tolist()
    assert sum(mask) > 0
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("name", ("qwen2", "llama"))
def test_text_lm_folder_gives_transformers_prompt_logits_greedy_and_labels(name, tag):
    import paddle

    from paddle_mm.config import LMConfig
    from paddle_mm.data.tokenizer import Tokenizer
    from paddle_mm.lm.adapter import run_language_model
    from paddle_mm.lm.decoding import decode
    from paddle_mm.weights.llm import load_language_model

    folder = _folder(name, tag)
    ref, meta = _reference(folder)
    tokenizer = Tokenizer.load(folder)
    assert tokenizer.template.render([("user", meta["question"])], add_generation_prompt=True) == meta["prompt"]
    ids, _ = tokenizer.encode_chat([("user", meta["question"])], 0, add_generation_prompt=True)
    assert ids == ref["input_ids"].tolist()
    lm = load_language_model(LMConfig(family=name, path=folder), tokenizer.special_ids())
    lm.eval()
    input_ids = paddle.to_tensor([ids])
    with paddle.no_grad():
        embeds = lm.get_input_embeddings()(input_ids)
        logits, _ = run_language_model(lm, embeds)
        greedy = decode(lm, embeds, paddle.ones_like(input_ids), 16, tokenizer.stop_ids)[0]
    assert np.abs(logits.numpy()[0] - ref["logits"]).max() <= 1e-4
    assert greedy == _without_stop(ref["greedy"], tokenizer.stop_ids)
    conv_ids, labels = tokenizer.encode_chat([tuple(t) for t in meta["conversation"]], 0)
    assert conv_ids == ref["conversation.input_ids"].tolist()
    assert [int(label != IGNORE_INDEX) for label in labels] == ref["conversation.assistant_masks"].tolist()


@pytest.mark.parametrize("tag", TAGS)
def test_blip2_folder_prompted_as_its_processor_does(tag):
    """BLIP-2 has no chat template: its processor puts the query tokens, then the tokenizer's text
    (OPT's leading </s> included). The fixture is tools/make_blip2_fixtures.py --opt."""
    from safetensors.numpy import load_file

    from paddle_mm.inference.generate import generate_answers
    from paddle_mm.inference.requests import request_to_sample

    folder = os.path.join(REFERENCE, "blip2_opt", tag)
    ref = load_file(os.path.join(folder, "reference.safetensors"))
    recipe, tokenizer, model, processor = _load(folder)
    assert tokenizer.plain
    ids, _ = tokenizer.encode_chat([("user", "<image>\nwhat colour is the square?")], model.tokens_per_image,
                                   add_generation_prompt=True)
    assert ids == ref["input_ids"][0].tolist()  # the row without padding
    pixels = processor([os.path.join(folder, "image_0.png")])
    assert np.abs(pixels[0] - ref["pixel_values"][0]).max() <= 1e-5
    logits, _ = _logits_and_greedy(model, tokenizer, ids, pixels)
    assert np.abs(logits - ref["logits"][0]).max() <= 1e-4
    # the fixture generated 16 tokens without stopping: compare up to the first stop id
    expected = ref["greedy_tokens"][0].tolist()
    stops = [i for i, t in enumerate(expected) if t in tokenizer.stop_ids]
    expected = expected[: stops[0]] if stops else expected
    recipe.infer.max_new_tokens = len(expected)
    sample = request_to_sample({"id": "0", "image": os.path.join(folder, "image_0.png"),
                                "prompt": "what colour is the square?"}, recipe.infer)
    answer = generate_answers(model, tokenizer, [sample], processor, recipe.infer)["0"]
    assert answer == tokenizer.decode(expected).strip()


@pytest.mark.parametrize("tag", TAGS)
def test_paddle_mm_infer_on_a_blip2_folder_answers_what_transformers_generates(tag):
    from safetensors.numpy import load_file

    from paddle_mm.cli import main

    folder = os.path.join(REFERENCE, "blip2_opt", tag)
    _, tokenizer, _, _ = _load(folder)
    expected = load_file(os.path.join(folder, "reference.safetensors"))["greedy_tokens"][0].tolist()
    stops = [i for i, t in enumerate(expected) if t in tokenizer.stop_ids]
    expected = expected[: stops[0]] if stops else expected
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["infer", folder, "--image", os.path.join(folder, "image_0.png"), "--prompt",
                     "what colour is the square?", "--max-new-tokens", str(len(expected))]) in (0, None)
    assert out.getvalue().strip() == tokenizer.decode(expected).strip()  # (answers may hold \x0b: no splitlines)
