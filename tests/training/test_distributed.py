"""Scaling out: data-parallel and sharded runs match one process; recompute; settings checks."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from paddle_mm.errors import RecipeError
from paddle_mm.training.launch import train_in_processes
from paddle_mm.training.loop import train
from paddle_mm.weights.tensor_files import load_tensors

# Captions and conversations mixed, so the processes of a step hold different token counts.
# Weighting each process's tokens by its own count instead of the global one moved weights
# by about 1e-2 here; the right weighting agrees within 7e-6.
COMMON = ["train.schedule=constant", "train.lr=3e-3", "train.seed=5", "train.max_steps=4", "train.batch_size=4"]


def _weights(run):
    return load_tensors(os.path.join(run, "model.safetensors"))


# The ViT's key bias adds the same score to every key of a query, which softmax cancels: its
# gradient is zero but for rounding, and Adam scales that noise up to the learning rate.
NO_GRADIENT = ".attn.k_proj.bias"


def _assert_same(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    far = {n: float(np.abs(a[n] - b[n]).max()) for n in a if not n.endswith(NO_GRADIENT)}
    assert {n: d for n, d in far.items() if d > atol} == {}


@pytest.fixture(scope="module")
def single(tmp_path_factory, demo_data):
    from tiny import make_tiny_recipe

    out = str(tmp_path_factory.mktemp("single") / "run")
    return _weights(train(make_tiny_recipe(demo_data, out, *COMMON), quiet=True))


def test_two_processes_match_one_process_with_the_whole_batch(tiny_recipe, tmp_path, single):
    from paddle_mm.run_folder import load_run

    run = train_in_processes(tiny_recipe(str(tmp_path / "dp"), *COMMON), processes=2, quiet=True)
    _assert_same(_weights(run), single)
    steps = [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]  # rank 0 alone logs
    _, _, _, model = load_run(run)  # one loadable run: what loads is what was saved
    saved = _weights(run)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), saved[name], err_msg=name)


def test_accumulation_over_processes_matches_accumulation_in_one(tiny_recipe, tmp_path):
    # A step's micro-batches follow one another in the sample order, so only runs with the
    # same batch_size and grad_accum see the same samples in each step.
    acc = [*COMMON, "train.max_steps=2", "train.grad_accum=2"]
    one = train(tiny_recipe(str(tmp_path / "one"), *acc), quiet=True)
    two = train_in_processes(tiny_recipe(str(tmp_path / "two"), *acc), processes=2, quiet=True)
    _assert_same(_weights(two), _weights(one))


def test_sharded_optimizer_states_match_one_process(tiny_recipe, tmp_path, single):
    run = train_in_processes(tiny_recipe(str(tmp_path / "sh"), *COMMON, "train.sharding_stage=1"),
                             processes=2, quiet=True)
    _assert_same(_weights(run), single)


@pytest.mark.parametrize("stage", [0, 1])
def test_resumed_two_process_run_continues_where_it_stopped(tiny_recipe, tmp_path, single, stage):
    out = str(tmp_path / "resume")
    sharding = f"train.sharding_stage={stage}"
    train_in_processes(tiny_recipe(out, *COMMON, sharding, "train.max_steps=2"), processes=2, quiet=True)
    train_in_processes(tiny_recipe(out, *COMMON, sharding), processes=2, quiet=True)
    _assert_same(_weights(out), single)
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]  # rank 0 alone logs, and the second run starts at step 3


def test_recompute_gives_the_same_gradients(tiny_recipe, tmp_path):

    from paddle_mm import builder
    from paddle_mm.data.dataset import ConversationDataset, collate
    from paddle_mm.runtime import seed_everything
    from paddle_mm.training.batches import batch_inputs
    from paddle_mm.training.distributed import enable_recompute

    recipe = tiny_recipe(str(tmp_path / "x"), "model.vision.num_layers=2", "model.lm.num_layers=2")
    tok = builder.load_tokenizer(recipe)
    cfg = builder.model_config_for(recipe, tok)
    samples, _ = builder.read_samples(recipe.data.train, recipe)
    data = ConversationDataset(samples[:3], tok, builder.image_processor_for(recipe), cfg.tokens_per_image, 2048)
    batch = collate([data[i] for i in range(3)], tok.pad_token_id)

    def grads(recompute: bool):
        seed_everything(0)
        model = builder.build_model(cfg, tok)
        if recompute:
            enable_recompute(model)
        model.train()
        token_nll, _ = model(**batch_inputs(batch, labels=True))
        token_nll.sum().backward()
        return {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys()
    assert any(n.startswith("vision_tower.blocks") for n in plain)
    _assert_same(plain, recomputed, atol=1e-6)


@pytest.mark.parametrize("override, message", [
    ("train.sharding_stage=2", "sharding_stage 2 needs a GPU"),
    ("train.sharding_stage=3", "sharding_stage 3 needs a GPU"),
    ("train.sharding_stage=4", "must be 0, 1, 2 or 3"),
    ("train.precision=bf16", "precision bf16 needs a GPU"),
    ("model.lm.attn_implementation=flashmask", "flashmask needs a GPU"),
])
def test_settings_this_cpu_cannot_honour_are_recipe_errors(tiny_recipe, tmp_path, override, message):
    with pytest.raises(RecipeError, match=message):
        train(tiny_recipe(str(tmp_path / "x"), override), quiet=True)
