"""BLIP-2 checkpoints against the numbers of transformers' Blip2ForConditionalGeneration.

The fixture (tools/make_blip2_fixtures.py) holds a tiny random BLIP-2 with a Qwen2 text model
in the Hugging Face layout (fp32, and bf16 sharded) and the reference outputs of transformers
4.57 on CPU. These tests need neither torch nor transformers.
"""
import json
import os
import re
import shutil

import numpy as np
import paddle
import pytest

from paddle_mm.config import LMConfig
from paddle_mm.errors import CheckpointError
from paddle_mm.lm.adapter import run_language_model
from paddle_mm.weights.blip2 import load_blip2
from paddle_mm.weights.hf import read_config, read_tensors, tensor_index, write_safetensors
from paddle_mm.weights.llm import load_language_model
from paddle_mm.weights.tensor_files import load_tensors, save_tensors

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "reference", "blip2")
HF = os.path.join(FIXTURE, "hf")
TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return load_tensors(os.path.join(FIXTURE, "reference.safetensors"))


def outputs(model, ref):
    px, ids = paddle.to_tensor(ref["pixel_values"]), paddle.to_tensor(ref["input_ids"])
    with paddle.no_grad():
        vision = model.vision_tower(px)
        queries = model.multi_modal_projector.query_states(vision)
        _, logits = model(ids, pixel_values=px)
        tokens = model.generate(ids, pixel_values=px, max_new_tokens=16, eos_token_id=None)
    return {"vision_features": vision.numpy(), "qformer_output": queries.numpy(),
            "projected": model.multi_modal_projector.proj(queries).numpy(), "logits": logits.numpy(),
            "greedy_tokens": np.array(tokens)}


@pytest.fixture(scope="module")
def fp32_out(ref):
    return outputs(load_blip2(HF), ref)


@pytest.mark.parametrize("name", ["vision_features", "qformer_output", "projected", "logits"])
def test_hf_checkpoint_matches_transformers(fp32_out, ref, name):
    assert fp32_out[name].shape == ref[name].shape
    assert np.abs(fp32_out[name] - ref[name]).max() <= TOL


def test_greedy_tokens_identical_for_16_steps(fp32_out, ref):
    assert fp32_out["greedy_tokens"].tolist() == ref["greedy_tokens"].tolist()


def test_bf16_sharded_copy_gives_the_same_numbers(fp32_out, ref):
    folder = os.path.join(FIXTURE, "hf_bf16")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    out = outputs(load_blip2(folder), ref)
    # The fixture's weights are bf16-exact, so widening must reproduce the fp32 run bit for bit.
    np.testing.assert_array_equal(out["logits"], fp32_out["logits"])
    assert out["greedy_tokens"].tolist() == ref["greedy_tokens"].tolist()


def test_loading_writes_nothing_to_the_source_folder(tmp_path):
    folder = shutil.copytree(HF, tmp_path / "hf")
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    load_blip2(str(folder))
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_language_model_matches_paddleformers_own_loading(tmp_path):
    """PaddleFormers converts the same LM from the HF layout itself; both must agree exactly."""
    raw = read_config(HF)
    lm_folder = tmp_path / "lm"
    lm_folder.mkdir()
    (lm_folder / "config.json").write_text(json.dumps({**raw["text_config"], "architectures": ["Qwen2ForCausalLM"]}))
    lm_tensors = {k[len("language_model."):]: v for k, v in read_tensors(HF).items() if k.startswith("language_model.")}
    save_tensors(lm_tensors, str(lm_folder / "model.safetensors"))

    theirs = load_language_model(LMConfig(family="qwen2", path=str(lm_folder)))
    ours = load_blip2(HF).language_model
    theirs_sd, ours_sd = theirs.state_dict(), ours.state_dict()
    assert sorted(theirs_sd) == sorted(ours_sd)
    for k in ours_sd:
        np.testing.assert_array_equal(ours_sd[k].numpy(), theirs_sd[k].numpy(), err_msg=k)
    embeds = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 7, 32)).astype("float32"))
    theirs.eval()
    # from_pretrained picks eager attention, our build sdpa (about 1e-5 apart): compare like with like.
    theirs.config._attn_implementation = ours.config._attn_implementation
    with paddle.no_grad():
        a, _ = run_language_model(ours, embeds)
        b, _ = run_language_model(theirs, embeds)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


# ---- bad checkpoints ---------------------------------------------------------------------------
def copy_with(tmp_path, change) -> str:
    """The fixture folder with its tensors changed by `change(dict)`."""
    folder = tmp_path / "bad"
    folder.mkdir()
    shutil.copy(os.path.join(HF, "config.json"), folder / "config.json")
    tensors = read_tensors(HF)
    change(tensors)
    save_tensors(tensors, str(folder / "model.safetensors"))
    return str(folder)


def test_missing_tensor_is_named(tmp_path):
    name = "qformer.encoder.layer.0.crossattention.attention.key.weight"
    folder = copy_with(tmp_path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        load_blip2(folder)


def test_wrong_shape_is_named_with_both_sides(tmp_path):
    name = "vision_model.encoder.layers.1.self_attn.projection.weight"
    folder = copy_with(tmp_path, lambda t: t.__setitem__(name, np.zeros((32, 16), np.float32)))
    with pytest.raises(CheckpointError, match=re.escape(name)) as err:
        load_blip2(folder)
    assert "vision_tower.blocks.1.attn.out_proj.weight" in str(err.value)


def test_unexpected_tensor_is_named(tmp_path):
    folder = copy_with(tmp_path, lambda t: t.__setitem__("qformer.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected 1: qformer\.extra\.weight"):
        load_blip2(folder)


def edit_config(tmp_path, change) -> str:
    folder = shutil.copytree(HF, tmp_path / "edited")
    raw = read_config(str(folder))
    change(raw)
    (folder / "config.json").write_text(json.dumps(raw))
    return str(folder)


def test_unsupported_text_model_names_the_config(tmp_path):
    folder = edit_config(tmp_path, lambda raw: raw["text_config"].update(model_type="gpt2"))
    with pytest.raises(CheckpointError, match=r"config\.json: text model type 'gpt2'"):
        load_blip2(folder)


def test_flan_t5_blip2_is_refused_as_an_encoder_decoder(tmp_path):
    folder = edit_config(tmp_path, lambda raw: raw.update(text_config={"model_type": "t5", "d_model": 32}))
    with pytest.raises(CheckpointError, match=r"config\.json: text model type 't5' \(a Flan-T5 BLIP-2\) is an "
                                              r"encoder-decoder"):
        load_blip2(folder)


def test_checkpoint_without_image_token_needs_one_given(tmp_path, ref):
    folder = edit_config(tmp_path, lambda raw: raw.pop("image_token_index"))
    with pytest.raises(CheckpointError, match="image_token_id"):
        load_blip2(folder)
    assert load_blip2(folder, image_token_id=95).config.image_token_id == 95


# ---- the PaddleMIX layout ----------------------------------------------------------------------
# Written from paddlemix/models/blip2 (eva_vit.py, Qformer.py, modeling.py) independently of the
# tables in paddle_mm.weights.blip2: renames, then every 2-D Linear weight turned to [in, out].
PADDLEMIX_RENAMES = [
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"visual_encoder.blocks.\1.norm\2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"^vision_model\.post_layernorm\.", "Qformer.ln_vision."),
    (r"^query_tokens$", "Qformer.query_tokens"),
    (r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.", r"Qformer.bert.encoder.layer.\1.\2.self."),
    (r"^qformer\.encoder\.", "Qformer.bert.encoder."),
    (r"^language_projection\.", "Qformer.language_projection."),
    (r"^language_model\.model\.", "language_model.qwen2."),
]


def to_paddlemix(hf: dict) -> dict:
    out = {}
    for name, value in hf.items():
        new = name
        for pattern, repl in PADDLEMIX_RENAMES:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        linear = value.ndim == 2 and new.endswith(".weight") and "embed_tokens" not in new
        out[new] = np.ascontiguousarray(value.T) if linear else value
    # A stage-1 leftover the generation model skips by name.
    out["Qformer.bert.embeddings.word_embeddings.weight"] = np.zeros((10, 32), np.float32)
    return out


def paddlemix_folder(tmp_path) -> str:
    folder = tmp_path / "paddlemix"
    (folder / "lm").mkdir(parents=True)
    raw = read_config(HF)
    (folder / "lm" / "config.json").write_text(json.dumps(raw["text_config"]))
    v, q = raw["vision_config"], raw["qformer_config"]
    config = {
        "model_type": "blip-2", "text_config": "lm",
        "vision_config": {"img_size": v["image_size"], "patch_size": v["patch_size"], "embed_dim": v["hidden_size"],
                          "depth": v["num_hidden_layers"], "num_heads": v["num_attention_heads"],
                          "mlp_ratio": v["intermediate_size"] / v["hidden_size"], "qkv_bias": True,
                          "epsilon": v["layer_norm_eps"]},
        "qformer_config": {"hidden_size": q["hidden_size"], "num_hidden_layers": q["num_hidden_layers"],
                           "num_attention_heads": q["num_attention_heads"], "intermediate_size": q["intermediate_size"],
                           "cross_attention_freq": q["cross_attention_frequency"], "layer_norm_eps": q["layer_norm_eps"]},
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_tensors(to_paddlemix(read_tensors(HF)), str(folder / "model.safetensors"))
    return str(folder)


def test_paddlemix_layout_matches_transformers(tmp_path, ref):
    out = outputs(load_blip2(paddlemix_folder(tmp_path), layout="paddlemix", image_token_id=95), ref)
    assert np.abs(out["logits"] - ref["logits"]).max() <= TOL
    assert out["greedy_tokens"].tolist() == ref["greedy_tokens"].tolist()


def test_pdparams_is_read_only_when_named(tmp_path, ref):
    folder = paddlemix_folder(tmp_path)
    tensors = load_tensors(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    paddle.save({k: paddle.to_tensor(v) for k, v in tensors.items()}, os.path.join(folder, "model_state.pdparams"))
    with pytest.raises(CheckpointError, match="weights_format='pdparams'"):
        load_blip2(folder, layout="paddlemix", image_token_id=95)
    model = load_blip2(folder, layout="paddlemix", weights_format="pdparams", image_token_id=95)
    px, ids = paddle.to_tensor(ref["pixel_values"]), paddle.to_tensor(ref["input_ids"])
    with paddle.no_grad():
        _, logits = model(ids, pixel_values=px)
    assert np.abs(logits.numpy() - ref["logits"]).max() <= TOL


def test_tied_checkpoint_without_lm_head_takes_the_embedding(tmp_path):
    folder = edit_config(tmp_path, lambda raw: raw["text_config"].update(tie_word_embeddings=True))
    tensors = read_tensors(folder)
    embed = tensors["language_model.model.embed_tokens.weight"]
    del tensors["language_model.lm_head.weight"]
    os.remove(os.path.join(folder, "model.safetensors"))
    save_tensors(tensors, os.path.join(folder, "model.safetensors"))
    lm = load_blip2(folder).language_model
    np.testing.assert_array_equal(lm.lm_head.weight.numpy(), embed)


# ---- the BLIP-2 style recipes ------------------------------------------------------------------
RECIPES = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "blip2")
# Qwen2-1.5B-Instruct's config.json, as the text_config of a BLIP-2 checkpoint built on it.
QWEN2_1_5B = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
              "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
              "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": True, "use_sliding_window": False, "hidden_act": "silu",
              "bos_token_id": 151643, "eos_token_id": 151645}


@pytest.mark.parametrize("stage", ["pretrain", "instruct"])
def test_blip2_recipes_describe_the_model_load_blip2_builds(stage):
    from dataclasses import replace

    from paddle_mm.config import Recipe
    from paddle_mm.recipe import load_recipe
    from paddle_mm.weights.blip2 import model_config_from_hf

    recipe = load_recipe(os.path.join(RECIPES, f"{stage}.yaml"), Recipe)
    # A full-size BLIP-2 config.json: its vision and Q-Former sections left at transformers' defaults.
    loaded, _, _ = model_config_from_hf({"model_type": "blip-2", "text_config": QWEN2_1_5B, "image_token_index": 0},
                                        "blip2 config.json")
    model = recipe.model
    assert model.vision == loaded.vision
    assert model.projector.qformer == loaded.projector.qformer and model.projector.type == "qformer"
    assert replace(model.lm, attn_implementation="sdpa") == replace(loaded.lm, attn_implementation="sdpa")
    assert recipe.train.stage == stage and recipe.train.trainable == ["multi_modal_projector"]
    local = [recipe.train.init_from, recipe.data.tokenizer] + [spec.path for spec in recipe.data.train]
    assert all(p and not os.path.isabs(p) and "://" not in p for p in local)


def test_paddlemix_folder_converts_and_exports_to_the_hugging_face_tensors(tmp_path, ref):
    from paddle_mm.cli import main

    folder = paddlemix_folder(tmp_path)
    assert main(["convert", "--from", "paddlemix", "--family", "blip2", "--image-token-id", "95", folder,
                 str(tmp_path / "pm")]) == 0
    assert main(["export", str(tmp_path / "pm"), str(tmp_path / "hf")]) == 0
    exported, original = read_tensors(str(tmp_path / "hf")), read_tensors(HF)
    assert sorted(exported) == sorted(original)
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    out = outputs(load_blip2(str(tmp_path / "hf")), ref)
    assert np.abs(out["logits"] - ref["logits"]).max() <= TOL
    assert out["greedy_tokens"].tolist() == ref["greedy_tokens"].tolist()


def test_checkpoint_without_qkv_biases_loads_zeros_and_exports_none():
    from paddle_mm.weights.blip2 import join_for_export, split_for_mapping

    tensors = {k: v for k, v in read_tensors(HF).items() if not k.endswith("self_attn.qkv.bias")}
    split = split_for_mapping(tensors, "hf", qkv_bias=False, source="x")
    weight = tensors["vision_model.encoder.layers.0.self_attn.qkv.weight"]
    np.testing.assert_array_equal(split["vision_model.encoder.layers.0.self_attn.qkv.weight[k]"], weight[32:64])
    assert not np.any(split["vision_model.encoder.layers.0.self_attn.qkv.bias[v]"])
    back = join_for_export(split, "hf", qkv_bias=False, source="x")
    assert sorted(back) == sorted(tensors)
    for name in tensors:
        np.testing.assert_array_equal(back[name], tensors[name], err_msg=name)
    split["vision_model.encoder.layers.1.self_attn.qkv.bias[q]"] += 1.0  # trained here: cannot be dropped
    with pytest.raises(CheckpointError, match=r"qkv\.bias is not zero"):
        join_for_export(split, "hf", qkv_bias=False, source="x")


def test_a_qformer_on_a_query_grid_is_not_exported_as_blip2():
    from paddle_mm.config import ModelConfig, ProjectorConfig, QFormerConfig
    from paddle_mm.weights.blip2 import hf_blip2_config

    cfg = ModelConfig(projector=ProjectorConfig(type="qformer", qformer=QFormerConfig(
        num_queries=9, cross_attention_locality=2.0)))
    with pytest.raises(CheckpointError, match=r"run/config\.json: cannot be written as a transformers BLIP-2: .*"
                                              r"qformer\.cross_attention_locality"):
        hf_blip2_config(cfg, qkv_bias=True, source="run/config.json")


# ---- BLIP-2 with an OPT text model (the Salesforce blip2-opt-* checkpoints) ----------------------
# tools/make_blip2_fixtures.py --opt, once with transformers 4.57 (hf457: fp32, one file) and once
# with 5.24 (hf5: bf16, two shards): the checkpoint, its processor files, the two images and the
# processor's input_ids / attention_mask / pixel_values with the logits and 16 greedy tokens.
OPT_TAGS = ("hf457", "hf5")
OPT_FIXTURE = {tag: os.path.join(FIXTURE, "..", "blip2_opt", tag) for tag in OPT_TAGS}


def opt_reference(tag: str) -> dict:
    return load_tensors(os.path.join(OPT_FIXTURE[tag], "reference.safetensors"))


def opt_outputs(model, ref):
    ids, mask = paddle.to_tensor(ref["input_ids"]), paddle.to_tensor(ref["attention_mask"])
    px = paddle.to_tensor(ref["pixel_values"])
    with paddle.no_grad():
        _, logits = model(ids, attention_mask=mask, pixel_values=px)
        tokens = model.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=16, eos_token_id=None)
    return logits.numpy(), tokens


@pytest.fixture(scope="module")
def opt_hf457_out():
    return opt_outputs(load_blip2(OPT_FIXTURE["hf457"]), opt_reference("hf457"))


def assert_opt_matches(logits, tokens, ref):
    real = ref["attention_mask"].astype(bool)  # padded positions' outputs mean nothing
    assert not real.all()  # the processor left-padded the shorter prompt (between the image tokens and the text)
    assert np.abs(logits[real] - ref["logits"][real]).max() <= TOL
    assert tokens == ref["greedy_tokens"].tolist()


@pytest.mark.parametrize("tag", OPT_TAGS)
def test_blip2_opt_matches_transformers(tag, opt_hf457_out):
    ref = opt_reference(tag)
    if tag == "hf457":
        logits, tokens = opt_hf457_out
    else:
        model = load_blip2(OPT_FIXTURE[tag])
        assert type(model.language_model).__name__ == "OPTForCausalLM" and model.config.lm.tie_word_embeddings
        logits, tokens = opt_outputs(model, ref)
    assert_opt_matches(logits, tokens, ref)


def test_blip2_opt_saves_of_4_57_and_5_differ_in_config_keys_only():
    old, new = tensor_index(OPT_FIXTURE["hf457"]), tensor_index(OPT_FIXTURE["hf5"])
    assert sorted(old) == sorted(new)
    assert "language_model.lm_head.weight" not in old  # tied: neither version writes it
    assert {d for _, d in old.values()} == {"F32"} and {d for _, d in new.values()} == {"BF16"}
    assert os.path.isfile(os.path.join(OPT_FIXTURE["hf5"], "model.safetensors.index.json"))
    text_old, text_new = (read_config(OPT_FIXTURE[t])["text_config"] for t in OPT_TAGS)
    assert "tie_word_embeddings" not in text_old and text_new["tie_word_embeddings"] is True
    assert load_blip2(OPT_FIXTURE["hf457"]).config == load_blip2(OPT_FIXTURE["hf5"]).config


def test_blip2_opt_fixture_holds_the_processed_images():
    from PIL import Image

    sizes = [Image.open(os.path.join(OPT_FIXTURE["hf457"], f"image_{k}.png")).size for k in range(2)]
    assert sizes == [(40, 24), (17, 31)]
    assert opt_reference("hf457")["pixel_values"].shape == (2, 3, 16, 16)


def test_blip2_opt_bf16_copy_gives_the_same_numbers(tmp_path, opt_hf457_out):
    """The fixture's weights are bf16-exact, so a bf16 copy must give the fp32 logits bit for bit."""
    folder = tmp_path / "bf16"
    folder.mkdir()
    shutil.copy(os.path.join(OPT_FIXTURE["hf457"], "config.json"), folder / "config.json")
    tensors = read_tensors(OPT_FIXTURE["hf457"])
    write_safetensors(str(folder / "model.safetensors"), tensors, {k: "BF16" for k in tensors})
    logits, tokens = opt_outputs(load_blip2(str(folder)), opt_reference("hf457"))
    np.testing.assert_array_equal(logits, opt_hf457_out[0])
    assert tokens == opt_hf457_out[1]


def test_blip2_opt_checkpoint_that_still_holds_the_tied_head(tmp_path, opt_hf457_out):
    """Older saves wrote language_model.lm_head.weight; it is the embedding (transformers ties over it),
    so loading skips it and convert / export give it back."""
    from paddle_mm.cli import main

    folder = shutil.copytree(OPT_FIXTURE["hf457"], tmp_path / "with_head")
    tensors = read_tensors(str(folder))
    tensors["language_model.lm_head.weight"] = tensors["language_model.model.decoder.embed_tokens.weight"].copy()
    save_tensors(tensors, str(folder / "model.safetensors"))
    logits, _ = opt_outputs(load_blip2(str(folder)), opt_reference("hf457"))
    np.testing.assert_array_equal(logits, opt_hf457_out[0])
    assert main(["convert", "--family", "blip2", str(folder), str(tmp_path / "pm")]) == 0
    assert main(["export", str(tmp_path / "pm"), str(tmp_path / "hf")]) == 0
    exported = read_tensors(str(tmp_path / "hf"))
    assert sorted(exported) == sorted(tensors)
    for name in tensors:
        np.testing.assert_array_equal(exported[name], tensors[name], err_msg=name)


def test_converted_blip2_opt_folder_is_a_run_folder_with_the_reference_numbers(tmp_path):
    from paddle_mm.run_folder import load_run
    from paddle_mm.weights.convert import convert

    folder = convert(OPT_FIXTURE["hf457"], str(tmp_path / "pm"), "blip2")
    _, cfg, tokenizer, model = load_run(folder)  # the tied head is the embedding, stored once
    assert cfg.lm.family == "opt" and cfg.image_token_id == tokenizer.image_token_id
    ref = opt_reference("hf457")
    assert_opt_matches(*opt_outputs(model, ref), ref)


def test_blip2_opt_in_the_paddlemix_layout_is_refused():
    from paddle_mm.weights.blip2 import blip2_table

    with pytest.raises(CheckpointError, match="OPT text model: only the Hugging Face layout"):
        blip2_table("paddlemix", LMConfig(family="opt"))
