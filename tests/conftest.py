"""Shared fixtures: a small synthetic dataset, its tokenizer, and a tiny demo recipe."""
from __future__ import annotations

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The demo model shrunk so a training step takes milliseconds on CPU.
TINY = [
    "model.vision.hidden_size=32", "model.vision.intermediate_size=64", "model.vision.num_layers=1",
    "model.vision.num_heads=2", "model.lm.hidden_size=32", "model.lm.intermediate_size=64",
    "model.lm.num_layers=1", "model.lm.num_heads=2", "model.lm.num_kv_heads=2",
    "train.batch_size=4", "train.log_every=1", "train.warmup_steps=0",
]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """20 train / 4 val / 10 test synthetic scenes and a BPE tokenizer trained on them."""
    from paddle_mm.data.synthetic import generate_demo_data
    from paddle_mm.tokenizer import Tokenizer, training_corpus

    root = tmp_path_factory.mktemp("demo")
    files = generate_demo_data(str(root / "data"), 20, 4, 10, seed=0)
    tok = Tokenizer.train_bpe(training_corpus([files["corpus"]]), vocab_size=300)
    tok.save(str(root / "tokenizer"))
    return {"root": root, "data": str(root / "data"), "tokenizer": str(root / "tokenizer" / "tokenizer.json")}


@pytest.fixture
def tiny_recipe(demo_data):
    """make(out_dir, *overrides, stage=...) -> a tiny demo Recipe writing to out_dir."""
    return lambda out_dir, *overrides, stage="instruct": _tiny_recipe(demo_data, out_dir, *overrides, stage=stage)


def _tiny_recipe(demo_data, out_dir, *overrides, stage="instruct"):
    from paddle_mm.config import Recipe
    from paddle_mm.recipe import load_recipe

    d = demo_data["data"]
    paths = [
        f"data.tokenizer={demo_data['tokenizer']}",
        f"train.output_dir={out_dir}",
        f"data.train=[{{path: {d}/train_llava.json, format: llava}}, {{path: {d}/train_captions.json, format: caption}}]",
        "train.init_from=''",
    ]
    return load_recipe(os.path.join(REPO, "recipes", "demo", f"{stage}.yaml"), Recipe, paths + TINY + list(overrides))
