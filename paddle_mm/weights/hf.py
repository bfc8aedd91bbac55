"""Read a Hugging Face style checkpoint folder: config.json and safetensors (single or sharded).

safetensors' numpy loader cannot hold bfloat16, and most released checkpoints are bf16, so
the file format (an 8-byte header length, a JSON header, raw little-endian data) is read
here directly; bf16 is widened to fp32 by placing its 16 bits in the top half of a float32.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from paddle_mm.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot read config ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: cannot read config (expected a JSON object, got {type(raw).__name__})")
    return raw


# The whole models a Hugging Face folder as downloaded can be run as (paddle-mm infer FOLDER).
WHOLE_MODEL_TYPES = ("llava", "blip-2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def whole_model_type(folder: str) -> str | None:
    """"llava", "blip-2", "qwen2_vl" or "qwen2_5_vl" for a Hugging Face folder of that model (its config.json's model_type);
    None for anything else, paddle_mm's own folders included (their config.json has no model_type)."""
    try:
        raw = read_config(folder) if os.path.isdir(folder) else None
    except CheckpointError:
        return None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    return kind if kind in WHOLE_MODEL_TYPES else None


def _shard_names(index: str) -> list[str]:
    """The shard file names an index's weight_map names, each a plain path inside its folder.

    The check is on the names, not on where symlinks lead: the Hugging Face cache links every
    file of a snapshot to a blob outside it, and that is a folder as downloaded.
    """
    try:
        with open(index, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a safetensors shard index ({type(e).__name__}: {e})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a safetensors shard index (no weight_map of tensor names to file names)")
    names = sorted(set(weight_map.values()))
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if not name or os.path.isabs(name) or ".." in parts or "" in parts or "\0" in name:
            raise CheckpointError(f"{index}: the shard name {name[:200]!r} is not a file inside the folder")
    return names


def safetensors_files(folder: str) -> list[str]:
    """The weight files of a folder: those the shard index names, or the single file."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        files = [os.path.join(folder, name) for name in _shard_names(index)]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
        return files
    single = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(single):
        return [single]
    found = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")) if os.path.isdir(folder) else []
    if found:
        return [os.path.join(folder, n) for n in found]
    pickles = sorted(n for n in os.listdir(folder) if n.endswith((".bin", ".pdparams", ".pt", ".pth"))) \
        if os.path.isdir(folder) else []
    hint = f"; {', '.join(pickles)} are pickle files, which are not read" if pickles else ""
    raise CheckpointError(f"{folder}: no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}){hint}")


# The reference implementation's bound (safetensors' MAX_HEADER_SIZE): a header is a table of
# names, shapes and offsets, so 100 MB is thousands of times what a real checkpoint needs.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # the safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # byte range in the data body, after the header
    end: int


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"the key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _header(data, path: str) -> tuple[list[TensorInfo], int]:
    """(the tensors, in data order; offset of the data body) of a safetensors file's bytes.

    Checked as the reference implementation checks it, before any tensor is allocated: a
    bounded header size, a JSON object of {dtype, shape, data_offsets} records (and string
    metadata), known dtypes, shapes whose byte count is their range's, and ranges that tile
    the data body exactly, so no byte is read twice and none points outside the file. Every
    problem is a CheckpointError naming the file (and the tensor).
    """
    if len(data) < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: not a safetensors file (a header of {header_len} bytes; "
                              f"the limit is {MAX_HEADER_BYTES})")
    if 8 + header_len > len(data):
        raise CheckpointError(f"{path}: truncated (header of {header_len} bytes, file of {len(data)})")
    try:
        raw = json.loads(bytes(data[8: 8 + header_len]), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a duplicate key, a 5000-digit number
        raise CheckpointError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = raw.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    tensors = sorted((_tensor_info(name, info, path) for name, info in raw.items()), key=lambda t: (t.start, t.end))
    body = len(data) - 8 - header_len
    expected = 0
    for t in tensors:
        if t.start != expected:
            problem = "overlaps the tensor before it" if t.start < expected else "leaves a gap after the tensor before it"
            raise CheckpointError(f"{path}: tensor {t.name} {problem} (its data starts at byte {t.start}, "
                                  f"the data before it ends at {expected})")
        if t.end > body:
            raise CheckpointError(f"{path}: truncated: tensor {t.name} needs bytes up to {t.end}, file body has {body}")
        expected = t.end
    if expected != body:
        raise CheckpointError(f"{path}: corrupt safetensors file ({body - expected} bytes after the last tensor's data)")
    return tensors, 8 + header_len


def _tensor_info(name: str, info, path: str) -> TensorInfo:
    where = f"{path}: tensor {name}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: expected a record of dtype, shape and data_offsets, got {str(info)[:200]}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
        raise CheckpointError(f"{where} has unsupported dtype {str(dtype)[:40]}")

    def count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(shape, list) or not all(count(d) for d in shape):
        raise CheckpointError(f"{where}: the shape must be a list of sizes, got {str(shape)[:200]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: data_offsets must be [start, end] with start <= end, got {str(offsets)[:200]}")
    nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
    if nbytes != offsets[1] - offsets[0]:
        raise CheckpointError(f"{where}: shape {shape} in {dtype} is {nbytes} bytes, but its data_offsets "
                              f"span {offsets[1] - offsets[0]}")
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def _mapped(path: str):
    """The file's bytes, memory-mapped (b"" for an empty file, which mmap refuses)."""
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else b""
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e


def read_safetensors(path: str, to_float32: bool = True) -> dict[str, np.ndarray]:
    """All tensors of one file, after the whole header is checked (see _header).

    The file is memory-mapped, so a 10 GB shard is not held twice while it is converted.
    """
    data = _mapped(path)
    try:
        tensors, body_start = _header(data, path)
        body = memoryview(data)[body_start:]
        out = {}
        for t in tensors:
            array = np.frombuffer(body[t.start:t.end], dtype=_DTYPES[t.dtype]).reshape(t.shape)
            if t.dtype == "BF16":
                array = (array.astype(np.uint32) << 16).view(np.float32) if to_float32 else array.copy()
            elif to_float32 and array.dtype in (np.float16, np.float64):
                array = array.astype(np.float32)
            else:
                array = array.copy()  # own the memory: the map is closed when this function returns
            out[t.name] = array
        del body
    finally:
        if isinstance(data, mmap.mmap):
            data.close()
    return out


def tensor_index(folder: str) -> dict[str, tuple[str, str]]:
    """{tensor name: (file holding it, safetensors dtype such as "BF16")}, from the headers only.

    Errors about a tensor name its file through this; export keeps each tensor's dtype by it.
    """
    index = {}
    for path in safetensors_files(folder):
        data = _mapped(path)  # mapped, not read: only the header's pages are touched
        try:
            tensors, _ = _header(data, path)
        finally:
            if isinstance(data, mmap.mmap):
                data.close()
        index.update({t.name: (path, t.dtype) for t in tensors})
    return index


def read_tensors(folder: str, to_float32: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of a folder's safetensors files, floating point widened to fp32 unless told not to."""
    tensors: dict[str, np.ndarray] = {}
    for path in safetensors_files(folder):
        part = read_safetensors(path, to_float32)
        clash = set(part) & set(tensors)
        if clash:
            raise CheckpointError(f"{path}: tensors also found in another shard: {', '.join(sorted(clash)[:5])}")
        tensors.update(part)
    return tensors


def bf16_bits(array: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns, rounding to nearest even (exact for values widened from bf16)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


_NUMPY_OF = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def write_safetensors(path: str, tensors: dict[str, np.ndarray], dtypes: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors, each in dtypes[name] (default F32; BF16 allowed), atomically.

    Written here rather than by safetensors.numpy because numpy has no bfloat16.
    """
    from paddle_mm.weights.tensor_files import atomic_path

    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        dtype = (dtypes or {}).get(name, "F32")
        array = tensors[name]
        raw = bf16_bits(array) if dtype == "BF16" else np.ascontiguousarray(array, dtype=_NUMPY_OF[dtype])
        data = raw.tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format asks for the data to start 8-byte aligned
    tmp = atomic_path(path)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for data in chunks:
            f.write(data)
    os.replace(tmp, path)
