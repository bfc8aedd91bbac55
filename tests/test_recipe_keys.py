"""No dead recipe keys: every field of the recipe's dataclasses is read by some code path.

The rule (an AST scan, no imports of the code scanned): a field `name` of a dataclass in
paddle_mm/config.py (or of ImageProcessorConfig, the recipe's `data.image`) is *read* when
some module of paddle_mm other than config.py and recipe.py holds an attribute load `x.name`
that is not itself called (`x.name(...)`). So:
- `model.eval()` is a method call, not a read of `data.eval`: a scan by name alone would have
  let the unread `data.eval` pass, as it did before validation read it;
- config.py's own `validate()` and properties do not count: a field only validated is read to
  be ignored; recipe.py loads every key generically and does not count either;
- `replace(cfg, name=...)` and `Config(name=...)` write a field, they do not read it.
What the rule cannot tell is a read through another object that happens to share a field's
name (`spec.path` and `vision.path` look alike); the unique names are the ones it guards best.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "paddle_mm"
NOT_READERS = {"config.py", "recipe.py"}


def recipe_fields() -> dict[str, set[str]]:
    """{dataclass name: its field names} for every section a recipe can set."""
    from paddle_mm import config
    from paddle_mm.data.image import ImageProcessorConfig

    sections = [c for c in vars(config).values()
                if dataclasses.is_dataclass(c) and c.__module__ == config.__name__]
    return {c.__name__: {f.name for f in dataclasses.fields(c)} for c in [*sections, ImageProcessorConfig]}


def attributes_read(sources: dict[str, str]) -> set[str]:
    """Attribute names loaded and not called anywhere in `sources` ({file name: code})."""
    read = set()
    for name, code in sources.items():
        if name in NOT_READERS:
            continue
        tree = ast.parse(code)  # kept alive while its node ids are compared
        called = {id(node.func) for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and id(node) not in called:
                read.add(node.attr)
    return read


def unread_fields(sources: dict[str, str], fields: dict[str, set[str]]) -> dict[str, set[str]]:
    read = attributes_read(sources)
    return {cls: names - read for cls, names in fields.items() if names - read}


def package_sources() -> dict[str, str]:
    return {p.relative_to(PACKAGE).as_posix(): p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py")}


def test_every_recipe_field_is_read_by_some_code_path():
    assert unread_fields(package_sources(), recipe_fields()) == {}


def test_the_scan_would_have_caught_the_unread_data_eval():
    """Before validation, `.eval` appeared only in calls (`model.eval()`): drop the modules that
    read `data.eval` today and the scan reports it, among the package's real model.eval() calls."""
    sources = package_sources()
    readers = {name for name, code in sources.items() if "eval" in attributes_read({name: code})}
    assert readers, "nothing reads data.eval"
    without = {name: code for name, code in sources.items() if name not in readers}
    assert any("model.eval()" in code for code in without.values())
    assert unread_fields(without, recipe_fields())["DataConfig"] == {"eval"}


def test_calls_writes_and_config_py_itself_are_not_reads():
    fields = {"TrainConfig": {"eval_every", "seed"}, "DataConfig": {"eval"}}
    sources = {
        "loop.py": "model.eval()\nrecipe = replace(recipe, eval_every=3)\nprint(cfg.seed)\n",
        "config.py": "if self.eval_every < 0: raise RecipeError('x')\n",
    }
    assert unread_fields(sources, fields) == {"TrainConfig": {"eval_every"}, "DataConfig": {"eval"}}
