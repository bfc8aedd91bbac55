"""Strict loading of YAML recipe files into a tree of dataclasses.

A recipe is a YAML mapping, optionally naming ``base:`` files it inherits from, checked
key by key against a dataclass schema. Every mistake (unknown key, wrong type, missing
field) is a RecipeError naming the dotted key and the file (or command line override)
that supplied it, so a bad recipe fails before any model is built. Recipes come from strangers
too (a run folder's recipe.yaml, a shared repository), so reading one is bounded: file size,
alias expansion and nesting, and where ``base:`` may point (see load_recipe).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

from paddle_mm.errors import RecipeError
from paddle_mm.fileio import write_text_atomic

__all__ = ["load_recipe", "from_dict", "recipe_to_dict", "save_recipe", "bundled_recipes"]

# YAML 1.1 (what PyYAML speaks) reads "1e-3" as a string because it wants a dot; a float
# field accepts any string of this shape so recipes can use the usual notation.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_KEY = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_0-9][\w-]*)*")

# A key path is a tuple of mapping keys and list indices (tuples, not dotted strings, so a
# dict key holding a dot stays unambiguous); "sources" maps each path to the file that set it.


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _source_of(sources: dict, path: tuple, default: str) -> str:
    # The nearest enclosing key that has a recorded source supplied this value.
    for n in range(len(path), -1, -1):
        if path[:n] in sources:
            return sources[path[:n]]
    return default


def _record(data: Any, origin: str, sources: dict, prefix: tuple = ()) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            sources[prefix + (key,)] = origin
            _record(value, origin, sources, prefix + (key,))


def _merge(base: dict, over: dict) -> dict:
    """Deep-merge ``over`` into a copy of ``base``: dicts merge, everything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# Bounds on what one YAML text may expand to. PyYAML builds an alias as a shared reference, so
# a few lines of nested aliases (a "billion laughs") are a tiny object that every walk over the
# recipe expands exponentially, and an anchor inside itself is a cycle no walk ends. A real
# recipe is a few hundred values, three or four levels deep.
MAX_RECIPE_BYTES = 2**20
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 50


def _expanded_size(node, on_path: set, sizes: dict, depth: int = 0) -> int:
    """How many values `node` stands for with every alias written out; RecipeError on a cycle."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in on_path:
        raise RecipeError(f"line {node.start_mark.line + 1}: an anchor is used inside itself (a recursive alias)")
    if depth > MAX_YAML_DEPTH:
        raise RecipeError(f"line {node.start_mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep")
    children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else \
        node.value if isinstance(node, yaml.SequenceNode) else []
    on_path.add(key)
    size = 1 + sum(_expanded_size(c, on_path, sizes, depth + 1) for c in children)
    on_path.discard(key)
    if size > MAX_YAML_VALUES:
        raise RecipeError(f"line {node.start_mark.line + 1}: expands to more than {MAX_YAML_VALUES} values "
                          "(aliases nested inside aliases)")
    sizes[key] = size
    return size


def _safe_yaml(text: str, where: str):
    """yaml.safe_load, with the expansion bounds above checked on the node graph before any
    Python object is built; every failure is a RecipeError naming `where` (and the line)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, set(), {})
        return loader.construct_document(node)
    except RecipeError as exc:
        raise RecipeError(f"{where}, {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}, line {mark.line + 1}" if mark is not None else where
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{at}: invalid YAML: {problem}") from None
    except RecursionError:  # PyYAML composes recursively: thousands of '[' before any bound is seen
        raise RecipeError(f"{where}: invalid YAML: nested more than {MAX_YAML_DEPTH} levels deep") from None
    finally:
        loader.dispose()


def _read_text(path: Path) -> str:
    """A recipe file's text: a regular file of at most MAX_RECIPE_BYTES (not /dev/zero or a FIFO)."""
    try:
        if not path.is_file():
            raise RecipeError(f"{path}: cannot read recipe ({'not a regular file' if path.exists() else 'no such file'})")
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: cannot read recipe (more than {MAX_RECIPE_BYTES} bytes)")
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: cannot read recipe (not UTF-8 text: {exc.reason} at byte {exc.start})") from None


def _base_path(path: Path, name: str, root: Path) -> Path:
    """Where a `base:` entry of `path` points: relative to path's folder, and inside `root` (see
    load_recipe), so a recipe from elsewhere (a run folder, a shared repository) cannot make
    paddle_mm read files around it."""
    if Path(name).is_absolute():
        raise RecipeError(f"{path}: base {name!r} is an absolute path; name bases relative to the recipe's folder")
    if not name.endswith((".yaml", ".yml")):
        raise RecipeError(f"{path}: base {name!r} is not a .yaml or .yml file")
    target = path.parent / name
    if not target.resolve().is_relative_to(root):
        raise RecipeError(f"{path}: base {name!r} is outside {root}, the folder a recipe's bases must stay in")
    return target


def _read(path: Path, chain: tuple[Path, ...], root: Path) -> tuple[dict, dict]:
    """Read one file and its bases, returning the merged data and the source of each key."""
    resolved = path.resolve()
    if resolved in chain:
        names = " -> ".join(str(p) for p in chain + (resolved,))
        raise RecipeError(f"recipe base cycle: {names}")
    data = _safe_yaml(_read_text(path), str(path))
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None)
    bases = [] if bases is None else [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(f"{path}: 'base' must be a file name or a list of file names")
    merged: dict = {}
    sources: dict = {}
    for name in bases:
        base_data, base_sources = _read(_base_path(path, name, root), chain + (resolved,), root)
        merged = _merge(merged, base_data)
        sources.update(base_sources)
    # Stale entries for keys a later file replaced are harmless: only keys present are looked up.
    _record(data, str(path), sources)
    return _merge(merged, data), sources


def _apply_override(data: dict, sources: dict, override: str) -> None:
    origin = f"command line override '{override}'"
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not _KEY.fullmatch(key):
        raise RecipeError(f"{origin}: expected 'section.key=value'")
    value = _safe_yaml(text, origin)
    parts = tuple(key.split("."))
    node = data
    for n, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            node[part] = {}  # a new (or non-mapping) section: the schema check judges it
            sources[parts[: n + 1]] = origin
        node = node[part]
    node[parts[-1]] = value
    sources[parts] = origin
    _record(value, origin, sources, parts)


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


class _Converter:
    def __init__(self, sources: dict, default: str):
        self.sources = sources
        self.default = default

    def fail(self, path: tuple, message: str) -> RecipeError:
        return RecipeError(f"{_source_of(self.sources, path, self.default)}: {message}")

    def wrong(self, path: tuple, tp: Any, value: Any) -> RecipeError:
        return self.fail(path, f"'{_dotted(path)}' expects {_type_name(tp)}, "
                               f"got {value!r} ({type(value).__name__})")

    def convert(self, tp: Any, value: Any, path: tuple) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            return self.dataclass(tp, value, path)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            options = [a for a in args if a is not type(None)]
            if len(options) == 1:  # Optional[X]: X's own error is the most helpful one
                return self.convert(options[0], value, path)
            for option in options:
                try:
                    return self.convert(option, value, path)
                except RecipeError:
                    pass
            raise self.wrong(path, tp, value)
        if origin is Literal:
            # Compare type too, so True does not pass for Literal[1] (True == 1 in Python).
            if any(type(value) is type(a) and value == a for a in args):
                return value
            allowed = ", ".join(repr(a) for a in args)
            raise self.fail(path, f"'{_dotted(path)}' must be one of {allowed}, got {value!r}")
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                raise self.wrong(path, tp, value)
            if origin is list or args[1:] == (Ellipsis,):
                item_types = [args[0]] * len(value)
            elif len(value) == len(args):  # fixed-length tuple[X, Y, Z]
                item_types = list(args)
            else:
                raise self.fail(path, f"'{_dotted(path)}' expects {_type_name(tp)} "
                                      f"({len(args)} items), got {value!r}")
            pairs = enumerate(zip(item_types, value))
            items = [self.convert(t, v, path + (i,)) for i, (t, v) in pairs]
            return items if origin is list else tuple(items)
        if origin is dict:
            if not isinstance(value, dict):
                raise self.wrong(path, tp, value)
            key_tp, val_tp = args or (Any, Any)
            return {self.convert(key_tp, k, path + (k,)): self.convert(val_tp, v, path + (k,))
                    for k, v in value.items()}
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
                return float(value)
            raise self.wrong(path, tp, value)
        if tp in (int, bool, str):  # no coercion: 1 for a bool or 3 for a str is a mistake
            if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
                return value
            raise self.wrong(path, tp, value)
        raise self.fail(path, f"'{_dotted(path)}' has unsupported type {_type_name(tp)}")

    def dataclass(self, cls: type, value: Any, path: tuple) -> Any:
        if not isinstance(value, dict):
            raise self.fail(path, f"'{_dotted(path)}' expects a mapping ({cls.__name__}), "
                                  f"got {value!r} ({type(value).__name__})")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        for key in value:
            if key not in fields:
                hint = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
                dotted = _dotted(path + (key,))
                near = f" (did you mean '{_dotted(path + (hint[0],))}'?)" if hint else ""
                raise self.fail(path + (key,), f"unknown key '{dotted}'{near}")
        kwargs = {}
        for name, field in fields.items():
            if name in value:
                kwargs[name] = self.convert(hints[name], value[name], path + (name,))
            elif (field.default is dataclasses.MISSING
                  and field.default_factory is dataclasses.MISSING):
                raise self.fail(path, f"missing required field '{_dotted(path + (name,))}'")
        return cls(**kwargs)


def _validate(obj: Any) -> None:
    """Call ``validate()`` on every dataclass in the tree, children before parents."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            _validate(getattr(obj, field.name))
        if callable(getattr(obj, "validate", None)):
            obj.validate()
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _validate(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            _validate(item)


def _build(schema: type, data: Any, sources: dict, default: str) -> Any:
    obj = _Converter(sources, default).convert(schema, data, ())
    _validate(obj)
    return obj


def load_recipe(path: str | Path, schema: type, overrides: Sequence[str] = ()) -> Any:
    """Load ``path`` (with its bases and ``overrides``) into an instance of ``schema``."""
    path = Path(path)
    # A base may sit beside the recipe or in a sibling folder (recipes/clip_demo/clip.yaml names
    # ../demo/base.yaml), so bases stay inside the recipe's folder's parent, and no further.
    data, sources = _read(path, (), path.resolve().parent.parent)
    if isinstance(overrides, str):  # a lone string would otherwise be split into characters
        overrides = [overrides]
    for override in overrides:
        _apply_override(data, sources, override)
    return _build(schema, data, sources, str(path))


def from_dict(schema: type, data: dict, source: str = "<dict>") -> Any:
    """The strict conversion of ``load_recipe`` for a mapping already in memory."""
    return _build(schema, data, {}, source)


def recipe_to_dict(obj: Any) -> Any:
    """Plain dicts, lists and scalars for a recipe object (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: recipe_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [recipe_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: recipe_to_dict(v) for k, v in obj.items()}
    return obj


def save_recipe(obj: Any, path: str | Path) -> None:
    """Write the resolved recipe as YAML; a reader never sees a half-written file."""
    text = yaml.safe_dump(recipe_to_dict(obj), sort_keys=False, allow_unicode=True)
    write_text_atomic(path, text)


def bundled_recipes() -> Path:
    """The recipes/ folder shipped with paddle_mm: the copy a (non-editable) install holds inside
    the package, else the checkout's top-level recipes/ (source trees and editable installs)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "recipes", here.parent / "recipes"):
        if (folder / "demo").is_dir():
            return folder
    raise RecipeError(f"no bundled recipes found (looked in {here / 'recipes'} and {here.parent / 'recipes'}); "
                      "reinstall paddle_mm")
