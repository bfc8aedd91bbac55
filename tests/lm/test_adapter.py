import json
import os

import numpy as np
import paddle
import pytest

from paddle_mm.config import LMConfig
from paddle_mm.errors import CheckpointError
from paddle_mm.lm.adapter import build_language_model, position_ids_from_mask, run_language_model
from paddle_mm.weights.llm import lm_config_from_folder, load_language_model, resolved_lm_config

HIDDEN, VOCAB = 32, 64


def tiny_config(family: str = "qwen2", **overrides) -> LMConfig:
    fields = dict(family=family, vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=4 if family == "opt" else 2)  # OPT: a key/value head per query head
    fields.update(overrides)
    return LMConfig(**fields)


def make_lm(family: str = "qwen2", seed: int = 0, **overrides):
    paddle.seed(seed)
    lm = build_language_model(tiny_config(family, **overrides))
    lm.eval()
    return lm


def embeds(b: int, length: int, seed: int = 1) -> paddle.Tensor:
    return paddle.to_tensor(np.random.default_rng(seed).standard_normal((b, length, HIDDEN)).astype("float32"))


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def cached_logits(lm, x, mask, prefix: int) -> np.ndarray:
    """Run `prefix` positions at once, then one position per step through the cache."""
    with paddle.no_grad():
        logits, cache = run_language_model(lm, x[:, :prefix], mask[:, :prefix], use_cache=True)
        steps = [logits]
        for t in range(prefix, x.shape[1]):
            logits, cache = run_language_model(lm, x[:, t:t + 1], mask[:, :t + 1], cache, use_cache=True)
            steps.append(logits)
    return paddle.concat(steps, axis=1).numpy()


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "opt"])
def test_build_and_forward_inputs_embeds(family):
    lm = make_lm(family)
    assert type(lm).__name__ == {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                                 "qwen3": "Qwen3ForCausalLM", "opt": "OPTForCausalLM"}[family]
    assert lm.get_input_embeddings().weight.shape == [VOCAB, HIDDEN]
    with paddle.no_grad():
        logits, cache = run_language_model(lm, embeds(2, 5))
    assert logits.shape == [2, 5, VOCAB]
    assert cache is None
    assert np.isfinite(logits.numpy()).all()


def test_causal_prefix_logits_do_not_depend_on_later_positions():
    lm = make_lm()
    x = embeds(1, 6)
    y = paddle.concat([x[:, :4], embeds(1, 2, seed=9)], axis=1)
    with paddle.no_grad():
        lx, _ = run_language_model(lm, x)
        ly, _ = run_language_model(lm, y)
    assert max_diff(lx[:, :4], ly[:, :4]) < 1e-5
    assert max_diff(lx[:, 4:], ly[:, 4:]) > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["qwen2", "llama", "opt"])
def test_cached_decoding_equals_full_sequence(family, attn):
    lm = make_lm(family, attn_implementation=attn)
    x = embeds(2, 7)
    mask = paddle.ones([2, 7], dtype="int64")
    with paddle.no_grad():
        full, _ = run_language_model(lm, x, mask)
    assert max_diff(cached_logits(lm, x, mask, prefix=3), full) < 1e-4
    assert max_diff(cached_logits(lm, x, mask, prefix=1), full) < 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["qwen2", "llama", "opt"])
def test_left_padding_matches_unpadded_row(family, attn):
    lm = make_lm(family, attn_implementation=attn)
    pad, n = 3, 6
    real = embeds(1, n)
    other = embeds(1, pad + n, seed=2)
    x = paddle.concat([paddle.concat([embeds(1, pad, seed=5), real], axis=1), other], axis=0)  # row 0 left-padded
    mask = paddle.to_tensor([[0] * pad + [1] * n, [1] * (pad + n)], dtype="int64")
    with paddle.no_grad():
        single, _ = run_language_model(lm, real)
        other_alone, _ = run_language_model(lm, other)
        batch, _ = run_language_model(lm, x, mask)
    assert max_diff(batch[0, pad:], single[0]) < 1e-4
    assert max_diff(batch[1], other_alone[0]) < 1e-4
    cached = cached_logits(lm, x, mask, prefix=pad + 2)
    assert max_diff(cached[0, pad:], single.numpy()[0]) < 1e-4
    assert max_diff(cached[1], other_alone.numpy()[0]) < 1e-4


@pytest.mark.parametrize("family", ["qwen2", "opt"])
def test_cache_length_grows_by_one_per_step(family):
    lm = make_lm(family)
    x = embeds(1, 4)
    with paddle.no_grad():
        _, cache = run_language_model(lm, x[:, :3], use_cache=True)
        assert cache.get_seq_length() == 3
        _, cache = run_language_model(lm, x[:, 3:], past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 4


def test_position_ids_from_mask_hand_example():
    mask = paddle.to_tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]], dtype="int64")
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 1, 2]]
    assert position_ids_from_mask(mask, past_length=3).tolist() == [[1, 2], [3, 4], [1, 2]]
    assert position_ids_from_mask(mask.astype("bool")).dtype == paddle.int64


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_save_pretrained_then_load_from_path(family, tmp_path):
    lm = make_lm(family)
    folder = str(tmp_path / family)
    lm.save_pretrained(folder)
    loaded = load_language_model(LMConfig(family=family, path=folder))
    loaded.eval()
    x = embeds(2, 5)
    with paddle.no_grad():
        a, _ = run_language_model(lm, x)
        b, _ = run_language_model(loaded, x)
    assert max_diff(a, b) < 1e-5
    cfg = lm_config_from_folder(folder)
    assert (cfg.family, cfg.path, cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) \
        == (family, folder, VOCAB, HIDDEN, 2, 4, 2)


def test_lm_config_from_folder_reads_config_json(tmp_path):
    raw = {"model_type": "llama", "vocab_size": 100, "hidden_size": 48, "intermediate_size": 96,
           "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 3,
           "max_position_embeddings": 512, "rope_theta": 500000, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = lm_config_from_folder(str(tmp_path))
    assert cfg == LMConfig(family="llama", path=str(tmp_path), vocab_size=100, hidden_size=48,
                           intermediate_size=96, num_layers=3, num_heads=6, num_kv_heads=3,
                           max_position_embeddings=512, rope_theta=500000.0, rms_norm_eps=1e-5,
                           tie_word_embeddings=True)
    assert isinstance(cfg.rope_theta, float)


def test_lm_config_from_folder_defaults_kv_heads_to_heads(tmp_path):
    raw = {"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = lm_config_from_folder(str(tmp_path))
    assert cfg.num_kv_heads == 2
    assert resolved_lm_config(LMConfig(path=str(tmp_path), attn_implementation="eager")) == \
        LMConfig(family="qwen2", path=str(tmp_path), vocab_size=10, hidden_size=8, intermediate_size=16,
                 num_layers=1, num_heads=2, num_kv_heads=2, attn_implementation="eager")


def test_folder_without_config_json_raises(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json") as info:
        lm_config_from_folder(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_unknown_model_type_raises_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(CheckpointError, match="'gpt2'") as info:
        lm_config_from_folder(str(tmp_path))
    assert os.path.join(str(tmp_path), "config.json") in str(info.value)


def test_build_from_missing_folder_raises(tmp_path):
    missing = str(tmp_path / "absent")
    with pytest.raises(CheckpointError) as info:
        load_language_model(LMConfig(family="qwen2", path=missing))
    assert missing in str(info.value)


def test_pickle_weights_are_refused_never_unpickled(tmp_path, monkeypatch):
    lm = make_lm("qwen2")
    folder = str(tmp_path / "pickled")
    lm.save_pretrained(folder)
    for name in os.listdir(folder):  # the same weights, rewritten in Paddle's pickle format
        if name != "config.json":
            os.remove(os.path.join(folder, name))
    paddle.save(lm.state_dict(), os.path.join(folder, "model_state.pdparams"))
    import pickle

    def no_unpickling(*a, **k):
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(paddle, "load", no_unpickling)
    with pytest.raises(CheckpointError, match=r"no safetensors weights.*model_state.pdparams.*does not unpickle"):
        load_language_model(LMConfig(family="qwen2", path=folder))
