"""Validation while training (data.eval) and the logged interval mean of the training loss."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from paddle_mm import builder
from paddle_mm.data.dataset import ConversationDataset, collate
from paddle_mm.errors import RecipeError
from paddle_mm.model import mean_nll
from paddle_mm.run_folder import load_run
from paddle_mm.training.batches import DataCursor, batch_inputs, item_targets
from paddle_mm.training.loop import train
from paddle_mm.weights.tensor_files import load_tensors

COMMON = ["train.schedule=constant", "train.lr=3e-3", "train.seed=2"]
# Run-to-run figures that measure time, not the run.
TIMINGS = {"samples_per_s", "tokens_per_s", "label_tokens_per_s", "eval_s"}


def _eval_spec(demo_data, *names) -> str:
    d = demo_data["data"]
    fmt = {"val_llava.json": "llava", "val_captions.json": "caption"}
    return "data.eval=[" + ", ".join(f"{{path: {d}/{n}, format: {fmt[n]}}}" for n in names) + "]"


def _records(run: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def _without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def test_held_out_loss_is_the_token_mean_over_the_same_samples(tiny_recipe, demo_data, tmp_path):
    # Conversations and captions mixed (different lengths, padded together in one batch of 4),
    # and eval_samples cutting the list: the 4 conversations and the first 2 captions.
    recipe = tiny_recipe(str(tmp_path / "run"), *COMMON, "train.max_steps=2",
                         _eval_spec(demo_data, "val_llava.json", "val_captions.json"), "train.eval_samples=6")
    run = train(recipe, quiet=True)
    last = _records(run)[-1]
    assert last["step"] == 2 and last["eval_samples"] == 6

    # The same samples, one at a time through the trained model's own mean loss.
    recipe, cfg, tok, model = load_run(run)
    samples, _ = builder.read_samples(recipe.data.eval, recipe)
    data = ConversationDataset(samples[:6], tok, builder.image_processor_for(recipe), cfg.tokens_per_image, 2048)
    import paddle

    total = tokens = 0.0
    for i in range(len(data)):
        batch = collate([data[i]], tok.pad_token_id)
        labels = paddle.to_tensor(batch["labels"])
        mean = mean_nll(model(**batch_inputs(batch), labels=labels)[0], labels)
        n = int(item_targets(data)[i])
        total, tokens = total + float(mean) * n, tokens + n
    assert last["eval_loss"] == pytest.approx(total / tokens, rel=1e-5)


def test_interval_means_are_the_token_weighted_means_of_the_steps(tiny_recipe, tmp_path):
    every_step = _records(train(tiny_recipe(str(tmp_path / "a"), *COMMON, "train.max_steps=6"), quiet=True))
    recipe = tiny_recipe(str(tmp_path / "b"), *COMMON, "train.max_steps=6", "train.log_every=4")
    intervals = _records(train(recipe, quiet=True))
    assert [r["step"] for r in intervals] == [4, 6]

    # Each step's labelled-token count, from the same data order the loop takes.
    tok = builder.load_tokenizer(recipe)
    cfg = builder.model_config_for(recipe, tok)
    samples, _ = builder.read_samples(recipe.data.train, recipe)
    data = ConversationDataset(samples, tok, builder.image_processor_for(recipe), cfg.tokens_per_image,
                               recipe.data.max_length)
    targets = item_targets(data)
    lengths = np.array([len(item.input_ids) for item in data.items])
    cursor = DataCursor(recipe.train.seed, lengths, recipe.train.batch_size, {"step": 0, "epoch": 0, "cursor": 0})
    weights = np.array([targets[cursor.take()].sum() for _ in range(6)], dtype=float)
    assert len(set(weights)) > 1  # the weighting matters here: the steps hold different token counts

    losses = np.array([r["loss"] for r in every_step])
    assert [r["step_loss"] for r in every_step] == [r["loss"] for r in every_step]  # intervals of one step
    for record, steps in zip(intervals, (slice(0, 4), slice(4, 6))):
        expected = (losses[steps] * weights[steps]).sum() / weights[steps].sum()
        assert record["loss"] == pytest.approx(expected, rel=1e-6)
        assert record["step_loss"] == pytest.approx(losses[steps][-1], rel=1e-6)


def test_validation_does_not_change_the_training_run(tiny_recipe, demo_data, tmp_path, capsys):
    plain = train(tiny_recipe(str(tmp_path / "plain"), *COMMON, "train.max_steps=3"), quiet=True)
    watched = train(tiny_recipe(str(tmp_path / "watched"), *COMMON, "train.max_steps=3", "train.eval_every=1",
                                "train.eval_answers=2", "train.keep_best=true",
                                _eval_spec(demo_data, "val_llava.json")))
    assert "held-out loss" in capsys.readouterr().err  # the progress line shows it
    a, b = load_tensors(os.path.join(plain, "model.safetensors")), load_tensors(os.path.join(watched, "model.safetensors"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert [r["step_loss"] for r in _records(plain)] == [r["step_loss"] for r in _records(watched)]
    held_out = [r["eval_loss"] for r in _records(watched)]
    assert len(held_out) == 3 and all(np.isfinite(held_out))
    best = json.load(open(os.path.join(watched, "checkpoint", "best", "state.json")))
    assert best["eval_loss"] == min(held_out)
    assert not os.path.exists(os.path.join(watched, "checkpoint", "best", "optimizer.safetensors"))


def test_exact_match_counts_greedy_answers_equal_to_the_reference(tiny_recipe, demo_data, tmp_path):
    """The references of two conversations are set to what the trained model answers, a third's
    to something it does not say: a rerun of the same training evaluates to 2 of 3."""
    from paddle_mm.inference.generate import generate_answers

    short = "infer.max_new_tokens=4"  # an untrained model's answers, kept short
    first = train(tiny_recipe(str(tmp_path / "first"), *COMMON, short, "train.max_steps=2"), quiet=True)
    recipe, _, tok, model = load_run(first)
    val = json.load(open(os.path.join(demo_data["data"], "val_llava.json")))[:3]
    spec = f"data.eval=[{{path: {tmp_path}/val.json, format: llava, image_root: {demo_data['data']}}}]"
    with open(tmp_path / "val.json", "w") as f:
        json.dump(val, f)
    held_out = tiny_recipe(str(tmp_path / "x"), spec)
    samples, _ = builder.read_samples(held_out.data.eval, held_out)
    answers = generate_answers(model, tok, samples, builder.image_processor_for(recipe), recipe.infer)
    for record, sample in zip(val, samples):
        answer = answers[sample.id]
        if answer.upper().casefold() == answer.casefold():
            answer = answer.upper()  # case does not count, nor do surrounding spaces
        record["conversations"][-1]["value"] = f"  {answer} "
    val[2]["conversations"][-1]["value"] = "an answer the model does not give"
    with open(tmp_path / "val.json", "w") as f:
        json.dump(val, f)

    second = train(tiny_recipe(str(tmp_path / "second"), *COMMON, short, "train.max_steps=2", spec,
                               "train.eval_answers=3"), quiet=True)
    last = _records(second)[-1]
    assert (last["eval_accuracy"], last["eval_answers"]) == (pytest.approx(2 / 3), 3)


def test_a_resumed_run_writes_the_figures_of_an_uninterrupted_one(tiny_recipe, demo_data, tmp_path):
    # Checkpoints at 3 and 6; evaluation, and so log lines, at 2, 4 and 6: the interval (2, 4]
    # holds step 3 from before the resume and step 4 from after it.
    args = [*COMMON, "train.max_steps=6", "train.save_every=3", "train.log_every=4", "train.eval_every=2",
            "train.keep_best=true", _eval_spec(demo_data, "val_llava.json")]
    out = str(tmp_path / "run")
    train(tiny_recipe(out, *args), quiet=True)
    straight = _records(out)
    best = json.load(open(os.path.join(out, "checkpoint", "best", "state.json")))
    # As if killed after step 6's metrics line, before its checkpoint: the rerun resumes at 3.
    shutil.rmtree(os.path.join(out, "checkpoint", "step-00000006"))
    os.unlink(os.path.join(out, "model.safetensors"))
    train(tiny_recipe(out, *args), quiet=True)
    resumed = _records(out)
    assert [r["step"] for r in resumed] == [2, 4, 6]
    assert _without_timings(resumed) == _without_timings(straight)  # bit for bit, as the weights are
    again = json.load(open(os.path.join(out, "checkpoint", "best", "state.json")))
    assert (again["step"], again["eval_loss"]) == (best["step"], best["eval_loss"])


def test_two_processes_evaluate_their_shares_to_the_figures_of_one(tiny_recipe, demo_data, tmp_path):
    from paddle_mm.training.launch import train_in_processes

    # 6 samples in batches of 4: the processes hold different numbers of samples and tokens.
    args = [*COMMON, "train.max_steps=2", "train.eval_samples=6", "train.eval_answers=3",
            _eval_spec(demo_data, "val_captions.json", "val_llava.json")]
    one = _records(train(tiny_recipe(str(tmp_path / "one"), *args), quiet=True))[-1]
    two = _records(train_in_processes(tiny_recipe(str(tmp_path / "two"), *args), processes=2, quiet=True))[-1]
    assert (two["eval_samples"], two["eval_answers"]) == (one["eval_samples"], one["eval_answers"]) == (6, 3)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
    assert two["eval_accuracy"] == one["eval_accuracy"]


@pytest.mark.parametrize("overrides, message", [
    (["train.eval_every=5"], "train.eval_every is set but data.eval lists no dataset"),
    (["train.keep_best=true"], "train.keep_best is set but data.eval lists no dataset"),
    (["train.eval_answers=2", "EVAL_CAPTIONS"], "data.eval holds no conversations to answer"),
    (["train.eval_answers=2", "EVAL_LLAVA", "train.stage=align"], "align stage's model does not generate"),
])
def test_validation_settings_that_would_do_nothing_are_recipe_errors(tiny_recipe, demo_data, tmp_path,
                                                                     overrides, message):
    specs = {"EVAL_CAPTIONS": _eval_spec(demo_data, "val_captions.json"),
             "EVAL_LLAVA": _eval_spec(demo_data, "val_llava.json")}
    with pytest.raises(RecipeError, match=message):
        train(tiny_recipe(str(tmp_path / "x"), *[specs.get(o, o) for o in overrides]), quiet=True)
