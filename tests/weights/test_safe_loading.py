"""Safe loading: YAML never builds Python objects, weights are never unpickled, image paths
stay under the dataset's root unless the recipe allows otherwise."""
from __future__ import annotations

import json
import os
import pickle
import re

import numpy as np
import pytest
from tiny import REPO

from paddle_mm.builder import read_samples
from paddle_mm.config import Recipe
from paddle_mm.errors import CheckpointError, DataError, RecipeError
from paddle_mm.recipe import load_recipe
from paddle_mm.weights.tensor_files import load_tensors


def test_recipe_yaml_cannot_construct_python_objects(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"train:\n  output_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RecipeError, match="bad.yaml"):
        load_recipe(bad, Recipe)
    with pytest.raises(RecipeError, match="override"):
        load_recipe(os.path.join(REPO, "recipes", "demo", "instruct.yaml"), Recipe,
                    [f"train.output_dir=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


def test_a_pickled_weights_file_is_refused_without_unpickling(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"  # the name does not matter: the content is looked at
    with open(path, "wb") as f:
        pickle.dump({"w": np.zeros(3)}, f)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(CheckpointError, match="pickle-based file.*never unpickles"):
        load_tensors(str(path))


def test_image_paths_stay_under_the_root_unless_the_recipe_allows(tmp_path, demo_data):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    records = [{"id": "ok", "image": os.path.join(demo_data["data"], "images", "train", "00000.png"),
                "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
               {"id": "up", "image": "../outside.png",
                "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]
    (data / "train.json").write_text(json.dumps(records))
    spec = f"data.train=[{{path: {data}/train.json, format: llava}}]"
    recipe = load_recipe(os.path.join(REPO, "recipes", "demo", "instruct.yaml"), Recipe, [spec])
    with pytest.raises(DataError, match=r"train.json, record 0: absolute image path .*allow_outside_root"):
        read_samples(recipe.data.train, recipe)
    recipe = load_recipe(os.path.join(REPO, "recipes", "demo", "instruct.yaml"), Recipe,
                         [spec, "data.on_error=skip"])
    samples, skipped = read_samples(recipe.data.train, recipe)
    assert samples == [] and [e.record for e in skipped] == [0, 1]
    assert "../outside.png" in str(skipped[1]) and skipped[1].reason == "image_outside_root"
    recipe = load_recipe(os.path.join(REPO, "recipes", "demo", "instruct.yaml"), Recipe,
                         [spec, "data.allow_outside_root=true"])
    samples, _ = read_samples(recipe.data.train, recipe)
    assert [s.images[0] for s in samples] == [records[0]["image"], str(tmp_path / "outside.png")]


# The one reader of a pickle (PaddleMIX's model_state.pdparams), reached only when the user names
# that format (tests/weights/test_paddlemix.py checks the default path refuses it).
NAMED_PICKLE_READER = os.path.join("paddle_mm", "weights", "paddlemix_files.py")


def test_the_package_has_no_unsafe_loader_call():
    """yaml.load without SafeLoader, pickle, paddle.load, torch.load: none in paddle_mm but the named reader."""
    unsafe = re.compile(r"yaml\.(load|unsafe_load|full_load)\(|import (c?pickle|dill|joblib)\b|"
                        r"from (c?pickle|dill|joblib) import|paddle\.load\(|torch\.load\(")
    found = []
    for folder, _, files in os.walk(os.path.join(REPO, "paddle_mm")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                for n, line in enumerate(open(path, encoding="utf-8"), 1):
                    code = line.split("#")[0]
                    if unsafe.search(code) and not (path.endswith(NAMED_PICKLE_READER) and "paddle.load(" in code):
                        found.append(f"{path}:{n}: {line.strip()}")
    assert not found, found
