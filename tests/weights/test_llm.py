import json
import os
from dataclasses import replace

import numpy as np
import paddle
import pytest
from reference_fixtures import checkpoint_copy, folder_of, max_diff, reference, snapshot
from safetensors.numpy import save_file

from paddle_mm.config import LMConfig
from paddle_mm.errors import CheckpointError
from paddle_mm.lm.adapter import _classes, build_language_model, run_language_model
from paddle_mm.lm.decoding import decode
from paddle_mm.weights.hf import read_tensors
from paddle_mm.weights.llm import lm_config_from_folder, load_causal_lm, load_language_model

CASES = [("qwen2", "qwen2"), ("qwen2", "qwen2/bf16"), ("llama", "llama")]  # (family, fixture)


def logits_and_greedy(lm, input_ids: np.ndarray):
    ids = paddle.to_tensor(input_ids)
    with paddle.no_grad():
        embeds = lm.get_input_embeddings()(ids)
        logits, _ = run_language_model(lm, embeds)
        greedy = decode(lm, embeds, paddle.ones(ids.shape, dtype="int64"), 16, eos_token_id=None)
    return logits.numpy(), greedy


@pytest.mark.parametrize("family,fixture", CASES)
def test_logits_and_greedy_tokens_match_transformers(family, fixture):
    ref = reference(fixture)
    before = snapshot(folder_of(fixture))
    lm = load_language_model(LMConfig(family=family, path=folder_of(fixture)))
    lm.eval()
    logits, greedy = logits_and_greedy(lm, ref["input_ids"])
    assert max_diff(logits, ref["logits"]) <= 1e-4
    assert greedy == ref["greedy"].tolist()
    assert snapshot(folder_of(fixture)) == before  # nothing written into the source folder


@pytest.mark.parametrize("family,fixture", CASES)
def test_same_logits_as_paddleformers_own_hf_loading(family, fixture, tmp_path):
    """PaddleFormers' from_pretrained converts HF folders by its own rules: a second opinion.

    It writes a metadata file into the folder it reads, so it gets a copy.
    """
    ref = reference(fixture)
    copy = checkpoint_copy(fixture, tmp_path / "copy")
    _, model_cls = _classes(family)
    theirs = model_cls.from_pretrained(copy, dtype="float32")
    ours = load_language_model(LMConfig(family=family, path=folder_of(fixture)))
    theirs.eval()
    ours.eval()
    assert max_diff(logits_and_greedy(ours, ref["input_ids"])[0], logits_and_greedy(theirs, ref["input_ids"])[0]) <= 1e-4
    theirs_state = theirs.state_dict()
    for name, value in ours.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), theirs_state[name].numpy(), err_msg=name)


def test_tied_embeddings_have_no_lm_head_on_disk_and_share_the_parameter():
    assert "lm_head.weight" not in read_tensors(folder_of("qwen2"))
    lm = load_language_model(LMConfig(family="qwen2", path=folder_of("qwen2")))
    np.testing.assert_array_equal(lm.lm_head.weight.numpy(), read_tensors(folder_of("qwen2"))["model.embed_tokens.weight"])


def _with_tensors(tmp_path, fixture: str, edit) -> str:
    folder = str(tmp_path / "edited")
    os.makedirs(folder)
    with open(os.path.join(folder_of(fixture), "config.json")) as f:
        config = f.read()
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(config)
    tensors = read_tensors(folder_of(fixture))
    edit(tensors)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    return folder


def test_missing_tensor_is_listed_or_reported_when_not_strict(tmp_path):
    folder = _with_tensors(tmp_path, "llama", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1: model\.layers\.1\.mlp\.up_proj\.weight") as info:
        load_language_model(LMConfig(family="llama", path=folder))
    assert folder in str(info.value)
    lm = build_language_model(replace(lm_config_from_folder(folder), path=""))
    assert load_causal_lm(lm, folder, strict=False) == ["model.layers.1.mlp.up_proj.weight"]


def test_old_rotary_buffers_are_ignored_by_name_other_extras_are_not(tmp_path):
    folder = _with_tensors(tmp_path, "llama", lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
    load_language_model(LMConfig(family="llama", path=folder))
    folder = _with_tensors(tmp_path / "b", "llama", lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.ones(32, np.float32)}))
    with pytest.raises(CheckpointError, match=r"not in the llama.* mapping table \(unexpected 1: model\.layers\.0\.self_attn\.q_proj\.bias\)"):
        load_language_model(LMConfig(family="llama", path=folder))


def test_shape_mismatch_names_the_shard_and_the_tensor(tmp_path):
    folder = checkpoint_copy("llama", tmp_path / "llama")
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"]["model.layers.0.mlp.gate_proj.weight"]
    lm = build_language_model(replace(lm_config_from_folder(folder), path="", intermediate_size=48))
    with pytest.raises(CheckpointError) as info:
        load_causal_lm(lm, folder)
    assert f"{os.path.join(folder, shard)}: model.layers.0.mlp.gate_proj.weight has shape [64, 32]" in str(info.value)


def test_config_the_lm_config_cannot_carry_is_refused(tmp_path):
    folder = checkpoint_copy("llama", tmp_path / "llama")
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        raw = json.load(f)
    with open(path, "w") as f:
        json.dump({**raw, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, f)
    with pytest.raises(CheckpointError, match="config.json: rope_scaling=.* is not supported"):
        lm_config_from_folder(folder)


@pytest.mark.parametrize("change,message", [
    ({"use_sliding_window": True}, "use_sliding_window=True is not supported"),
    ({"head_dim": 64}, "head_dim=64 is not supported"),
    ({"hidden_size": None}, "the language model config has no 'hidden_size'"),
])
def test_config_fields_are_checked_before_building(change, message):
    from paddle_mm.weights.llm import lm_config_from_hf

    raw = {"model_type": "qwen2", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(CheckpointError, match=f"lm/config.json: {message}"):
        lm_config_from_hf(raw, "", "lm/config.json")
    fine = {**raw, "hidden_size": 32, "use_sliding_window": False, "head_dim": 8}  # 8 = 32 / 4 heads
    assert lm_config_from_hf(fine, "", "lm/config.json").num_heads == 4
