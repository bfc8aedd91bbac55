"""Crafted recipes: recursive anchors, alias bombs, deep nesting, bases reaching out of the recipe's
tree or at a device. Each is a RecipeError naming the file, quickly."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from paddle_mm.errors import RecipeError
from paddle_mm.recipe import load_recipe


@dataclass
class Small:
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _bomb(levels: int) -> str:
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "name: b\nextra:\n" + "\n".join("  " + line for line in lines) + "\n"


@pytest.mark.parametrize("case, text, message", [
    ("recursive anchor", "name: r\nextra: &a {self: *a}\n", "an anchor is used inside itself"),
    ("recursive list anchor", "name: r\nextra: {x: &a [1, *a]}\n", "an anchor is used inside itself"),
    ("alias bomb", _bomb(9), "expands to more than 100000 values"),
    ("deep nesting", "name: d\nextra: {x: " + "[" * 5000 + "]" * 5000 + "}\n", "nested more than 50 levels"),
    ("nesting just past the bound", "name: d\nextra: {x: " + "[" * 60 + "]" * 60 + "}\n", "nested more than 50"),
    ("not UTF-8", b"name: \xff\xfe\n", "not UTF-8"),
])
def test_crafted_yaml_is_a_recipe_error_naming_the_file(tmp_path, case, text, message):
    path = tmp_path / "r.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path, Small)
    assert str(path) in str(info.value) and time.perf_counter() - t0 < 5


def test_anchors_within_bounds_still_work(tmp_path):
    path = _write(tmp_path / "r.yaml", "name: a\nextra:\n  base: &b {lr: 0.1, steps: 3}\n  copy: *b\n  small: " +
                  _bomb(3).split("extra:\n")[1].replace("\n  ", "\n    ").replace("l0:", "\n    l0:", 1))
    r = load_recipe(path, Small)
    assert r.extra["copy"] == {"lr": 0.1, "steps": 3} and len(r.extra["small"]["l2"]) == 10


def test_an_alias_bomb_in_an_override_is_refused(tmp_path):
    path = _write(tmp_path / "r.yaml", "name: a\n")
    bomb = "{" + ", ".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10) if i else 'x, x, x, x, x, x, x, x, x, x'}]"
                           for i in range(9)) + "}"
    with pytest.raises(RecipeError, match="command line override .*expands to more than"):
        load_recipe(path, Small, [f"extra={bomb}"])


@pytest.mark.parametrize("base, message", [
    ("/etc/hostname", "is an absolute path"),
    ("../../outside.yaml", "is outside"),
    ("../../../../../../../../etc/x.yaml", "is outside"),
    ("secrets.txt", "is not a .yaml or .yml file"),
])
def test_bases_stay_inside_the_recipe_tree(tmp_path, base, message):
    _write(tmp_path / "outside.yaml", "name: leaked\n")
    top = _write(tmp_path / "tree" / "run" / "recipe.yaml", f"base: {base}\n")
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(top, Small)
    assert str(top) in str(info.value)


def test_a_sibling_folders_base_is_allowed(tmp_path):
    _write(tmp_path / "recipes" / "demo" / "base.yaml", "name: shared\n")
    top = _write(tmp_path / "recipes" / "other" / "r.yaml", "base: ../demo/base.yaml\n")
    assert load_recipe(top, Small).name == "shared"


def test_a_symlinked_base_pointing_out_is_refused(tmp_path):
    _write(tmp_path / "outside.yaml", "name: leaked\n")
    (tmp_path / "tree" / "run").mkdir(parents=True)
    (tmp_path / "tree" / "run" / "link.yaml").symlink_to(tmp_path / "outside.yaml")
    top = _write(tmp_path / "tree" / "run" / "recipe.yaml", "base: link.yaml\n")
    with pytest.raises(RecipeError, match="is outside"):
        load_recipe(top, Small)


def test_a_base_that_is_a_device_or_too_big_is_refused(tmp_path):
    (tmp_path / "dev").mkdir()
    os.mkfifo(tmp_path / "dev" / "pipe.yaml")  # reading it would block forever
    top = _write(tmp_path / "dev" / "r.yaml", "base: pipe.yaml\n")
    with pytest.raises(RecipeError, match="not a regular file"):
        load_recipe(top, Small)
    (tmp_path / "dev" / "zero.yaml").symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(RecipeError, match="not a regular file"):
        load_recipe(tmp_path / "dev" / "zero.yaml", Small)
    _write(tmp_path / "dev" / "big.yaml", "name: x\n" + "#" * 2**20 + "\n")
    with pytest.raises(RecipeError, match="more than 1048576 bytes"):
        load_recipe(_write(tmp_path / "dev" / "r2.yaml", "base: big.yaml\n"), Small)
