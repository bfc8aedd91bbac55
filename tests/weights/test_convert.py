import json
import os
import shutil
from dataclasses import asdict, replace

import numpy as np
import paddle
import pytest
from reference_fixtures import folder_of, max_diff, reference, snapshot

from paddle_mm.cli import main
from paddle_mm.config import LoraConfig, Recipe
from paddle_mm.errors import CheckpointError
from paddle_mm.model import VisionLanguageModel
from paddle_mm.recipe import save_recipe
from paddle_mm.run_folder import load_run
from paddle_mm.weights.convert import CONVERSION_FILE, convert, export
from paddle_mm.weights.hf import read_tensors
from paddle_mm.weights.llava import llava_model_config, load_llava
from paddle_mm.weights.tensor_files import save_tensors

FIXTURES = [("clip", "clip"), ("qwen2", "qwen2"), ("qwen2", "qwen2/bf16"), ("llama", "llama"), ("llava", "llava"),
            ("blip2", "blip2/hf"), ("blip2", "blip2/hf_bf16"), ("blip2", "blip2_opt/hf457"), ("blip2", "blip2_opt/hf5"),
            # folders as transformers 4.57 and 5.x save_pretrained wrote them (tools/make_pipeline_fixtures.py)
            ("llava", "pipeline/llava_llama/hf457"), ("llava", "pipeline/llava_llama/hf5"),
            ("llava", "pipeline/llava_qwen2/hf5"), ("qwen2", "pipeline/qwen2/hf5"), ("llama", "pipeline/llama/hf5"),
            ("siglip", "siglip/hf457"), ("siglip", "siglip/hf5"), ("siglip", "siglip_model/hf457"),
            ("siglip", "siglip_model/hf5"), ("llava", "llava_siglip/hf457"), ("llava", "llava_siglip/hf5"),
            ("qwen2-vl", "qwen2_vl/qwen2_vl/hf457"), ("qwen2-vl", "qwen2_vl/qwen2_vl/hf5"),
            ("qwen2-vl", "qwen2_vl/qwen2_5_vl/hf457"), ("qwen2-vl", "qwen2_vl/qwen2_5_vl/hf5"),
            ("qwen2-vl", "qwen2_vl/qwen3_vl/hf457"), ("qwen2-vl", "qwen2_vl/qwen3_vl/hf5")]


def assert_same_tensors(a: str, b: str) -> None:
    x, y = read_tensors(a, to_float32=False), read_tensors(b, to_float32=False)  # bf16 compared as raw bits
    assert sorted(x) == sorted(y)
    for name in x:
        assert x[name].dtype == y[name].dtype and x[name].shape == y[name].shape, name
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)


@pytest.mark.parametrize("family,fixture", FIXTURES)
def test_round_trip_reproduces_every_input_tensor_exactly(family, fixture, tmp_path, capsys):
    src = folder_of(fixture)
    before = snapshot(src)
    assert main(["convert", "--from", "hf", "--family", family, src, str(tmp_path / "pm")]) == 0
    assert main(["export", str(tmp_path / "pm"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert_same_tensors(src, str(tmp_path / "hf"))
    with open(os.path.join(src, "config.json")) as f, open(tmp_path / "hf" / "config.json") as g:
        assert json.load(f) == json.load(g)
    assert snapshot(src) == before
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_converted_llava_folder_is_a_run_folder_with_the_reference_numbers(tmp_path):
    folder = convert(folder_of("llava"), str(tmp_path / "pm"), "llava")
    _, cfg, tokenizer, model = load_run(folder)
    assert cfg.image_token_id == tokenizer.image_token_id == 3
    ref = reference("llava")
    with paddle.no_grad():
        _, logits = model(paddle.to_tensor(ref["input_ids"]), pixel_values=paddle.to_tensor(ref["pixel_values"]))
    assert max_diff(logits.numpy(), ref["logits"]) <= 1e-4


def test_export_of_a_run_trained_here_writes_a_llava_config_that_reads_back(tmp_path):
    converted = convert(folder_of("llava"), str(tmp_path / "pm"), "llava")
    os.remove(os.path.join(converted, CONVERSION_FILE))  # as a run folder written by training
    out = export(converted, str(tmp_path / "hf"))
    assert llava_model_config(out) == replace(llava_model_config(folder_of("llava")), path=out)
    assert_same_tensors(folder_of("llava"), out)


def test_lora_run_is_exported_with_the_lora_folded_in(tmp_path):
    """The merged export must give the logits the LoRA model gave (PaddleFormers' LoRA layer)."""
    from paddle_mm.lm.lora import add_lora

    cfg = llava_model_config(folder_of("llava"))
    model = VisionLanguageModel(cfg)
    load_llava(model, folder_of("llava"))
    lora = LoraConfig(enabled=True, r=4, alpha=8)
    add_lora(model.language_model, lora)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.set_value(np.random.default_rng(0).standard_normal(p.shape).astype("float32") * 0.1)
    run = tmp_path / "run"
    run.mkdir()
    recipe = Recipe(model=replace(cfg, path=""))
    recipe.train.lora = lora
    save_recipe(recipe, str(run / "recipe.yaml"))
    (run / "config.json").write_text(json.dumps(asdict(replace(cfg, path=""))))
    save_tensors(model.state_dict(), str(run / "model.safetensors"))
    out = export(str(run), str(tmp_path / "hf"))
    merged = VisionLanguageModel(llava_model_config(out))
    load_llava(merged, out)
    ref = reference("llava")
    ids, pixels = paddle.to_tensor(ref["input_ids"]), paddle.to_tensor(ref["pixel_values"])
    model.eval()
    merged.eval()
    with paddle.no_grad():
        with_lora, folded = model(ids, pixel_values=pixels)[1].numpy(), merged(ids, pixel_values=pixels)[1].numpy()
    assert max_diff(with_lora, ref["logits"]) > 1e-2  # the LoRA matrices changed the model
    assert max_diff(with_lora, folded) <= 1e-4


def test_refusals_write_nothing(tmp_path):
    src = folder_of("qwen2")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        convert(src, str(tmp_path / "taken"), "qwen2")
    copy = shutil.copytree(src, tmp_path / "copy")
    with pytest.raises(CheckpointError, match="inside the source folder"):
        convert(str(copy), str(copy / "out"), "qwen2")
    with pytest.raises(CheckpointError, match="model_type 'qwen2' is not 'llama'"):
        convert(src, str(tmp_path / "x"), "llama")
    assert main(["convert", "--family", "llava", src, str(tmp_path / "y")]) == 2  # one error line, exit 2
    assert sorted(os.listdir(tmp_path)) == ["copy", "taken"]
    with pytest.raises(CheckpointError, match="not a paddle_mm folder"):
        export(str(tmp_path / "taken"), str(tmp_path / "z"))


def test_a_model_llava_cannot_express_is_not_exported(tmp_path):
    converted = convert(folder_of("llava"), str(tmp_path / "pm"), "llava")
    os.remove(os.path.join(converted, CONVERSION_FILE))
    with open(os.path.join(converted, "config.json")) as f:
        raw = json.load(f)
    raw["vision"]["post_norm"] = True
    with open(os.path.join(converted, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(CheckpointError, match="cannot be written as a transformers LLaVA: vision.post_norm"):
        export(converted, str(tmp_path / "hf"))
