from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal, Optional

import pytest

from paddle_mm.errors import RecipeError
from paddle_mm.recipe import from_dict, load_recipe, recipe_to_dict, save_recipe


@dataclasses.dataclass
class Train:
    lr: float = 1e-4
    lr_warmup_steps: int = 0
    epochs: int = 1
    schedule: Literal["cosine", "linear"] = "cosine"
    clip: Optional[float] = None
    bf16: bool = False


@dataclasses.dataclass
class Model:
    name: str
    layers: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    image_size: tuple[int, ...] = (224, 224)
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclasses.dataclass
class Recipe:
    model: Model
    train: Train = dataclasses.field(default_factory=Train)
    note: str | None = None

    def validate(self):
        if self.train.epochs > 100 and self.train.lr > 0.1:
            raise RecipeError("train.lr too large for a long run")


# Module level, so typing.get_type_hints can resolve the string annotations.
CALLS: list[str] = []


@dataclasses.dataclass
class Inner:
    x: int = 0

    def validate(self):
        CALLS.append("inner")


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    items: list[Inner] = dataclasses.field(default_factory=list)

    def validate(self):
        CALLS.append("outer")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_base_inheritance_two_levels(tmp_path):
    write(tmp_path / "root.yaml", "model:\n  name: root\n  layers: [1, 2, 3]\n"
          "  extra: {a: 1.0, b: 2.0}\ntrain:\n  epochs: 5\n")
    write(tmp_path / "mid.yaml", "base: root.yaml\nmodel:\n  extra: {b: 3.0}\ntrain:\n  lr: 0.01\n")
    (tmp_path / "sub").mkdir()
    top = write(tmp_path / "sub" / "top.yaml",
                "base: ../mid.yaml\nmodel:\n  layers: [9]\n  extra: {c: 4}\n")
    r = load_recipe(top, Recipe)
    assert r.model.name == "root"
    assert r.model.layers == [9]  # list replaced, not appended
    assert r.model.extra == {"a": 1.0, "b": 3.0, "c": 4.0}  # dicts merged level by level
    assert r.train.lr == 0.01 and r.train.epochs == 5
    assert r.model.image_size == (224, 224)


def test_list_of_bases_applied_in_order(tmp_path):
    write(tmp_path / "a.yaml", "model: {name: a}\ntrain: {epochs: 2}\n")
    write(tmp_path / "b.yaml", "model: {name: b}\n")
    r = load_recipe(write(tmp_path / "c.yaml", "base: [a.yaml, b.yaml]\n"), Recipe)
    assert r.model.name == "b" and r.train.epochs == 2


def test_unknown_key_names_key_file_and_suggests(tmp_path):
    f = write(tmp_path / "r.yaml", "model: {name: x}\ntrain:\n  lr_warmup: 10\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f, Recipe)
    msg = str(e.value)
    assert "train.lr_warmup" in msg and str(f) in msg
    assert "did you mean 'train.lr_warmup_steps'" in msg


def test_unknown_key_from_base_names_base_file(tmp_path):
    base = write(tmp_path / "base.yaml", "model: {name: x, depth: 3}\n")
    top = write(tmp_path / "top.yaml", "base: base.yaml\ntrain: {lr: 0.1}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(top, Recipe)
    msg = str(e.value)
    assert "model.depth" in msg and str(base) in msg and str(top) not in msg


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path):
    f = write(tmp_path / "r.yaml", "model: {name: x}\nzzzqqq: 1\n")
    with pytest.raises(RecipeError, match="unknown key 'zzzqqq'") as e:
        load_recipe(f, Recipe)
    assert "did you mean" not in str(e.value)


def test_wrong_type_message(tmp_path):
    f = write(tmp_path / "r.yaml", "model: {name: x}\ntrain: {epochs: five}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f, Recipe)
    msg = str(e.value)
    assert "train.epochs" in msg and str(f) in msg and "int" in msg and "'five'" in msg


def test_no_int_to_bool_and_nested_needs_mapping(tmp_path):
    f = write(tmp_path / "r.yaml", "model: {name: x}\ntrain: {bf16: 1}\n")
    with pytest.raises(RecipeError, match=r"train\.bf16' expects bool, got 1"):
        load_recipe(f, Recipe)
    f = write(tmp_path / "s.yaml", "model: [x]\n")
    with pytest.raises(RecipeError, match=r"'model' expects a mapping \(Model\)"):
        load_recipe(f, Recipe)


def test_list_item_type_error_names_index(tmp_path):
    f = write(tmp_path / "r.yaml", "model: {name: x, layers: [1, two]}\n")
    with pytest.raises(RecipeError, match=r"model\.layers\[1\]' expects int, got 'two'"):
        load_recipe(f, Recipe)


def test_fixed_length_tuple(tmp_path):
    f = write(tmp_path / "r.yaml", "model: {name: x, mean: [0.1, 1, 2e-1]}\n")
    assert load_recipe(f, Recipe).model.mean == (0.1, 1.0, 0.2)
    with pytest.raises(RecipeError, match=r"'model\.mean' expects tuple\[float, float, float\] "
                                          r"\(3 items\), got \[1, 2\]"):
        load_recipe(f, Recipe, ["model.mean=[1, 2]"])


def test_literal(tmp_path):
    ok = write(tmp_path / "ok.yaml", "model: {name: x}\ntrain: {schedule: linear}\n")
    assert load_recipe(ok, Recipe).train.schedule == "linear"
    bad = write(tmp_path / "bad.yaml", "model: {name: x}\ntrain: {schedule: step}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad, Recipe)
    msg = str(e.value)
    assert "train.schedule" in msg and "'cosine', 'linear'" in msg and "'step'" in msg


def test_optional(tmp_path):
    f = write(tmp_path / "r.yaml", "model: {name: x}\ntrain: {clip: null}\nnote: hi\n")
    r = load_recipe(f, Recipe)
    assert r.train.clip is None and r.note == "hi"
    assert load_recipe(f, Recipe, ["train.clip=1"]).train.clip == 1.0
    with pytest.raises(RecipeError, match=r"train\.clip' expects float, got 'big'"):
        load_recipe(f, Recipe, ["train.clip=big"])


def test_int_accepted_for_float(tmp_path):
    f = write(tmp_path / "r.yaml", "model: {name: x}\ntrain: {lr: 1}\n")
    lr = load_recipe(f, Recipe).train.lr
    assert lr == 1.0 and isinstance(lr, float)


def test_exponent_float_in_file_and_override(tmp_path):
    f = write(tmp_path / "r.yaml", "model: {name: x}\ntrain: {lr: 1e-3}\n")
    assert load_recipe(f, Recipe).train.lr == pytest.approx(1e-3)
    r = load_recipe(f, Recipe, ["train.lr=2E-5"])
    assert r.train.lr == pytest.approx(2e-5) and isinstance(r.train.lr, float)
    with pytest.raises(RecipeError, match=r"train\.epochs' expects int, got '1e3'"):
        load_recipe(f, Recipe, ["train.epochs=1e3"])


def test_override_nested_and_typed_values(tmp_path):
    f = write(tmp_path / "r.yaml", "model: {name: x}\n")
    r = load_recipe(f, Recipe, ["train.epochs=3", "train.bf16=true", "model.layers=[4, 5]",
                                "model.extra.scale=0.5", "note=null"])
    assert r.train.epochs == 3 and r.train.bf16 is True
    assert r.model.layers == [4, 5] and r.model.extra == {"scale": 0.5} and r.note is None


def test_malformed_and_unknown_override(tmp_path):
    f = write(tmp_path / "r.yaml", "model: {name: x}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f, Recipe, ["train.epochs"])
    assert "command line" in str(e.value) and "'train.epochs'" in str(e.value)
    with pytest.raises(RecipeError) as e:
        load_recipe(f, Recipe, ["train.epoch=3"])
    msg = str(e.value)
    assert "command line" in msg and "train.epoch=3" in msg and "train.epochs" in msg
    with pytest.raises(RecipeError, match="command line override 'train.epochs=x'"):
        load_recipe(f, Recipe, ["train.epochs=x"])


def test_cycle(tmp_path):
    a = write(tmp_path / "a.yaml", "base: b.yaml\nmodel: {name: x}\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(a, Recipe)
    msg = str(e.value)
    assert "cycle" in msg and "a.yaml" in msg and "b.yaml" in msg


def test_missing_required_field(tmp_path):
    f = write(tmp_path / "r.yaml", "train: {lr: 0.1}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f, Recipe)
    assert "missing required field 'model'" in str(e.value) and str(f) in str(e.value)
    f = write(tmp_path / "s.yaml", "model: {layers: [1]}\n")
    with pytest.raises(RecipeError, match=r"missing required field 'model\.name'") as e:
        load_recipe(f, Recipe)
    assert str(f) in str(e.value)


def test_validate_hook(tmp_path):
    CALLS.clear()
    from_dict(Outer, {"inner": {"x": 1}, "items": [{"x": 2}]})
    assert CALLS == ["inner", "inner", "outer"]  # bottom-up

    f = write(tmp_path / "r.yaml", "model: {name: x}\ntrain: {epochs: 200, lr: 0.5}\n")
    with pytest.raises(RecipeError, match="train.lr too large for a long run"):
        load_recipe(f, Recipe)


def test_save_load_round_trip(tmp_path):
    f = write(tmp_path / "r.yaml", "model: {name: x, image_size: [32, 64], extra: {a: 1}}\n"
              "train: {lr: 1e-3, schedule: linear, clip: 0.5}\n")
    r = load_recipe(f, Recipe, ["train.epochs=7"])
    out = tmp_path / "run" / "recipe.yaml"
    save_recipe(r, out)
    assert os.listdir(out.parent) == ["recipe.yaml"]  # no temp file left behind
    back = load_recipe(out, Recipe)
    assert back == r and back.model.image_size == (32, 64)
    plain = recipe_to_dict(r)
    assert plain["model"]["image_size"] == [32, 64] and plain["train"]["epochs"] == 7
    assert from_dict(Recipe, plain) == r


def test_from_dict_names_source():
    with pytest.raises(RecipeError, match=r"^run7/config: unknown key 'model\.nam'"):
        from_dict(Recipe, {"model": {"nam": "x"}}, source="run7/config")


def test_missing_file_and_yaml_syntax_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(RecipeError, match="nope.yaml") as e:
        load_recipe(missing, Recipe)
    assert "cannot read" in str(e.value)
    write(tmp_path / "top.yaml", "base: gone.yaml\n")
    with pytest.raises(RecipeError, match="gone.yaml"):
        load_recipe(tmp_path / "top.yaml", Recipe)
    bad = write(tmp_path / "bad.yaml", "model:\n  name: x\n  layers: [1, 2\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad, Recipe)
    assert str(bad) in str(e.value) and "line" in str(e.value) and "invalid YAML" in str(e.value)
