"""Crafted safetensors files and shard indexes: each is a CheckpointError naming the file, raised
before anything the header claims is allocated, and a fuzzed header gives nothing else."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from paddle_mm.errors import CheckpointError
from paddle_mm.weights.hf import MAX_HEADER_BYTES, read_config, read_safetensors, safetensors_files, tensor_index


def _file(path, header, body: bytes = b"", header_len: int | None = None):
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head) if header_len is None else header_len) + head + body)
    return str(path)


def _f32(start: int, n: int = 2) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [start, start + 4 * n]}


def test_a_valid_hand_written_file_still_reads(tmp_path):
    path = _file(tmp_path / "ok.safetensors", {"a": _f32(0), "b": _f32(8), "__metadata__": {"format": "pt"}},
                 np.arange(4, dtype=np.float32).tobytes())
    out = read_safetensors(path)
    assert out["a"].tolist() == [0, 1] and out["b"].tolist() == [2, 3]


@pytest.mark.parametrize("case, header, body, header_len, message", [
    ("told a 1 TiB header", {}, b"", 2**40, "header of 1099511627776 bytes; the limit is"),
    ("header just over the cap", {}, b"", MAX_HEADER_BYTES + 1, "the limit is 100000000"),
    ("header longer than the file", {}, b"", 10_000, "truncated"),
    ("offsets past the data", {"a": _f32(0), "b": _f32(8)}, b"\0" * 12, None, "truncated: tensor b"),
    ("offsets that point back into the same bytes", {"a": _f32(0), "b": _f32(0)}, b"\0" * 8, None,
     "tensor [ab] overlaps the tensor before it"),
    ("a gap between tensors", {"a": _f32(0), "b": _f32(16)}, b"\0" * 24, None, "tensor b leaves a gap"),
    ("bytes after the last tensor", {"a": _f32(0)}, b"\0" * 64, None, "56 bytes after the last tensor"),
    ("shape bigger than its bytes", {"a": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 8]}},
     b"\0" * 8, None, r"tensor a: shape \[1000000, 1000000\] in F32 is 4000000000000 bytes"),
    ("negative shape", {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     "tensor a: the shape must be a list of sizes"),
    ("reversed offsets", {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 8, None,
     "start <= end"),
    ("unknown dtype", {"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0", None,
     "tensor a has unsupported dtype F4"),
    ("a record that is a list", {"a": [1, 2]}, b"", None, "tensor a: expected a record"),
    ("offsets as text", {"a": {"dtype": "F32", "shape": [2], "data_offsets": "0-8"}}, b"\0" * 8, None,
     "data_offsets must be"),
    ("metadata that is not strings", {"__metadata__": {"format": 1}}, b"", None, "__metadata__"),
    ("a header that is a list", [1, 2], b"", None, "not a JSON object"),
    ("a header that is not UTF-8", b"\xff\xfe{}", b"", None, "corrupt safetensors header"),
    ("a name given twice", b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, '
                           b'"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}', b"", None, "appears twice"),
    ("nesting 100,000 deep", b"[" * 100_000 + b"]" * 100_000, b"", None, "corrupt safetensors header"),
    ("a 5,000-digit number", b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}',
     b"", None, "corrupt safetensors header"),
])
def test_crafted_headers_are_checkpoint_errors_naming_the_file(tmp_path, case, header, body, header_len, message):
    path = _file(tmp_path / "model.safetensors", header, body, header_len)
    for read in (lambda: read_safetensors(path), lambda: tensor_index(str(tmp_path))):
        with pytest.raises(CheckpointError, match=message) as info:
            read()
        assert str(info.value).startswith(path + ":")


def test_files_the_reference_library_writes_pass_the_same_checks(tmp_path):
    tensors = {"w": np.ones((3, 5), np.float32), "b": np.zeros(7, np.float16), "i": np.arange(4), "e": np.zeros(0)}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "np"})
    out = read_safetensors(str(tmp_path / "model.safetensors"), to_float32=False)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in tensors.items()}


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", "",
                                  "a\\..\\..\\x.safetensors", "a\0b"])
def test_index_shard_names_stay_inside_the_folder(tmp_path, name):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(CheckpointError, match="is not a file inside the folder") as info:
        safetensors_files(str(tmp_path))
    assert "model.safetensors.index.json" in str(info.value)


def test_a_shard_in_a_subfolder_is_allowed(tmp_path):
    (tmp_path / "shards").mkdir()
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "shards" / "one.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "shards/one.safetensors"}}))
    assert safetensors_files(str(tmp_path)) == [str(tmp_path / "shards" / "one.safetensors")]


@pytest.mark.parametrize("index", ["[]", '{"weight_map": ["a"]}', '{"weight_map": {"w": 3}}', "{", "[" * 50_000])
def test_malformed_indexes_are_checkpoint_errors(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="not a safetensors shard index"):
        safetensors_files(str(tmp_path))


@pytest.mark.parametrize("text", ["[]", '"x"', "[" * 50_000])
def test_a_config_that_is_not_an_object_is_a_checkpoint_error(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match="config.json: cannot read config"):
        read_config(str(tmp_path))


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                     max_leaves=20)
_record = st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I64", "U8", "F8", 3]),
                                 "shape": st.lists(st.integers(-2, 2**40), max_size=3) | _json,
                                 "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3) | _json})
_headers = st.dictionaries(st.text(max_size=6), _record | _json, max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=_headers | _json, body=st.binary(max_size=64), told=st.none() | st.integers(0, 2**64 - 1))
def test_fuzzed_headers_read_or_raise_a_checkpoint_error(tmp_path, header, body, told):
    path = _file(tmp_path / "fuzz.safetensors", header, body, told)
    try:
        out = read_safetensors(path)
    except CheckpointError as e:
        assert str(e).startswith(path)
    else:
        assert sum(a.nbytes for a in out.values()) <= 2 * len(body)  # bf16 widens to twice its bytes


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_fuzzed_bytes_read_or_raise_a_checkpoint_error(tmp_path, raw):
    path = tmp_path / "raw.safetensors"
    path.write_bytes(raw)
    try:
        read_safetensors(str(path))
    except CheckpointError:
        pass
