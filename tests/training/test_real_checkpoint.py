"""Training on a folder as downloaded: the checkpoint's chat template and image settings are the
run's (and stay with it), unless the recipe names another template."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from reference_fixtures import REFERENCE

from paddle_mm.config import Recipe
from paddle_mm.data.tokenizer import IGNORE_INDEX
from paddle_mm.recipe import from_dict
from paddle_mm.run_folder import load_run
from paddle_mm.training.loop import train

FOLDER = os.path.join(REFERENCE, "pipeline", "llava_qwen2", "hf5")  # ChatML parts template, shortest edge 40
IMAGES = os.path.join(REFERENCE, "pipeline", "images")


def _recipe(tmp_path, **train):
    records = [{"id": str(k), "image": name, "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the circle?"}, {"from": "gpt", "value": "the circle is red"}]}
        for k, name in enumerate(("wide.png", "tall.png", "square.png", "wide.png"))]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    return from_dict(Recipe, {
        "model": {"path": FOLDER},
        "data": {"train": [{"path": str(data), "format": "llava", "image_root": IMAGES}]},
        "train": {"stage": "instruct", "output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2,
                  "trainable": ["multi_modal_projector", "language_model"], "lr": 1e-3, "warmup_steps": 0,
                  "log_every": 1, **train},
    }, source="test recipe")


def test_a_run_from_a_downloaded_folder_trains_in_its_template_and_keeps_it(tmp_path):
    run = train(_recipe(tmp_path), quiet=True)
    assert os.path.isfile(os.path.join(run, "chat_template.jinja"))
    with open(os.path.join(FOLDER, "chat_template.jinja"), encoding="utf-8") as f:
        assert open(os.path.join(run, "chat_template.jinja"), encoding="utf-8").read() == f.read()
    recipe, _, tokenizer, model = load_run(run)
    # the folder's image settings are written out: the run loads without the source folder's files
    assert not recipe.data.image_from_checkpoint
    assert (recipe.data.image.size, recipe.data.image.shortest_edge) == (32, 40)
    ids, labels = tokenizer.encode_chat([("user", "<image>\nwhat colour is the circle?"),
                                         ("assistant", "the circle is red")], model.tokens_per_image)
    text = tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX], skip_special_tokens=False)
    assert text == "the circle is red<|im_end|>"
    assert tokenizer.decode(ids[:8], skip_special_tokens=False).startswith("<|im_start|>system\n")
    losses = [json.loads(line)["loss"] for line in open(os.path.join(run, "metrics.jsonl"))]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_the_recipe_can_train_a_downloaded_folder_in_chatml(tmp_path):
    recipe = _recipe(tmp_path)
    recipe.data.chat_template = "chatml"
    run = train(recipe, quiet=True)
    assert not os.path.exists(os.path.join(run, "chat_template.jinja"))
    _, _, tokenizer, _ = load_run(run)
    assert tokenizer.template is None and tokenizer.stop_ids == [tokenizer.im_end_id]


def test_init_from_a_downloaded_folder_loads_its_weights_tokenizer_and_image_settings(tmp_path):
    from paddle_mm.builder import image_config_for, load_tokenizer, model_config_for
    from paddle_mm.weights.hf import read_tensors

    recipe = _recipe(tmp_path)
    shape = model_config_for(recipe, load_tokenizer(recipe))  # the architecture, from model.path
    recipe.model = shape
    recipe.model.path = ""
    recipe.train.init_from = FOLDER
    assert image_config_for(recipe).shortest_edge == 40
    assert load_tokenizer(recipe).template is not None
    recipe.train.max_steps = 1
    recipe.train.trainable = ["multi_modal_projector"]  # the vision tower stays the folder's
    run = train(recipe, quiet=True)
    _, _, _, model = load_run(run)
    source = read_tensors(FOLDER)  # transformers 5.x names
    np.testing.assert_array_equal(model.vision_tower.pre_norm.weight.numpy(), source["vision_tower.pre_layrnorm.weight"])
    np.testing.assert_array_equal(model.language_model.model.norm.weight.numpy(),
                                  source["language_model.model.norm.weight"])


def test_an_unknown_template_word_is_a_missing_file(tmp_path):
    from paddle_mm.errors import CheckpointError

    recipe = _recipe(tmp_path)
    recipe.data.chat_template = "llama3"
    with pytest.raises(CheckpointError, match="llama3: no such template file"):
        train(recipe, quiet=True)
