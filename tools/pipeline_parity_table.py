"""The parity table of the folders transformers 4.57 and 5.x wrote (tools/make_pipeline_fixtures.py,
tools/make_blip2_fixtures.py --opt): prompt ids, pixels, logits and greedy tokens, as Markdown.

    python tools/pipeline_parity_table.py

tests/inference/test_reference_pipeline.py asserts the same comparisons against their limits.
"""
from __future__ import annotations

import os

import numpy as np
from safetensors.numpy import load_file

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "reference")
TAGS = ("hf457", "hf5")


def _until_stop(tokens, stops) -> list[int]:
    """The reference tokens up to the first stop id (transformers keeps it; paddle_mm does not)."""
    out = []
    for t in tokens.tolist():
        if t in stops:
            break
        out.append(t)
    return out


def _row(folder: str, prompt: str, image: str, ref: dict, prefix: str, row: int | None = None) -> tuple:
    """(ids identical, pixel diff, logit diff, greedy identical, greedy length) of one image and prompt."""
    import paddle

    from paddle_mm.builder import image_processor_for
    from paddle_mm.run_folder import load_run

    recipe, _, tok, model = load_run(folder)
    pick = (lambda a: a[row]) if row is not None else (lambda a: a)
    ids, _ = tok.encode_chat([("user", prompt)], model.tokens_per_image, add_generation_prompt=True)
    pixels = image_processor_for(recipe)([image])
    x, mask = paddle.to_tensor([ids]), paddle.ones([1, len(ids)], dtype="int64")
    with paddle.no_grad():
        _, logits = model(x, mask, paddle.to_tensor(pixels))
    greedy = model.generate(x, mask, paddle.to_tensor(pixels), max_new_tokens=16, eos_token_id=tok.stop_ids)[0]
    expected = _until_stop(pick(ref[prefix + "greedy" if row is None else "greedy_tokens"]), tok.stop_ids)
    return (ids == pick(ref[prefix + "input_ids"]).tolist(),
            float(np.abs(pixels[0] - pick(ref[prefix + "pixel_values"])).max()),
            float(np.abs(logits.numpy()[0] - pick(ref[prefix + "logits"])).max()), greedy == expected, len(greedy))


def _text_row(name: str, tag: str) -> tuple:
    import paddle

    from paddle_mm.config import LMConfig
    from paddle_mm.data.tokenizer import Tokenizer
    from paddle_mm.lm.adapter import run_language_model
    from paddle_mm.lm.decoding import decode
    from paddle_mm.weights.llm import load_language_model

    folder = os.path.join(REFERENCE, "pipeline", name, tag)
    ref = load_file(os.path.join(folder, "reference.safetensors"))
    tok = Tokenizer.load(folder)
    ids, _ = tok.encode_chat([("user", "what colour is the circle?")], 0, add_generation_prompt=True)
    lm = load_language_model(LMConfig(family=name, path=folder), tok.special_ids())
    lm.eval()
    x = paddle.to_tensor([ids])
    with paddle.no_grad():
        embeds = lm.get_input_embeddings()(x)
        logits, _ = run_language_model(lm, embeds)
        greedy = decode(lm, embeds, paddle.ones_like(x), 16, tok.stop_ids)[0]
    return (ids == ref["input_ids"].tolist(), None, float(np.abs(logits.numpy()[0] - ref["logits"]).max()),
            greedy == _until_stop(ref["greedy"], tok.stop_ids), len(greedy))


def main() -> None:
    rows = []
    for name in ("llava_llama", "llava_qwen2"):
        for tag in TAGS:
            folder = os.path.join(REFERENCE, "pipeline", name, tag)
            ref = load_file(os.path.join(folder, "reference.safetensors"))
            for key in ("wide", "tall", "square"):
                image = os.path.join(REFERENCE, "pipeline", "images", f"{key}.png")
                rows.append((name, tag, key) + _row(folder, "<image>\nwhat colour is the circle?", image, ref, f"{key}."))
    for tag in TAGS:
        folder = os.path.join(REFERENCE, "blip2_opt", tag)
        ref = load_file(os.path.join(folder, "reference.safetensors"))
        rows.append(("blip2_opt", tag, "image_0 40x24") + _row(
            folder, "<image>\nwhat colour is the square?", os.path.join(folder, "image_0.png"), ref, "", row=0))
    for name in ("qwen2", "llama"):
        for tag in TAGS:
            rows.append((name, tag, "text") + _text_row(name, tag))
    print("| model | layout | image | prompt ids identical | pixels max abs diff | logits max abs diff | greedy identical (tokens) |")
    print("|---|---|---|---|---|---|---|")
    for name, tag, image, same_ids, pixels, logits, same_greedy, n in rows:
        px = "-" if pixels is None else f"{pixels:.1e}"
        print(f"| {name} | {tag} | {image} | {'yes' if same_ids else 'NO'} | {px} | {logits:.1e} | "
              f"{'yes' if same_greedy else 'NO'} ({n}) |")


if __name__ == "__main__":
    main()
