"""Shared fixtures: a small synthetic dataset, its tokenizer, and a tiny demo recipe."""
from __future__ import annotations

import pytest
from tiny import make_tiny_recipe


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """20 train / 4 val / 10 test synthetic scenes and a BPE tokenizer trained on them."""
    from paddle_mm.data.synthetic import generate_demo_data
    from paddle_mm.data.tokenizer import Tokenizer, training_corpus

    root = tmp_path_factory.mktemp("demo")
    files = generate_demo_data(str(root / "data"), 20, 4, 10, seed=0)
    tok = Tokenizer.train_bpe(training_corpus([files["corpus"]]), vocab_size=300)
    tok.save(str(root / "tokenizer"))
    return {"root": root, "data": str(root / "data"), "tokenizer": str(root / "tokenizer" / "tokenizer.json")}


@pytest.fixture
def tiny_recipe(demo_data):
    """make(out_dir, *overrides, stage=...) -> a tiny demo Recipe writing to out_dir."""
    return lambda out_dir, *overrides, stage="instruct": make_tiny_recipe(demo_data, out_dir, *overrides, stage=stage)


