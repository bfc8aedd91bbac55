import json
import os

import numpy as np
import paddle
import pytest
from reference_fixtures import checkpoint_copy, folder_of, llava, llava_outputs, max_diff, reference, snapshot
from safetensors.numpy import save_file

from paddle_mm import builder
from paddle_mm.config import Recipe
from paddle_mm.errors import CheckpointError, RecipeError
from paddle_mm.lm.adapter import _classes
from paddle_mm.model import VisionLanguageModel
from paddle_mm.weights.hf import read_tensors
from paddle_mm.weights.llava import llava_model_config, load_llava

LEGACY_TO_457 = {  # transformers 4.57's LlavaForConditionalGeneration._checkpoint_conversion_mapping
    "language_model.model.": "model.language_model.",
    "vision_tower.": "model.vision_tower.",
    "multi_modal_projector.": "model.multi_modal_projector.",
    "language_model.lm_head.": "lm_head.",
}


def rewrite(folder: str, edit=None, config_edit=None) -> None:
    if edit:
        tensors = read_tensors(folder)
        tensors = edit(tensors)
        save_file(tensors, os.path.join(folder, "model.safetensors"))
    if config_edit:
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            raw = json.load(f)
        config_edit(raw)
        with open(path, "w") as f:
            json.dump(raw, f)


def to_457_layout(tensors):
    out = {}
    for name, array in tensors.items():
        prefix = next(p for p in LEGACY_TO_457 if name.startswith(p))
        out[LEGACY_TO_457[prefix] + name[len(prefix):]] = array
    return out


def test_config_reads_feature_selection_and_both_parts():
    cfg = llava_model_config(folder_of("llava"))
    assert (cfg.vision.feature_layer, cfg.vision.drop_cls_token, cfg.vision.post_norm) == (-2, True, False)
    assert (cfg.vision.num_layers, cfg.vision.image_size, cfg.vision.patch_size) == (3, 32, 8)
    assert (cfg.lm.family, cfg.lm.vocab_size, cfg.lm.num_kv_heads, cfg.lm.path) == ("llama", 320, 2, "")
    assert cfg.projector.type == "mlp2x_gelu" and cfg.image_token_id == 3 and cfg.tokens_per_image == 16


def test_legacy_layout_matches_transformers():
    ref = reference("llava")
    before = snapshot(folder_of("llava"))
    features, logits, greedy = llava_outputs(llava(folder_of("llava")), ref)
    assert max_diff(features, ref["image_features"]) <= 1e-4
    assert max_diff(logits, ref["logits"]) <= 1e-4
    assert greedy == ref["greedy"].tolist()
    assert snapshot(folder_of("llava")) == before


def test_transformers_457_layout_matches_transformers(tmp_path):
    ref = reference("llava")
    folder = checkpoint_copy("llava", tmp_path / "new")
    rewrite(folder, to_457_layout)
    assert any(k.startswith("model.language_model.layers.") for k in read_tensors(folder))
    features, logits, greedy = llava_outputs(llava(folder), ref)
    assert max_diff(features, ref["image_features"]) <= 1e-4
    assert max_diff(logits, ref["logits"]) <= 1e-4
    assert greedy == ref["greedy"].tolist()


def test_full_strategy_last_layer_keeps_the_class_token(tmp_path):
    ref = reference("llava")
    folder = checkpoint_copy("llava", tmp_path / "full")
    rewrite(folder, config_edit=lambda raw: raw.update(vision_feature_layer=-1, vision_feature_select_strategy="full"))
    model = llava(folder)
    assert model.tokens_per_image == 17
    with paddle.no_grad():
        features = model.image_features(paddle.to_tensor(ref["pixel_values"])).numpy()
    assert max_diff(features, ref["image_features_last_full"]) <= 1e-4


def test_bf16_checkpoint_loads_the_rounded_values(tmp_path):
    folder = checkpoint_copy("llava", tmp_path / "bf16")
    fp32 = read_tensors(folder)
    header, body, offset = {}, b"", 0
    for name, array in sorted(fp32.items()):
        raw = (array.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        body, offset = body + raw, offset + len(raw)
    head = json.dumps(header).encode()
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + body)
    model = llava(folder)
    rounded = (fp32["multi_modal_projector.linear_1.weight"].view(np.uint32) & 0xFFFF0000).view(np.float32)
    np.testing.assert_array_equal(model.multi_modal_projector.linear_1.weight.numpy(), rounded.T)
    ref = reference("llava")
    _, logits, _ = llava_outputs(model, ref)
    assert 0 < max_diff(logits, ref["logits"]) < 0.5  # bf16 rounding moves the logits a little, not far


def test_lm_part_equals_paddleformers_loading_of_the_same_lm(tmp_path):
    """The LM tensors, moved to a plain LlamaForCausalLM folder, loaded by PaddleFormers' own rules."""
    folder = folder_of("llava")
    lm_dir = tmp_path / "lm"
    lm_dir.mkdir()
    with open(os.path.join(folder, "config.json")) as f:
        text_config = json.load(f)["text_config"]
    # transformers leaves out fields equal to its defaults; PaddleFormers' Llama default ties.
    (lm_dir / "config.json").write_text(json.dumps({"tie_word_embeddings": False, **text_config}))
    tensors = {k[len("language_model."):]: v for k, v in read_tensors(folder).items() if k.startswith("language_model.")}
    save_file(tensors, str(lm_dir / "model.safetensors"))
    theirs = _classes("llama")[1].from_pretrained(str(lm_dir), dtype="float32").state_dict()
    ours = llava(folder).language_model.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, value in ours.items():
        np.testing.assert_array_equal(value.numpy(), theirs[name].numpy(), err_msg=name)


def test_recipe_model_path_builds_the_checkpoint_with_its_tokenizer():
    recipe = Recipe()
    recipe.model.path = folder_of("llava")
    tokenizer = builder.load_tokenizer(recipe)
    cfg = builder.model_config_for(recipe, tokenizer)
    assert cfg.image_token_id == tokenizer.image_token_id == 3
    model = builder.build_model(cfg, tokenizer)
    model.eval()
    ref = reference("llava")
    assert max_diff(llava_outputs(model, ref)[1], ref["logits"]) <= 1e-4
    recipe.model.lm.path = folder_of("llama")
    with pytest.raises(RecipeError, match="cannot be combined"):
        builder.model_config_for(recipe, tokenizer)


def test_bad_configs_and_layouts_are_refused(tmp_path):
    folder = checkpoint_copy("llava", tmp_path / "a")
    rewrite(folder, config_edit=lambda raw: raw.update(vision_feature_layer=[-2, -5]))
    with pytest.raises(CheckpointError, match=r"config.json: vision_feature_layer \[-2, -5\]"):
        llava_model_config(folder)
    rewrite(folder, config_edit=lambda raw: raw.update(model_type="idefics"))
    with pytest.raises(CheckpointError, match="config.json: model_type 'idefics' is not 'llava'"):
        llava_model_config(folder)
    folder = checkpoint_copy("llava", tmp_path / "b")
    model = VisionLanguageModel(llava_model_config(folder))
    rewrite(folder, lambda t: {k.replace("language_model.model.", "llm."): v for k, v in t.items()})
    with pytest.raises(CheckpointError, match="not a LLaVA checkpoint"):
        load_llava(model, folder)


def test_misshaped_projector_is_named_with_its_file(tmp_path):
    folder = checkpoint_copy("llava", tmp_path / "c")
    rewrite(folder, lambda t: {**t, "multi_modal_projector.linear_2.bias": np.zeros(31, np.float32)})
    model = VisionLanguageModel(llava_model_config(folder))
    with pytest.raises(CheckpointError) as info:
        load_llava(model, folder)
    assert f"{folder}/model.safetensors: multi_modal_projector.linear_2.bias has shape [31]" in str(info.value)


@pytest.mark.parametrize("dtype,numpy_dtype", [("F16", np.float16), ("BF16", None)])
def test_a_5x_folder_in_half_precision_and_shards_loads_the_rounded_weights(tmp_path, dtype, numpy_dtype):
    """A transformers 5.x LLaVA folder re-saved as two fp16 / bf16 shards with an index loads the
    same values as the fp32 folder rounded to that precision."""
    from paddle_mm.weights.hf import INDEX_FILE, bf16_bits, write_safetensors

    src = folder_of("pipeline/llava_llama/hf5")
    tensors = read_tensors(src)
    folder = tmp_path / "half"
    os.makedirs(folder)
    for name in os.listdir(src):
        if name.endswith((".json", ".jinja")) and name != INDEX_FILE:
            with open(os.path.join(src, name), "rb") as f, open(folder / name, "wb") as g:
                g.write(f.read())
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        write_safetensors(str(folder / file), {k: tensors[k] for k in part}, {k: dtype for k in part})
    with open(folder / INDEX_FILE, "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: file for file, part in shards.items() for k in part}}, f)

    def rounded(a):
        if numpy_dtype is not None:
            return a.astype(numpy_dtype).astype(np.float32)
        return (bf16_bits(a).astype(np.uint32) << 16).view(np.float32)

    half = llava(str(folder))
    full = llava(src)
    for name, value in half.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), rounded(full.state_dict()[name].numpy()), err_msg=name)
