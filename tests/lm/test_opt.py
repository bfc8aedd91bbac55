"""lm/opt.py, our OPT decoder, against transformers' OPTForCausalLM and through the adapter's uses.

The transformers numbers come from the text model of the BLIP-2 fixtures in
tests/fixtures/reference/blip2_opt (tools/make_blip2_fixtures.py --opt): the logits of a
left-padded two-row batch and 16 greedy tokens of generate(), saved by transformers 4.57 and
5.24. No torch here.
"""
import json
import os

import numpy as np
import paddle
import pytest
from reference_fixtures import folder_of, max_diff

from paddle_mm.config import LMConfig
from paddle_mm.errors import CheckpointError
from paddle_mm.lm.adapter import build_language_model, enable_recompute, run_language_model
from paddle_mm.lm.decoding import beam_search, decode
from paddle_mm.weights.hf import read_config, read_tensors
from paddle_mm.weights.llm import lm_config_from_hf, load_language_model
from paddle_mm.weights.tensor_files import load_tensors, save_tensors

HIDDEN, VOCAB = 32, 64
TOL = 1e-4


def tiny(seed: int = 0, **overrides):
    fields = dict(family="opt", vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=4, max_position_embeddings=32, tie_word_embeddings=True)
    fields.update(overrides)
    paddle.seed(seed)
    lm = build_language_model(LMConfig(**fields))
    lm.eval()
    return lm


def embeds(b: int, length: int, seed: int = 1) -> paddle.Tensor:
    return paddle.to_tensor(np.random.default_rng(seed).standard_normal((b, length, HIDDEN)).astype("float32"))


def opt_folder(tmp_path, tag: str) -> str:
    """The OPT text model of a BLIP-2 fixture as an OPTForCausalLM folder (its config and language_model.* tensors)."""
    blip2 = folder_of(f"blip2_opt/{tag}")
    folder = tmp_path / f"opt-{tag}"
    folder.mkdir()
    text = read_config(blip2)["text_config"]
    (folder / "config.json").write_text(json.dumps({**text, "architectures": ["OPTForCausalLM"]}))
    tensors = {k[len("language_model."):]: v for k, v in read_tensors(blip2).items() if k.startswith("language_model.")}
    save_tensors(tensors, str(folder / "model.safetensors"))
    return str(folder)


@pytest.mark.parametrize("tag", ["hf457", "hf5"])
def test_opt_matches_transformers_logits_and_greedy_tokens(tmp_path, tag):
    ref = load_tensors(os.path.join(folder_of(f"blip2_opt/{tag}"), "reference.safetensors"))
    lm = load_language_model(LMConfig(family="opt", path=opt_folder(tmp_path, tag)))
    lm.eval()
    ids, mask = paddle.to_tensor(ref["lm_input_ids"]), paddle.to_tensor(ref["lm_attention_mask"])
    real = ref["lm_attention_mask"].astype(bool)
    assert not real.all()  # the second row is left-padded
    with paddle.no_grad():
        x = lm.get_input_embeddings()(ids)
        logits, _ = run_language_model(lm, x, mask)
        tokens = decode(lm, x, mask, max_new_tokens=16, eos_token_id=None)
    # Padded positions are compared nowhere: their outputs mean nothing (and 4.57 and 5.x differ there).
    assert max_diff(logits.numpy()[real], ref["lm_logits"][real]) <= TOL
    assert tokens == ref["lm_greedy_tokens"].tolist()


def test_lm_head_is_the_token_embedding_when_tied():
    lm = tiny()
    assert lm.lm_head.weight.name == lm.get_input_embeddings().weight.name
    assert len({p.name for p in lm.parameters()}) == len(list(lm.parameters()))  # counted once
    untied = tiny(tie_word_embeddings=False)
    assert untied.lm_head.weight.name != untied.get_input_embeddings().weight.name


def test_positions_count_real_tokens_from_offset_two():
    """Position k of a row reads row k + 2 of the table: zeroing rows 0, 1 changes nothing."""
    lm = tiny()
    x = embeds(1, 5)
    with paddle.no_grad():
        before, _ = run_language_model(lm, x)
        table = lm.model.decoder.embed_positions.weight
        table.set_value(np.concatenate([np.zeros((2, HIDDEN), np.float32), table.numpy()[2:]]))
        after, _ = run_language_model(lm, x)
    np.testing.assert_array_equal(before.numpy(), after.numpy())


def test_a_position_past_the_table_is_an_error():
    lm = tiny(max_position_embeddings=4)
    with pytest.raises(ValueError, match="max_position_embeddings 4"):
        run_language_model(lm, embeds(1, 5))


def test_beam_search_over_the_cache():
    lm = tiny()
    x, mask = embeds(2, 4), paddle.to_tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype="int64")
    with paddle.no_grad():
        greedy = decode(lm, x, mask, max_new_tokens=6, eos_token_id=None)
        assert beam_search(lm, x, mask, 6, None, num_beams=1) == greedy
        beams = beam_search(lm, x, mask, 6, None, num_beams=3)  # reorders the cache every step
    assert [len(b) for b in beams] == [6, 6]


def test_packed_rows_see_only_their_own_sample():
    """The dense mask built from attn_mask_startend_row_indices with restarting positions."""
    lm = tiny()
    a, b = embeds(1, 3, seed=2), embeds(1, 4, seed=3)
    packed = paddle.concat([a, b], axis=1)
    rows = paddle.to_tensor([3, 3, 3, 7, 7, 7, 7], dtype="int32").reshape([1, 1, 7, 1])
    positions = paddle.to_tensor([[0, 1, 2, 0, 1, 2, 3]], dtype="int64")
    with paddle.no_grad():
        logits, _ = run_language_model(lm, packed, position_ids=positions, attn_mask_startend_row_indices=rows)
        alone_a, _ = run_language_model(lm, a)
        alone_b, _ = run_language_model(lm, b)
    assert max_diff(logits[:, :3], alone_a) < 1e-5
    assert max_diff(logits[:, 3:], alone_b) < 1e-5


def test_recompute_gives_the_same_gradients():
    grads = []
    for recompute in (False, True):
        lm = tiny()
        lm.train()
        if recompute:
            enable_recompute(lm)
        x = embeds(2, 5)
        x.stop_gradient = False
        logits, _ = run_language_model(lm, x)
        logits.square().mean().backward()
        grads.append(lm.model.decoder.layers[0].fc1.weight.grad.numpy())
    assert np.abs(grads[0]).max() > 0
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_lora_wraps_the_attention_projections():
    from paddle_mm.config import LoraConfig
    from paddle_mm.lm.lora import add_lora

    lm = tiny()
    trainable = add_lora(lm, LoraConfig(enabled=True, r=2, alpha=4, target_modules=["q_proj", "v_proj", "out_proj"]))
    assert len(trainable) == 2 * 3 * 2  # A and B, three projections, two layers
    names = {n for n, p in lm.named_parameters() if not p.stop_gradient}
    assert "model.decoder.layers.1.self_attn.out_proj.lora_A" in names
    with paddle.no_grad():
        logits, _ = run_language_model(lm, embeds(1, 3))
    assert logits.shape == [1, 3, VOCAB]


@pytest.mark.parametrize("field,value,needle", [
    ("do_layer_norm_before", False, "do_layer_norm_before=False"),
    ("word_embed_proj_dim", 16, "word_embed_proj_dim=16 != hidden_size=32"),
    ("activation_function", "gelu", "activation_function='gelu'"),
    ("_remove_final_layer_norm", True, "_remove_final_layer_norm=True"),
])
def test_configs_opt_cannot_build_are_refused_by_field(field, value, needle):
    raw = {"model_type": "opt", "vocab_size": 64, "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "word_embed_proj_dim": 32}
    assert lm_config_from_hf(raw, "", "lm/config.json") == LMConfig(
        family="opt", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
        tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match=r"lm/config\.json: .*" + needle.replace("(", r"\(")):
        lm_config_from_hf({**raw, field: value}, "", "lm/config.json")


def test_build_refuses_what_opt_has_not():
    with pytest.raises(ValueError, match="flashmask"):
        tiny(attn_implementation="flashmask")
    with pytest.raises(ValueError, match="num_kv_heads 2"):
        tiny(num_kv_heads=2)
