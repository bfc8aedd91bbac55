"""Read a Hugging Face style checkpoint folder: config.json and safetensors (single or sharded).

safetensors' numpy loader cannot hold bfloat16, and most released checkpoints are bf16, so
the file format (an 8-byte header length, a JSON header, raw little-endian data) is read
here directly; bf16 is widened to fp32 by placing its 16 bits in the top half of a float32.
"""
from __future__ import annotations

import json
import mmap
import os
import struct

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
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read config ({e})") from e


# The whole models a Hugging Face folder as downloaded can be run as (paddle-mm infer FOLDER).
WHOLE_MODEL_TYPES = ("llava", "blip-2")


def whole_model_type(folder: str) -> str | None:
    """"llava" or "blip-2" for a Hugging Face LLaVA / BLIP-2 folder (its config.json's model_type);
    None for anything else, paddle_mm's own folders included (their config.json has no model_type)."""
    try:
        raw = read_config(folder) if os.path.isdir(folder) else None
    except CheckpointError:
        return None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    return kind if kind in WHOLE_MODEL_TYPES else None


def safetensors_files(folder: str) -> list[str]:
    """The weight files of a folder: those the shard index names, or the single file."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors shard index ({e})") from e
        files = [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]
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


def _header(data, path: str) -> tuple[dict, int]:
    """(header, offset of the data body) of a safetensors file's bytes; errors name the file."""
    if len(data) < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if 8 + header_len > len(data):
        raise CheckpointError(f"{path}: truncated (header of {header_len} bytes, file of {len(data)})")
    try:
        header = json.loads(bytes(data[8: 8 + header_len]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + header_len


def read_safetensors(path: str, to_float32: bool = True) -> dict[str, np.ndarray]:
    """All tensors of one file; a truncated file or an unknown dtype is an error naming the tensor.

    The file is memory-mapped, so a 10 GB shard is not held twice while it is converted.
    """
    try:
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else b""
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    header, body_start = _header(data, path)
    body = memoryview(data)[body_start:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        start, end = info["data_offsets"]
        if end > len(body):
            raise CheckpointError(f"{path}: truncated: tensor {name} needs bytes up to {end}, file body has {len(body)}")
        array = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"])
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32) if to_float32 else array.copy()
        elif to_float32 and array.dtype in (np.float16, np.float64):
            array = array.astype(np.float32)
        else:
            array = array.copy()  # own the memory: the map is closed when this function returns
        out[name] = array
    del body
    if isinstance(data, mmap.mmap):
        data.close()
    return out


def tensor_index(folder: str) -> dict[str, tuple[str, str]]:
    """{tensor name: (file holding it, safetensors dtype such as "BF16")}, from the headers only.

    Errors about a tensor name its file through this; export keeps each tensor's dtype by it.
    """
    index = {}
    for path in safetensors_files(folder):
        with open(path, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            header, _ = _header(head + f.read(size), path)
        index.update({k: (path, v.get("dtype", "?")) for k, v in header.items() if k != "__metadata__"})
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
