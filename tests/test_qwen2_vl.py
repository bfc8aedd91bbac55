"""Qwen2VLModel (model.py) from the folders transformers 4.57 and 5.x saved: prompt -> logits and greedy
tokens as transformers computed them (tools/make_qwen2_vl_fixtures.py), through the model and
through `paddle-mm infer`."""
import functools

import numpy as np
import paddle
import pytest
from reference_fixtures import MROPE_RULE, QWEN2_VL_FOLDERS, max_diff, qwen2_vl_cases, qwen2_vl_folder, reference

from paddle_mm.cli import main
from paddle_mm.data.qwen2_vl import Qwen2VLProcessor, encode_conversation, settings_from_folder
from paddle_mm.data.tokenizer import IMAGE_TOKEN, Tokenizer
from paddle_mm.model import mean_nll


@functools.lru_cache(maxsize=None)
def _loaded(model, tag):
    from paddle_mm.model import Qwen2VLModel
    from paddle_mm.weights.qwen2_vl import load_qwen2_vl, qwen2_vl_model_config

    folder = qwen2_vl_folder(model, tag)
    tokenizer = Tokenizer.load(folder)
    m = Qwen2VLModel(qwen2_vl_model_config(folder, MROPE_RULE[tag]), tokenizer.special_ids())
    assert load_qwen2_vl(m, folder) == []
    m.eval()
    proc = Qwen2VLProcessor(settings_from_folder(folder))
    proc.settings.fps = 1.0  # the fixtures' clips: 1 frame a second (2 s a temporal patch, Qwen2.5-VL reads it)
    return m, tokenizer, proc


def _inputs(model, tag, case):
    m, tokenizer, proc = _loaded(model, tag)
    c = qwen2_vl_cases(model, tag)[case]
    media = c["images"] + c["frames"]
    videos = [(len(c["images"]), len(c["frames"]))] if c["frames"] else []
    enc = encode_conversation(tokenizer, proc, [("user", f"{IMAGE_TOKEN}\n" * len(media) + c["question"])], media,
                              videos, image_pad_id=m.config.image_token_id, video_pad_id=m.config.video_token_id,
                              add_generation_prompt=True)
    kw = {k: paddle.to_tensor(enc[k]) for k in ("pixel_values", "pixel_values_videos") if enc[k] is not None}
    kw.update(image_grid_thw=enc["image_grid_thw"], video_grid_thw=enc["video_grid_thw"],
              second_per_grid_ts=enc["second_per_grid_ts"] or None)
    return enc["input_ids"], kw


@pytest.mark.parametrize("model,tag", QWEN2_VL_FOLDERS)
def test_logits_and_greedy_tokens_match_transformers(model, tag):
    m = _loaded(model, tag)[0]
    ref = reference(f"qwen2_vl/{model}/{tag}")
    for case in qwen2_vl_cases(model, tag):
        ids, kw = _inputs(model, tag, case)
        x = paddle.to_tensor([ids])
        with paddle.no_grad():
            _, logits = m(x, **kw)
        assert max_diff(logits.numpy()[0][ref[f"{case}.logit_rows"]], ref[f"{case}.logits"]) <= 1e-4, case
        assert m.generate(x, max_new_tokens=16, **kw)[0] == ref[f"{case}.greedy"].tolist(), case


def test_a_batch_of_pictures_of_different_sizes_decodes_each_row_as_alone():
    """Left padding: each row's M-RoPE positions skip it, and its delta carries decoding on."""
    m = _loaded("qwen2_vl", "hf457")[0]
    ref = reference("qwen2_vl/qwen2_vl/hf457")
    wide, kw_wide = _inputs("qwen2_vl", "hf457", "wide")
    both, kw_both = _inputs("qwen2_vl", "hf457", "image_and_video")
    length = max(len(wide), len(both))
    ids = paddle.to_tensor([[0] * (length - len(r)) + r for r in (wide, both)])
    mask = paddle.to_tensor([[0] * (length - len(r)) + [1] * len(r) for r in (wide, both)])
    out = m.generate(ids, mask, paddle.concat([kw_wide["pixel_values"], kw_both["pixel_values"]]),
                     np.concatenate([kw_wide["image_grid_thw"], kw_both["image_grid_thw"]]),
                     kw_both["pixel_values_videos"], kw_both["video_grid_thw"], max_new_tokens=16)
    assert out == [ref["wide.greedy"].tolist(), ref["image_and_video.greedy"].tolist()]


def test_cached_decoding_gives_the_tokens_of_recomputing_every_step():
    m, _, _ = _loaded("qwen2_5_vl", "hf457")
    ids, kw = _inputs("qwen2_5_vl", "hf457", "image_and_video")
    x = paddle.to_tensor([ids])
    assert m.generate(x, max_new_tokens=8, **kw) == m.generate(x, max_new_tokens=8, use_cache=False, **kw)


def test_a_token_count_mismatch_names_both_counts():
    m, _, _ = _loaded("qwen2_vl", "hf457")
    ids, kw = _inputs("qwen2_vl", "hf457", "wide")
    pad = m.config.image_token_id
    with pytest.raises(ValueError, match="image token count mismatch: the text has 9 image token positions, "
                                         "but the images give 10 features"):
        m(paddle.to_tensor([[t for k, t in enumerate(ids) if not (t == pad and k == ids.index(pad))]]), **kw)


def test_the_loss_trains_vision_merger_and_lm():
    m, _, _ = _loaded("qwen2_vl", "hf457")
    ids, kw = _inputs("qwen2_vl", "hf457", "two_images")
    x = paddle.to_tensor([ids])
    labels = paddle.to_tensor([[-100] * (len(ids) - 4) + ids[-4:]])
    m.train()
    try:
        token_nll, _ = m(x, labels=labels, **kw)
        loss = mean_nll(token_nll, labels)
        loss.backward()
        assert np.isfinite(float(loss))
        for part in (m.vision_tower.patch_embed.proj.weight, m.multi_modal_projector.fc1.weight,
                     m.language_model.model.layers[0].self_attn.q_proj.weight):
            assert float(part.grad.abs().sum()) > 0
    finally:
        m.clear_gradients()
        m.eval()


@pytest.mark.parametrize("model,tag", QWEN2_VL_FOLDERS)
def test_paddle_mm_infer_answers_as_transformers_from_the_folder_and_the_files(model, tag, capsys):
    """Every fixture case (a wide and a tall image, two images, a clip, an image and a clip) through the
    command line: the folder's template and processor, the files, 16 greedy tokens."""
    folder = qwen2_vl_folder(model, tag)
    tokenizer = _loaded(model, tag)[1]
    ref = reference(f"qwen2_vl/{model}/{tag}")
    cases = qwen2_vl_cases(model, tag)
    clips = {"video", "image_and_video"} if model != "qwen3_vl" else set()  # Qwen3-VL: images only
    assert {"wide", "tall", "two_images"} | clips <= set(cases)
    for case, c in cases.items():
        args = ["infer", folder, *[a for image in c["images"] for a in ("--image", image)], "--prompt", c["question"],
                "--max-new-tokens", "16"]
        if c["frames"]:
            args += ["--video", *c["frames"], "--video-fps", "1",  # the fixtures' clips: 1 frame a second
                     "--mrope-advance", MROPE_RULE[tag]]
        assert main(args) in (0, None)
        greedy = ref[f"{case}.greedy"].tolist()
        stop = next((k for k, t in enumerate(greedy) if t in tokenizer.stop_ids), len(greedy))
        assert capsys.readouterr().out.rstrip("\n") == tokenizer.decode(greedy[:stop]).strip(), case


def test_a_recipe_builds_a_tiny_qwen2_vl_from_scratch_that_trains(tmp_path):
    """model.family qwen2_vl with a ChatML tokenizer: its <image> runs are the vision blocks; the loss
    reaches the encoder, the merger and the LM."""
    from paddle_mm.builder import build_model, model_config_for
    from paddle_mm.config import Recipe
    from paddle_mm.data.qwen2_vl import Qwen2VLImageSettings
    from paddle_mm.recipe import load_recipe

    (tmp_path / "r.yaml").write_text(
        "model:\n  family: qwen2_vl\n"
        "  qwen2_vl_vision: {variant: qwen2_5_vl, depth: 2, hidden_size: 16, intermediate_size: 32, num_heads: 2,"
        " hidden_act: silu, window_size: 56, fullatt_block_indexes: [1]}\n"
        "  lm: {hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 1}\n")
    recipe = load_recipe(str(tmp_path / "r.yaml"), Recipe)
    tok = Tokenizer.word_level("which image is wider the left one".split())
    paddle.seed(0)
    model = build_model(model_config_for(recipe, tok), tok)
    assert model.config.lm.mrope_section == [2, 3, 3] and model.config.vision.out_hidden_size == 32
    proc = Qwen2VLProcessor(Qwen2VLImageSettings(min_pixels=3136, max_pixels=9408))
    images = qwen2_vl_cases("qwen2_vl", "hf457")["two_images"]["images"]
    enc = encode_conversation(tok, proc, [("user", f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nwhich image is wider"),
                                          ("assistant", "the left one")], images,
                              image_pad_id=tok.image_token_id, video_pad_id=-1)
    assert enc["input_ids"].count(tok.image_token_id) == 10 + 6  # 4 x 10 and 12 x 2 patches, merged 2 x 2
    x = paddle.to_tensor([enc["input_ids"]])
    positions, _ = model.rope_positions(x, None, enc["image_grid_thw"])
    first = enc["input_ids"].index(tok.image_token_id)
    block = positions.numpy()[:, 0, first:first + 10] - first  # the block starts after `first` text tokens
    assert block.tolist() == [[0] * 10, [0] * 5 + [1] * 5, list(range(5)) * 2]  # (t, row, column) of 2 x 5 tokens
    labels = paddle.to_tensor([enc["labels"]])
    token_nll, _ = model(x, pixel_values=paddle.to_tensor(enc["pixel_values"]), image_grid_thw=enc["image_grid_thw"],
                         labels=labels)
    loss = mean_nll(token_nll, labels)
    loss.backward()
    assert np.isfinite(float(loss))
    for part in (model.vision_tower.blocks[0].attn.qkv.weight, model.multi_modal_projector.fc2.weight,
                 model.language_model.model.layers[0].mlp.up_proj.weight):
        assert float(part.grad.abs().sum()) > 0


def test_paths_written_for_one_count_per_image_refuse_the_family_by_name():
    from paddle_mm.config import ModelConfig
    from paddle_mm.errors import RecipeError

    with pytest.raises(RecipeError, match="model.family qwen2_vl gives each image its own token count"):
        ModelConfig(family="qwen2_vl").tokens_per_image
    with pytest.raises(ValueError, match="its own token count"):
        _loaded("qwen2_vl", "hf457")[0].tokens_per_image
