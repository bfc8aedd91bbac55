"""Name-mapping tables between another implementation's tensor names and paddle_mm's.

A table is a list of rules written out by hand, one per tensor kind: the source name, the
paddle_mm name, and whether the matrix is transposed (torch nn.Linear stores [out, in],
Paddle nn.Linear [in, out]). "{i}" in a pattern stands for a layer index. Names the source
holds on purpose but paddle_mm does not use (a CLIP text tower, a position_ids buffer) are
listed in `ignore`; paddle_mm parameters that share storage with another one (tied
embeddings) are listed in `tied` so they are neither reported missing nor written out.
Anything else that does not match is an error that lists the names.

Also here, at the bottom of weights/ so every family module can use them: `Family`, the
record each checkpoint family's module fills in for `paddle-mm convert` / `export`
(weights/families.py collects them by name), and `refuse_inexpressible`, the one error an
export raises for what the target layout cannot express.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from paddle_mm.errors import CheckpointError

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Rule:
    source: str  # name in the other layout, e.g. "encoder.layers.{i}.self_attn.q_proj.weight"
    target: str  # paddle_mm name, e.g. "blocks.{i}.attn.q_proj.weight"
    transpose: bool = False


def _regex(pattern: str) -> re.Pattern:
    parts = _PLACEHOLDER.split(pattern)
    # split() alternates literal text and placeholder names
    body = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>\\d+)" for k, p in enumerate(parts))
    return re.compile(body + r"\Z")


def matches(pattern: str, name: str) -> bool:
    """Whether a name fits a pattern such as "blocks.{i}.attn.qkv.weight"."""
    return _regex(pattern).match(name) is not None


@dataclass(frozen=True)
class Table:
    name: str
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()  # source patterns deliberately not loaded
    tied: tuple[str, ...] = ()  # paddle_mm names that share a parameter with a mapped one
    _compiled: dict = field(default_factory=dict, compare=False, repr=False)

    def prefixed(self, source_prefix: str, target_prefix: str) -> Table:
        """The same table for a model nested under a prefix on each side."""
        return Table(
            self.name,
            tuple(Rule(source_prefix + r.source, target_prefix + r.target, r.transpose) for r in self.rules),
            tuple(source_prefix + p for p in self.ignore),
            tuple(target_prefix + t for t in self.tied),
        )

    def in_paddle_layout(self) -> Table:
        """The same names for a checkpoint written by Paddle, whose Linear weights are [in, out] already."""
        return Table(self.name, tuple(Rule(r.source, r.target) for r in self.rules), self.ignore, self.tied)

    def __add__(self, other: Table) -> Table:
        return Table(f"{self.name}+{other.name}", self.rules + other.rules, self.ignore + other.ignore,
                     self.tied + other.tied)

    def _match(self, name: str, side: str):
        """(rule, placeholder values) whose `side` pattern matches name, or (None, None)."""
        if not self._compiled:
            for r in self.rules:
                self._compiled[("source", r.source)] = _regex(r.source)
                self._compiled[("target", r.target)] = _regex(r.target)
        for r in self.rules:
            m = self._compiled[(side, getattr(r, side))].match(name)
            if m:
                return r, m.groupdict()
        return None, None

    def is_ignored(self, name: str) -> bool:
        return any(matches(p, name) for p in self.ignore)

    def target_of(self, source_name: str) -> tuple[str, bool] | None:
        rule, values = self._match(source_name, "source")
        return None if rule is None else (rule.target.format(**values), rule.transpose)

    def source_of(self, target_name: str) -> tuple[str, bool] | None:
        rule, values = self._match(target_name, "target")
        return None if rule is None else (rule.source.format(**values), rule.transpose)


def listed_names(kind: str, names: list[str], limit: int = 10) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return f"{kind} {len(names)}: {', '.join(names[:limit])}{more}"


def to_paddle_mm(tensors: dict[str, np.ndarray], table: Table, source: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Rename (and transpose) source tensors to paddle_mm names; returns (mapped, ignored names).

    A source name that no rule maps and no ignore pattern lists is a CheckpointError naming it.
    """
    mapped: dict[str, np.ndarray] = {}
    ignored, unknown = [], []
    for name in sorted(tensors):
        hit = table.target_of(name)
        if hit is None:
            (ignored if table.is_ignored(name) else unknown).append(name)
            continue
        target, transpose = hit
        array = tensors[name]
        if transpose:
            if array.ndim != 2:
                raise CheckpointError(f"{source}: tensor {name} should be a matrix, has shape {list(array.shape)}")
            array = np.ascontiguousarray(array.T)
        mapped[target] = array
    if unknown:
        raise CheckpointError(f"{source}: tensors not in the {table.name} mapping table ({listed_names('unexpected', unknown)})")
    return mapped, ignored


def from_paddle_mm(tensors: dict[str, np.ndarray], table: Table, source: str) -> dict[str, np.ndarray]:
    """The inverse of to_paddle_mm, for export: paddle_mm names back to the source layout."""
    out: dict[str, np.ndarray] = {}
    unknown = []
    for name in sorted(tensors):
        hit = table.source_of(name)
        if hit is None:
            if name not in table.tied:
                unknown.append(name)
            continue
        src, transpose = hit
        out[src] = np.ascontiguousarray(tensors[name].T) if transpose else tensors[name]
    if unknown:
        raise CheckpointError(f"{source}: tensors the {table.name} layout has no name for ({listed_names('unmapped', unknown)})")
    return out


def load_mapped(layer, tensors: dict[str, np.ndarray], table: Table, source: str, where: dict[str, str] | None = None,
                strict: bool = True) -> list[str]:
    """Map source tensors with `table` and copy them into `layer`; returns the names left unset.

    `where` names the file of each source tensor (hf.tensor_index), so a shape error says
    which file and tensor. Missing parameters are an error unless strict=False, in which
    case they keep their initial values and their names are returned.
    """
    mapped, _ = to_paddle_mm(tensors, table, source)
    own = layer.state_dict()
    unexpected = sorted(set(mapped) - set(own))
    wrong = []
    for target in sorted(set(mapped) & set(own)):
        if list(mapped[target].shape) != list(own[target].shape):
            src, transpose = table.source_of(target)
            file = (where or {}).get(src, source)
            shown = list(tensors[src].shape)
            expected = list(own[target].shape)[::-1] if transpose else list(own[target].shape)
            wrong.append(f"{file}: {src} has shape {shown}, the model needs {expected} (for {target})")
    covered = set(mapped) | set(table.tied)
    missing = sorted(set(own) - covered)
    # the checkpoint's own name is what a user can look for in the file
    shown_missing = [f"{m} ({hit[0]})" if (hit := table.source_of(m)) and hit[0] != m else m for m in missing]
    problems = []
    if wrong:
        problems.append("wrong shape: " + "; ".join(wrong[:10]))
    if unexpected:
        problems.append(listed_names("no such parameter in the model", unexpected))
    if missing and strict:
        problems.append(listed_names("missing", shown_missing))
    if problems:
        raise CheckpointError(f"{source}: does not fit the model ({' | '.join(problems)})")
    for target, array in mapped.items():
        param = own[target]
        dtype = str(param.dtype).replace("paddle.", "")
        param.set_value(array if array.dtype == np.float32 and dtype == "float32" else array.astype(dtype))
    return missing


# ---- checkpoint families -------------------------------------------------------------------
def unchanged(raw: dict, layout: str, tensors: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Family.split / Family.join for a family whose tensors a rename table maps as they are."""
    return tensors


@dataclass(frozen=True)
class Family:
    """What `paddle-mm convert` and `export` need to know of one checkpoint family.

    layout(tensor names, source folder): which of the family's source layouts the checkpoint uses.
    table(source config.json dict, layout, source folder): the table from that layout to paddle_mm names.
    config(source folder): our config of the converted model, as JSON (no checkpoint path in it).
    split / join(raw, layout, tensors, source): what a rename cannot do, before mapping on
    convert and undone after mapping back on export (BLIP-2's fused qkv).
    makes_run_folder: the converted folder is a whole model, given recipe.yaml and tokenizer.json
    so that it loads like a trained run.
    """
    name: str
    layout: Callable[..., str]
    table: Callable[..., Table]
    config: Callable[[str], dict]
    split: Callable[..., dict] = unchanged
    join: Callable[..., dict] = unchanged
    makes_run_folder: bool = False


def refuse_inexpressible(source: str, target: str, checks) -> None:
    """One CheckpointError naming every (failed, reason) check the target layout cannot express."""
    problems = [reason for failed, reason in checks if failed]
    if problems:
        raise CheckpointError(f"{source}: cannot be written as a transformers {target}: {'; '.join(problems)}")
