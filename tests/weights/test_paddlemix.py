"""PaddleMIX LLaVA folders, made here from the transformers fixture by PaddleMIX's naming."""
import json
import os

import numpy as np
import paddle
import pytest
from reference_fixtures import folder_of, max_diff, reference, snapshot
from safetensors.numpy import save_file

from paddle_mm.cli import main
from paddle_mm.errors import CheckpointError
from paddle_mm.run_folder import load_run
from paddle_mm.weights.convert import export
from paddle_mm.weights.hf import read_tensors

# HF LLaVA (legacy layout) name pieces -> PaddleMIX / PaddleNLP ones, and which are transposed
# there ([in, out] Linear weights; LlamaLMHead [hidden, vocab]).
VISION_PIECES = [
    ("embeddings.class_embedding", "class_embedding"), ("embeddings.patch_embedding.", "conv1."),
    ("embeddings.position_embedding.", "positional_embedding."), ("pre_layrnorm.", "ln_pre."),
    ("post_layernorm.", "ln_post."), ("encoder.layers.", "transformer.layers."), ("layer_norm1.", "norm1."),
    ("layer_norm2.", "norm2."), ("mlp.fc1.", "linear1."), ("mlp.fc2.", "linear2."),
]


def paddlemix_name(name: str) -> str:
    if name.startswith("vision_tower.vision_model."):
        rest = name[len("vision_tower.vision_model."):]
        for old, new in VISION_PIECES:
            rest = rest.replace(old, new)
        return "llama.vision_tower.vision_tower.vision_model." + rest
    if name.startswith("multi_modal_projector."):
        return "llama.mm_projector." + name.split(".", 1)[1].replace("linear_1", "0").replace("linear_2", "2")
    if name.startswith("language_model.model."):
        return "llama." + name[len("language_model.model."):]
    assert name == "language_model.lm_head.weight", name
    return "lm_head.weight"


def make_paddlemix_folder(root) -> tuple[str, dict]:
    hf = folder_of("llava")
    with open(os.path.join(hf, "config.json")) as f:
        raw = json.load(f)
    clip = root / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({**raw["vision_config"], "model_type": "clip_vision_model"}))
    mix = root / "paddlemix"
    mix.mkdir()
    config = {**raw["text_config"], "model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"],
              "mm_vision_tower": str(clip), "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32,
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"}
    (mix / "config.json").write_text(json.dumps(config))
    tensors = {}
    for name, array in read_tensors(hf).items():
        linear = array.ndim == 2 and "embed" not in name
        tensors[paddlemix_name(name)] = np.ascontiguousarray(array.T) if linear else array
    os.link(os.path.join(hf, "tokenizer.json"), mix / "tokenizer.json")
    return str(mix), tensors


def test_paddlemix_safetensors_give_the_reference_numbers_and_export_to_hf(tmp_path):
    mix, tensors = make_paddlemix_folder(tmp_path)
    save_file(tensors, os.path.join(mix, "model.safetensors"))
    before = snapshot(mix)
    assert main(["convert", "--from", "paddlemix", "--family", "llava", mix, str(tmp_path / "pm")]) == 0
    assert snapshot(mix) == before
    _, _, _, model = load_run(str(tmp_path / "pm"))
    ref = reference("llava")
    ids, pixels = paddle.to_tensor(ref["input_ids"]), paddle.to_tensor(ref["pixel_values"])
    with paddle.no_grad():
        assert max_diff(model(ids, pixel_values=pixels)[1].numpy(), ref["logits"]) <= 1e-4
        assert model.generate(ids, pixel_values=pixels, max_new_tokens=16, eos_token_id=None) == ref["greedy"].tolist()
    out = export(str(tmp_path / "pm"), str(tmp_path / "hf"))  # PaddleMIX -> Hugging Face, tensor for tensor
    original = read_tensors(folder_of("llava"))
    exported = read_tensors(out)
    assert sorted(exported) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)


def test_pdparams_is_read_only_when_asked_for(tmp_path):
    mix, tensors = make_paddlemix_folder(tmp_path)
    paddle.save({k: paddle.to_tensor(v) for k, v in tensors.items()}, os.path.join(mix, "model_state.pdparams"))
    with pytest.raises(CheckpointError, match=r"model_state.pdparams .*ask for it by name \(--pdparams\)"):
        from paddle_mm.weights.paddlemix import convert_paddlemix

        convert_paddlemix(mix, str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused")
    assert main(["convert", "--from", "paddlemix", "--pdparams", "--family", "llava", mix, str(tmp_path / "pm")]) == 0
    _, _, _, model = load_run(str(tmp_path / "pm"))
    ref = reference("llava")
    with paddle.no_grad():
        logits = model(paddle.to_tensor(ref["input_ids"]), pixel_values=paddle.to_tensor(ref["pixel_values"]))[1]
    assert max_diff(logits.numpy(), ref["logits"]) <= 1e-4


def test_fused_qkv_or_unknown_names_are_listed(tmp_path):
    mix, tensors = make_paddlemix_folder(tmp_path)
    tensors["llama.layers.0.self_attn.qkv_proj.weight"] = np.zeros((32, 64), np.float32)
    save_file(tensors, os.path.join(mix, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected 1: llama\.layers\.0\.self_attn\.qkv_proj\.weight"):
        from paddle_mm.weights.paddlemix import convert_paddlemix

        convert_paddlemix(mix, str(tmp_path / "pm"))
