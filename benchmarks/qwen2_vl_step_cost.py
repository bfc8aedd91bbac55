"""The cost of a Qwen2-VL training step as images grow from 64 to 1024 tokens (CPU).

    python benchmarks/qwen2_vl_step_cost.py [--batch 4] [--steps 3] [--recipe recipes/qwen2_vl_demo/instruct.yaml]

The demo's Qwen2-VL (recipes/qwen2_vl_demo: a 2-block encoder, the merger, a 4-layer M-RoPE
Qwen2), a batch of `batch` conversations of one image each, through the training data path
(ConversationDataset -> collate -> the model's per-token loss -> backward -> AdamW). A T-token
image is a square of sqrt(T) * 28 px (4T patches of 14 px). The last rows mix sizes in one
batch: three 64-token images and one 1024-token image cost about what their own tokens cost,
not what four 1024-token images (padding every image to the largest) would.
Prints the median seconds per step over `steps` steps after one warm-up step.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(recipe_path: str):
    from paddle_mm import builder
    from paddle_mm.config import Recipe
    from paddle_mm.data.tokenizer import Tokenizer
    from paddle_mm.recipe import load_recipe

    words = "what colour is the circle square triangle red green blue one two three".split()
    tok = Tokenizer.word_level(words)
    recipe = load_recipe(recipe_path, Recipe, ["train.init_from=''", "data.image.min_pixels=0",
                                               "data.image.max_pixels=1100000"])
    cfg = builder.model_config_for(recipe, tok)
    return recipe, tok, builder.build_model(cfg, tok)


def step_seconds(recipe, tok, model, tokens: list[int], steps: int, folder: str, packed: bool = False):
    """(median s/step, image patches in the batch, LM rows x positions) for one image of each count;
    packed: the conversations in one packed row (data/packing.py) instead of padded rows."""
    import paddle
    from PIL import Image

    from paddle_mm import builder
    from paddle_mm.data.dataset import ConversationDataset, collate
    from paddle_mm.data.packing import pack
    from paddle_mm.data.readers import Sample
    from paddle_mm.training.batches import batch_inputs

    rng = np.random.default_rng(0)
    samples = []
    for k, t in enumerate(tokens):
        side = int(math.isqrt(t)) * 28
        path = os.path.join(folder, f"{t}-{k}.png")
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
        question = " ".join(rng.choice(["what", "colour", "is", "the", "circle"], 24))
        samples.append(Sample(id=str(k), images=[path], turns=[("user", f"<image>\n{question}"),
                                                                ("assistant", "red circle one two three")],
                              source="bench", index=k))
    data = ConversationDataset(samples, tok, builder.image_processor_for(recipe), None, 8192,
                               rope_tokens=model.rope_tokens())
    items = [data[i] for i in range(len(data))]
    batch = pack(items, tok.pad_token_id, sum(len(x["input_ids"]) for x in items)) if packed \
        else collate(items, tok.pad_token_id)
    inputs = batch_inputs(batch, labels=True)
    opt = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=model.parameters())
    model.train()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        out, _ = model(**inputs)
        out.sum().backward()
        opt.step()
        opt.clear_grad()
        times.append(time.perf_counter() - start)
    rows, length = batch["input_ids"].shape
    return float(np.median(times[1:])), int(batch["pixel_values"].shape[0]), f"{rows} x {length}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--recipe", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "recipes", "qwen2_vl_demo", "instruct.yaml"))
    args = ap.parse_args()
    from paddle_mm.runtime import configure_cpu

    recipe, tok, model = build(args.recipe)
    configure_cpu(0)
    b = args.batch
    cases = [(f"{t} tokens x {b}", [t] * b, False) for t in (64, 144, 256, 576, 1024)]
    mixed = [64] * (b - 1) + [1024]
    cases += [(f"64 x {b - 1} + 1024, padded", mixed, False), (f"64 x {b - 1} + 1024, packed", mixed, True)]
    print(f"{'images in the batch':<28}{'patches':>9}{'LM rows x positions':>21}{'s/step':>9}{'ms per patch':>14}")
    with tempfile.TemporaryDirectory() as folder:
        for name, tokens, packed in cases:
            sec, patches, shape = step_seconds(recipe, tok, model, tokens, args.steps, folder, packed)
            print(f"{name:<28}{patches:>9}{shape:>21}{sec:>9.3f}{1000 * sec / patches:>14.3f}", flush=True)


if __name__ == "__main__":
    main()
