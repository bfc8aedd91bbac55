"""The package's layout holds: no import cycle, dependencies one way, the run folder's names in one place.

Every import counts, those inside functions too (they are how a cycle hides), and importing
`paddle_mm.a.b` also imports the package `paddle_mm.a`. See docs/ARCHITECTURE.md.
"""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "paddle_mm"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str:
    """The module an import of `name` loads (an imported attribute resolves to its module)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name == "paddle_mm" or name.startswith("paddle_mm."):
                target = _resolve(name)
                while target:  # the packages above it are imported too
                    found.add(target)
                    target = target.rpartition(".")[0]
    found.discard(module)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _cycle() -> list[str]:
    """One import cycle among the package's modules, or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for dep in sorted(GRAPH[m]):
            if dep == "paddle_mm" or m.startswith(dep + "."):
                continue  # a module's own parent packages run before it: not a cycle it makes
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return []

    for m in sorted(GRAPH):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    monkeypatch.setitem(GRAPH, "paddle_mm.config", GRAPH["paddle_mm.config"] | {"paddle_mm.recipe"})
    monkeypatch.setitem(GRAPH, "paddle_mm.recipe", GRAPH["paddle_mm.recipe"] | {"paddle_mm.config"})
    assert set(_cycle()) >= {"paddle_mm.config", "paddle_mm.recipe"}


def test_no_import_cycle():
    assert _cycle() == []


def _outside(module: str, allowed: tuple[str, ...]) -> list[str]:
    """What `module` imports from paddle_mm beyond its own folder and the allowed modules."""
    own = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    return sorted(d for d in GRAPH[module]
                  if d != "paddle_mm" and not d.startswith(own) and not own.startswith(d)
                  and not any(d == a or d.startswith(a + ".") for a in allowed))


BASE = ("paddle_mm.config", "paddle_mm.errors", "paddle_mm.fileio")


def test_runtime_imports_nothing_of_ours():
    """runtime (CPU settings and the CPU paths of a few ops) sits under everything that computes."""
    assert _outside("paddle_mm.runtime", ()) == []


@pytest.mark.parametrize("folder", ["vision", "projectors", "lm"])
def test_the_parts_know_nothing_of_each_other(folder):
    """An encoder, a projector and the LM adapter see the config, the errors and runtime's CPU
    paths, and not each other."""
    for m in (m for m in MODULES if m.startswith(f"paddle_mm.{folder}")):
        assert _outside(m, BASE + ("paddle_mm.runtime",)) == [], m


def test_metrics_are_pure():
    for m in (m for m in MODULES if m.startswith("paddle_mm.eval.metrics")):
        assert _outside(m, ()) == [], m


def test_data_reads_and_prepares_only():
    for m in (m for m in MODULES if m.startswith("paddle_mm.data")):
        assert _outside(m, BASE) == [], m


def test_the_library_does_not_reach_into_the_applications():
    # api/ is the public surface over the library: only the package's lazy re-export and the apps use it
    apps = ("paddle_mm.cli", "paddle_mm.serving", "paddle_mm.demo", "paddle_mm.api")
    for m in MODULES:
        if not m.startswith(apps) and m != "paddle_mm":
            assert not [d for d in GRAPH[m] if d.startswith(apps)], m


def test_at_most_ten_modules_at_the_top():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 10, sorted(top)


def test_run_folder_names_are_defined_once():
    """The run folder's own file names are written as literals (alone, or ending a path in an
    f-string) in run_folder.py and nowhere else."""
    names = ("recipe.yaml", "projector.safetensors", "metrics.jsonl", "skipped.json", "nonfinite.jsonl",
             "optimizer.safetensors", "state.json", "batch.json", "tokenizer.json", "special_tokens.json",
             "vocab.txt")
    owners = {"tokenizer.json": "data/tokenizer.py", "special_tokens.json": "data/tokenizer.py",
              "vocab.txt": "alignment/text.py"}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            for name in names:
                if node.value == name or node.value.endswith("/" + name):
                    assert rel == owners.get(name, "run_folder.py"), f"{rel}:{node.lineno} writes {node.value!r}"


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"(?<![\w/])DESIGN\.md|\.\./shared|/work/")
    for path in PACKAGE.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".html", ".md"):
            text = path.read_text(encoding="utf-8")
            assert not outside.search(text), f"{path.relative_to(PACKAGE)} points outside the repository"


def test_the_recipes_ship_with_the_package():
    from paddle_mm.recipe import bundled_recipes

    assert (bundled_recipes() / "demo" / "pretrain.yaml").is_file()
    setup = (PACKAGE.parent / "setup.py").read_text(encoding="utf-8")
    assert '"paddle_mm.recipes": "recipes"' in setup and os.path.isdir(PACKAGE.parent / "recipes")


def test_an_install_holds_the_recipes_and_the_chat_page(tmp_path):
    """What `pip install .` installs (setup.py's build_py, which a wheel packs): the package with
    recipes/ inside it, so `paddle-mm demo` needs no checkout."""
    import subprocess
    import sys

    repo = PACKAGE.parent
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
                   check=True, cwd=repo, capture_output=True)
    built = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    shipped = {p.relative_to(repo).as_posix() for p in (repo / "recipes").rglob("*.yaml")}
    assert shipped and {f"paddle_mm/{p}" for p in shipped} <= built
    assert "paddle_mm/serving/chat.html" in built
    assert {p.split("/")[0] for p in built} == {"paddle_mm"}
