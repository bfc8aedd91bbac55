"""The training loop: schedule, stage hand-over, run folder contents, continuing a run."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from paddle_mm import builder
from paddle_mm.config import TrainConfig
from paddle_mm.errors import CheckpointError, RecipeError
from paddle_mm.run_folder import load_run
from paddle_mm.training.loop import train
from paddle_mm.training.optim import lr_at
from paddle_mm.weights.tensor_files import load_tensors


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(4, cfg) == pytest.approx(1.0)
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lr_at(14, cfg) == pytest.approx(0.1)
    linear = TrainConfig(lr=2.0, warmup_steps=0, max_steps=10, schedule="linear")
    assert lr_at(5, linear) == pytest.approx(1.0)
    assert lr_at(7, TrainConfig(lr=3.0, schedule="constant")) == 3.0


def test_run_folder_holds_everything_needed_to_load_it(tiny_recipe, tmp_path):
    recipe = tiny_recipe(str(tmp_path / "run"), "train.max_steps=3")
    run = train(recipe, quiet=True)
    for name in ("recipe.yaml", "config.json", "tokenizer.json", "model.safetensors",
                 "projector.safetensors", "metrics.jsonl", "checkpoint/step-00000003/state.json"):
        assert os.path.isfile(os.path.join(run, name)), name
    log = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 for r in log)
    _, cfg, tok, model = load_run(run)
    assert cfg.image_token_id == tok.image_token_id
    saved = load_tensors(os.path.join(run, "model.safetensors"))
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), saved[name])


def test_raising_max_steps_continues_a_finished_run_from_its_last_checkpoint(tiny_recipe, tmp_path, capsys):
    """A finished run asked for more steps takes up at its final checkpoint (that resuming
    gives an uninterrupted run's weights is tests/training/test_checkpoints.py's)."""
    run = str(tmp_path / "b")
    train(tiny_recipe(run, "train.max_steps=2", "train.schedule=constant"), quiet=True)
    first = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    capsys.readouterr()
    train(tiny_recipe(run, "train.max_steps=4", "train.schedule=constant"), quiet=True)
    assert f"resuming from checkpoint {os.path.join(run, 'checkpoint', 'step-00000002')} at step 2\n" \
        in capsys.readouterr().err
    lines = open(os.path.join(run, "metrics.jsonl")).read().splitlines()
    assert lines[:2] == first and [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    with pytest.raises(CheckpointError, match="already trained 4 of max_steps 4"):
        train(tiny_recipe(run, "train.max_steps=4", "train.schedule=constant"), quiet=True)


def test_pretrain_hands_its_projector_to_instruct(tiny_recipe, tmp_path):
    pre = train(tiny_recipe(str(tmp_path / "pre"), "train.max_steps=2",
                            "train.trainable=[multi_modal_projector]", stage="pretrain"), quiet=True)
    proj_file = os.path.join(pre, "projector.safetensors")
    recipe = tiny_recipe(str(tmp_path / "ins"), "train.max_steps=1", f"train.projector_from={proj_file}",
                         "train.lr=1e-12", "train.max_grad_norm=0")
    ins = train(recipe, quiet=True)
    after = load_tensors(os.path.join(ins, "projector.safetensors"))
    for name, value in load_tensors(proj_file).items():
        np.testing.assert_allclose(after[name], value, atol=1e-6)


def test_frozen_parts_do_not_change_in_pretrain(tiny_recipe, tmp_path):
    run = train(tiny_recipe(str(tmp_path / "pre"), "train.max_steps=2", "train.lr=1e-2",
                            "train.trainable=[multi_modal_projector]", stage="pretrain"), quiet=True)
    from paddle_mm.runtime import seed_everything

    recipe, cfg, tok, _ = load_run(run)
    seed_everything(recipe.train.seed)
    fresh = builder.build_model(cfg, tok)  # same seed -> the initial weights of that run
    trained = load_tensors(os.path.join(run, "model.safetensors"))
    changed = {n.split(".")[0] for n, v in fresh.state_dict().items()
               if not np.array_equal(v.numpy(), trained[n])}
    assert changed == {"multi_modal_projector"}


def test_unknown_trainable_name_is_an_error(tiny_recipe, tmp_path):
    recipe = tiny_recipe(str(tmp_path / "x"), "train.trainable=[projector]")
    with pytest.raises(RecipeError, match="'projector' is not one of"):
        train(recipe, quiet=True)


def test_unreadable_image_stops_the_run_or_is_skipped_and_counted(tiny_recipe, demo_data, tmp_path):
    import shutil

    from paddle_mm.errors import DataError

    data = tmp_path / "data"
    shutil.copytree(demo_data["data"], data)
    broken = data / "images" / "train" / "00003.png"
    broken.write_bytes(b"not a png")
    spec = f"data.train=[{{path: {data}/train_llava.json, format: llava}}]"
    with pytest.raises(DataError, match="00003.png"):
        train(tiny_recipe(str(tmp_path / "a"), spec, "train.max_steps=6"), quiet=True)
    run = train(tiny_recipe(str(tmp_path / "b"), spec, "train.max_steps=6", "data.on_error=skip"), quiet=True)
    report = json.load(open(os.path.join(run, "skipped.json")))
    assert report["count"] >= 1 and "00003.png" in report["records"][0]


def test_lora_run_trains_only_lora_and_projector_and_loads_back(tiny_recipe, tmp_path):
    run = train(tiny_recipe(str(tmp_path / "lora"), "train.max_steps=2", "train.lr=1e-2",
                            "train.trainable=[multi_modal_projector, language_model]", "train.lora.enabled=true",
                            "train.lora.r=2", "train.lora.alpha=4"), quiet=True)
    weights = load_tensors(os.path.join(run, "model.safetensors"))
    assert any(k.endswith("lora_A") for k in weights)
    _, _, _, model = load_run(run)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), weights[name], err_msg=name)


def test_qformer_projector_trains_through_the_same_loop(tiny_recipe, tmp_path):
    from paddle_mm.runtime import seed_everything

    run = train(tiny_recipe(str(tmp_path / "qf"), "train.max_steps=2", "train.lr=1e-2",
                            "train.trainable=[multi_modal_projector]", "model.projector.type=qformer",
                            "model.projector.qformer={num_queries: 4, hidden_size: 16, num_layers: 2, num_heads: 2, "
                            "intermediate_size: 32, cross_attention_every: 1}"), quiet=True)
    log = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in log)
    recipe, cfg, tok, model = load_run(run)
    assert cfg.tokens_per_image == 4 and model.multi_modal_projector.query_tokens.shape == [1, 4, 16]
    saved = load_tensors(os.path.join(run, "model.safetensors"))
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), saved[name], err_msg=name)
    seed_everything(recipe.train.seed)
    fresh = builder.build_model(cfg, tok).state_dict()  # the run's initial weights
    changed = {n for n, v in fresh.items() if not np.array_equal(v.numpy(), saved[n])}
    assert {n.split(".")[0] for n in changed} == {"multi_modal_projector"}
    # the loss reached the learned queries, every layer's cross-attention and the projection
    for name in ["multi_modal_projector.query_tokens", "multi_modal_projector.proj.weight"] + [
            f"multi_modal_projector.layers.{i}.cross_attn.{w}.weight" for i in (0, 1) for w in ("q_proj", "k_proj")]:
        assert name in changed, name


def test_epoch_order_groups_lengths_without_repeating_samples():
    from paddle_mm.training.batches import epoch_order as _epoch_order

    rng = np.random.default_rng(0)
    lengths = rng.choice([40, 130], size=203)
    order = _epoch_order(7, lengths, epoch=0, batch_size=8)
    assert len(order) == 200 and len(set(order.tolist())) == 200  # full batches, each sample once
    np.testing.assert_array_equal(order, _epoch_order(7, lengths, epoch=0, batch_size=8))  # resumable
    assert not np.array_equal(order, _epoch_order(7, lengths, epoch=1, batch_size=8))
    batches = order.reshape(-1, 8)
    padded = sum(8 * lengths[b].max() for b in batches)
    random_batches = rng.permutation(203)[:200].reshape(-1, 8)
    assert padded < 0.8 * sum(8 * lengths[b].max() for b in random_batches)
