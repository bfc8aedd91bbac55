"""Qwen2-VL's processor, prompts and M-RoPE positions against transformers 4.57 and 5.x (tests/fixtures/
reference/qwen2_vl, made by tools/make_qwen2_vl_fixtures.py)."""
import json
import os

import numpy as np
import pytest
from reference_fixtures import (
    MROPE_RULE,
    QWEN2_VL_FOLDERS,
    pixel_summary_error,
    qwen2_vl_cases,
    qwen2_vl_folder,
    reference,
)

from paddle_mm.data.qwen2_vl import (
    Qwen2VLImageSettings,
    Qwen2VLProcessor,
    RopeTokens,
    encode_conversation,
    expand_pads,
    rope_index,
    sample_frame_indices,
    settings_from_folder,
    smart_resize,
)
from paddle_mm.data.tokenizer import IMAGE_TOKEN, Tokenizer
from paddle_mm.errors import DataError


def _ref(model, tag):
    return reference(f"qwen2_vl/{model}/{tag}")


def _config(model, tag):
    with open(os.path.join(qwen2_vl_folder(model, tag), "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("model,tag", QWEN2_VL_FOLDERS)
def test_pixels_and_grids_match_transformers(model, tag):
    ref = _ref(model, tag)
    proc = Qwen2VLProcessor(settings_from_folder(qwen2_vl_folder(model, tag)))
    for case, c in qwen2_vl_cases(model, tag).items():
        if c["images"]:
            pixels, grid = proc.images(c["images"])
            np.testing.assert_array_equal(grid, ref[f"{case}.image_grid_thw"])
            assert pixel_summary_error(pixels, ref, f"{case}.pixel_values") <= 1e-5, case
        if c["frames"]:
            pixels, grid = proc.video(c["frames"])
            np.testing.assert_array_equal(grid, ref[f"{case}.video_grid_thw"])
            assert pixel_summary_error(pixels, ref, f"{case}.pixel_values_videos") <= 1e-5, case


def test_the_folders_settings_are_read_from_both_layouts():
    for tag in ("hf457", "hf5"):  # preprocessor_config.json; processor_config.json's "image_processor"
        s = settings_from_folder(qwen2_vl_folder("qwen2_vl", tag))
        assert (s.min_pixels, s.max_pixels, s.patch_size, s.merge_size, s.resample) == (3136, 9408, 14, 2, "bicubic")


def test_a_folder_of_another_image_processor_is_refused(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    with pytest.raises(DataError, match="CLIPImageProcessor.*not Qwen2-VL"):
        settings_from_folder(str(tmp_path))


def test_smart_resize_keeps_multiples_of_28_within_the_pixel_bounds():
    assert smart_resize(50, 150, 28, 3136, 9408) == (56, 140)  # rounded, within bounds
    assert smart_resize(200, 60, 28, 3136, 9408) == (168, 28)  # too many pixels: scaled down, floor
    assert smart_resize(30, 45, 28, 3136, 9408) == (56, 84)  # too few: scaled up, ceil
    with pytest.raises(ValueError, match="200 times"):
        smart_resize(10, 2100, 28, 3136, 9408)


def test_patch_rows_put_each_merge_group_of_four_together():
    """Row k of a 2x4-patch image (one merge row of two groups) is patch (row, col) in group order."""
    s = Qwen2VLImageSettings(patch_size=1, temporal_patch_size=2, merge_size=2)
    frame = np.arange(2 * 4, dtype=np.float32).reshape(1, 1, 2, 4).repeat(3, axis=1)  # value = row * 4 + col
    rows, grid = Qwen2VLProcessor(s).patchify(frame)
    assert grid == (1, 2, 4)
    # columns: channel-major, then the two frames of the temporal patch (here the repeated one)
    np.testing.assert_array_equal(rows[:, 0], [0, 1, 4, 5, 2, 3, 6, 7])
    np.testing.assert_array_equal(rows[:, 0], rows[:, 1])


def test_frame_sampling_is_the_video_processors():
    assert sample_frame_indices(10, num_frames=4) == [0, 2, 5, 7]
    assert sample_frame_indices(10, num_frames=5) == [0, 2, 5, 7]  # rounded to whole temporal patches
    # 2 fps of a 1 s clip at 30 fps would be 2 frames; transformers keeps at least min_frames (4)
    assert sample_frame_indices(30, source_fps=30, fps=2) == [0, 7, 15, 22]
    assert sample_frame_indices(300, source_fps=30, fps=2) == list(range(0, 300, 15))  # 20 frames, 10 s
    assert sample_frame_indices(7) == list(range(7))  # no rule: every frame (the processor repeats the last)
    with pytest.raises(ValueError, match="cannot sample 0 frames"):
        sample_frame_indices(1, num_frames=1)


def test_pad_expansion_names_both_counts_on_a_mismatch():
    ids, labels = expand_pads([1, 9, 2, 9], [-100, -100, 5, -100], {9: [3, 1]}, -100)
    assert ids == [1, 9, 9, 9, 2, 9] and labels == [-100, -100, -100, -100, 5, -100]
    with pytest.raises(ValueError, match="2 vision pads.*3 images"):
        expand_pads([9, 9], [0, 0], {9: [1, 1, 1]}, -100)
    with pytest.raises(ValueError, match="more than 1 vision pads"):
        expand_pads([9, 9], [0, 0], {9: [1]}, -100)


@pytest.mark.parametrize("model,tag", QWEN2_VL_FOLDERS)
def test_prompt_ids_match_the_processors(model, tag):
    """The folder's chat template, several images and a video in one prompt, each pad widened."""
    folder = qwen2_vl_folder(model, tag)
    ref, raw = _ref(model, tag), _config(model, tag)
    tokenizer, proc = Tokenizer.load(folder), Qwen2VLProcessor(settings_from_folder(folder))
    for case, c in qwen2_vl_cases(model, tag).items():
        # as readers give a clip: one <image> tag per frame, Sample.videos marking (first, count)
        media = c["images"] + c["frames"]
        text = f"{IMAGE_TOKEN}\n" * len(media) + c["question"]
        videos = [(len(c["images"]), len(c["frames"]))] if c["frames"] else []
        enc = encode_conversation(tokenizer, proc, [("user", text)], media, videos,
                                  image_pad_id=raw["image_token_id"], video_pad_id=raw["video_token_id"],
                                  add_generation_prompt=True)
        assert enc["input_ids"] == ref[f"{case}.input_ids"].tolist(), case
        assert set(enc["labels"]) == {-100}


@pytest.mark.parametrize("model,tag", QWEN2_VL_FOLDERS)
def test_mrope_positions_match_get_rope_index(model, tag):
    ref, raw = _ref(model, tag), _config(model, tag)
    tokens = RopeTokens(raw["image_token_id"], raw["video_token_id"], raw["vision_start_token_id"], 2,
                        raw["vision_config"].get("tokens_per_second", 0.0) if model == "qwen2_5_vl" else 0.0,
                        MROPE_RULE[tag])
    for case in qwen2_vl_cases(model, tag):
        ids = ref[f"{case}.input_ids"].tolist()
        pos, delta = rope_index(ids, ref.get(f"{case}.image_grid_thw"), ref.get(f"{case}.video_grid_thw"), tokens,
                                [2.0])  # the fixtures' clips: 2 frames a temporal patch at 1 fps
        np.testing.assert_array_equal(pos, ref[f"{case}.position_ids"], err_msg=case)
        assert pos.max() + 1 - len(ids) == ref[f"{case}.rope_delta"][0]


def test_the_two_transformers_rules_differ_only_where_a_block_is_deeper_than_wide():
    """Qwen2.5-VL's clip: t positions 0 and 4 (2 s a patch x 2 tokens a second) on a 2 x 3 grid. 4.57
    goes on from the block's largest position + 1, 5.x from its start + max(2, 3)."""
    ref, raw = _ref("qwen2_5_vl", "hf457"), _config("qwen2_5_vl", "hf457")
    ids = ref["video.input_ids"].tolist()
    after = {}
    for rule in ("max", "extent"):
        tokens = RopeTokens(raw["image_token_id"], raw["video_token_id"], raw["vision_start_token_id"], 2, 2, rule)
        pos, _ = rope_index(ids, None, ref["video.video_grid_thw"], tokens, [2.0])
        block_end = ids.index(raw["video_token_id"]) + 12
        after[rule] = int(pos[0, block_end] - pos[0, block_end - 12])
    assert after == {"max": 5, "extent": 3}


def test_the_video_processors_bounds_and_fps_are_read_where_the_folder_has_them(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Qwen2VLImageProcessor",
                                                                   "min_pixels": 3136, "max_pixels": 9408}))
    assert settings_from_folder(str(tmp_path)).video_max_pixels == 0  # none: the images' bounds serve
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 784, "longest_edge": 3136}, "fps": 1.0}))
    s = settings_from_folder(str(tmp_path))
    assert (s.video_min_pixels, s.video_max_pixels, s.fps, s.max_pixels) == (784, 3136, 1.0, 9408)
    # a 84 x 56 frame is 4704 pixels: within the image bounds it stays, under the video's it shrinks
    frame = qwen2_vl_cases("qwen2_vl", "hf457")["video"]["frames"]
    assert Qwen2VLProcessor(s).video(frame)[1].tolist() == [[2, 2, 4]]


def test_min_and_max_pixels_override_the_size_entry(tmp_path):
    """As transformers' constructors apply them: min_pixels / max_pixels replace size's edges."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "size": {"shortest_edge": 100, "longest_edge": 200},
        "min_pixels": 3136, "max_pixels": 9408}))
    s = settings_from_folder(str(tmp_path))
    assert (s.min_pixels, s.max_pixels) == (3136, 9408)
