"""A tiny version of the demo recipe, for tests that train."""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The demo model shrunk so a training step takes milliseconds on CPU.
TINY = [
    "model.vision.hidden_size=32", "model.vision.intermediate_size=64", "model.vision.num_layers=1",
    "model.vision.num_heads=2", "model.lm.hidden_size=32", "model.lm.intermediate_size=64",
    "model.lm.num_layers=1", "model.lm.num_heads=2", "model.lm.num_kv_heads=2",
    "train.batch_size=4", "train.log_every=1", "train.warmup_steps=0",
]

# The same, as a Qwen2-VL built from scratch (model.Qwen2VLModel): native-resolution images, M-RoPE.
TINY_QWEN2_VL = [
    "model.family=qwen2_vl",
    "model.qwen2_vl_vision={depth: 1, hidden_size: 16, intermediate_size: 32, num_heads: 2}",
]


def tiny_overrides(demo_data, out_dir, *overrides) -> list[str]:
    """The command-line overrides that turn the demo recipe into the tiny one."""
    d = demo_data["data"]
    paths = [
        f"data.tokenizer={demo_data['tokenizer']}",
        f"train.output_dir={out_dir}",
        f"data.train=[{{path: {d}/train_llava.json, format: llava}}, {{path: {d}/train_captions.json, format: caption}}]",
        "train.init_from=''",
        # No validation unless a test asks for it (the demo recipe validates on its val split).
        "data.eval=[]", "train.eval_every=0", "train.eval_answers=0",
    ]
    return paths + TINY + list(overrides)


def recipe_path(stage="instruct") -> str:
    return os.path.join(REPO, "recipes", "demo", f"{stage}.yaml")


def make_tiny_recipe(demo_data, out_dir, *overrides, stage="instruct"):
    from paddle_mm.config import Recipe
    from paddle_mm.recipe import load_recipe

    return load_recipe(recipe_path(stage), Recipe, tiny_overrides(demo_data, out_dir, *overrides))
