"""Atomic file writes: a temporary file in the same folder, then os.replace.

A reader (or a run resumed after a crash) never sees a half-written recipe, config, summary
or data file: it finds the old file or the complete new one. Also here, the one reader of the
small JSON-object files a checkpoint folder ships (its configs), each caller naming its error.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def read_json_object(path: str | os.PathLike, error: Callable[[str], Exception]) -> dict:
    """The JSON object in path; error(reason) is raised (the caller's type, naming the file) when
    the file cannot be read or parsed, or holds something other than an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise error(f"cannot read: {e}") from None
    if not isinstance(data, dict):
        raise error("expected a JSON object")
    return data
