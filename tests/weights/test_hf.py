import json
import os

import numpy as np
import pytest
from reference_fixtures import folder_of
from safetensors.numpy import save_file

from paddle_mm.errors import CheckpointError
from paddle_mm.weights.hf import read_config, read_safetensors, read_tensors, safetensors_files, tensor_index


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-toward-zero bf16 bit patterns of fp32 values (what the file stores)."""
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _write_raw(path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """Write a safetensors file by hand, so bf16 can be stored without torch."""
    header, body, offset = {}, b"", 0
    for name, (dtype, array) in tensors.items():
        raw = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        body += raw
        offset += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + body)


def test_bf16_and_fp16_widen_to_exact_fp32(tmp_path):
    values = np.array([[1.0, -2.5, 3.140625], [1e-3, 65504.0, -0.0]], dtype=np.float32)
    bits = _bf16_bits(values)
    _write_raw(tmp_path / "model.safetensors", {"a": ("BF16", bits), "b": ("F16", values.astype(np.float16)),
                                                "c": ("I64", np.arange(3))})
    out = read_tensors(str(tmp_path))
    assert out["a"].dtype == np.float32 and out["b"].dtype == np.float32
    np.testing.assert_array_equal(out["a"], (bits.astype(np.uint32) << 16).view(np.float32))
    assert out["a"][0, 1] == -2.5 and out["a"][0, 2] == 3.140625  # exactly representable in bf16
    np.testing.assert_array_equal(out["b"], values.astype(np.float16).astype(np.float32))
    assert out["c"].tolist() == [0, 1, 2]
    kept = read_tensors(str(tmp_path), to_float32=False)
    assert kept["a"].dtype == np.uint16 and kept["b"].dtype == np.float16
    assert {k: v[1] for k, v in tensor_index(str(tmp_path)).items()} == {"a": "BF16", "b": "F16", "c": "I64"}


def test_sharded_folder_reads_every_shard_named_by_the_index():
    folder = folder_of("llama")
    files = safetensors_files(folder)
    assert len(files) == 4 and all(os.path.basename(f).startswith("model-0000") for f in files)
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    tensors = read_tensors(folder)
    assert sorted(tensors) == sorted(weight_map)
    index = tensor_index(folder)
    assert {k: os.path.basename(v[0]) for k, v in index.items()} == weight_map


def test_same_tensor_in_two_shards_is_an_error(tmp_path):
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "a.safetensors"))
    save_file({"x": np.ones(2, np.float32)}, str(tmp_path / "b.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"b\.safetensors: tensors also found in another shard: x"):
        read_tensors(str(tmp_path))


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard files missing: .*gone.safetensors"):
        safetensors_files(str(tmp_path))


def test_truncated_file_names_file_and_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"first": np.zeros(4, np.float32), "second": np.ones(64, np.float32)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError) as info:
        read_safetensors(str(path))
    assert str(path) in str(info.value) and "truncated" in str(info.value) and "second" in str(info.value)
    path.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(CheckpointError, match="truncated"):
        read_safetensors(str(path))
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_safetensors(str(path))


def test_folder_without_weights_names_the_folder_and_the_pickles_it_skipped(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no safetensors weights") as info:
        read_tensors(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pytorch_model.bin are pickle files, which are not read"):
        read_tensors(str(tmp_path))


def test_read_config_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        read_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot read config"):
        read_config(str(tmp_path))


def test_unsupported_dtype_names_the_tensor(tmp_path):
    _write_raw(tmp_path / "model.safetensors", {"odd": ("F8_E4M3", np.zeros(2, np.uint8))})
    with pytest.raises(CheckpointError, match="tensor odd has unsupported dtype F8_E4M3"):
        read_tensors(str(tmp_path))
