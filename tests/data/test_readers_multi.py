"""Several images and video in one record: reading order, frame folders, and the count checks."""
import pytest
from files import png, write_json

from paddle_mm.data.readers import read_chatml, read_llava, read_vqav2, visual_prompt
from paddle_mm.errors import DataError


def human_gpt(question, answer="A"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def root(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        png(tmp_path / name)
    for k in range(5):  # names out of creation order: frames go by name
        png(tmp_path / "clip" / f"{4 - k:03d}.png")
    (tmp_path / "clip" / "notes.txt").write_text("not a frame")
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_several_images_in_tag_order_over_turns(root):
    rec = {"image": ["a.png", "b.png", "c.png"],
           "conversations": human_gpt("<image>\n<image>\nwhich has more?", "first")
           + human_gpt("and <image>?", "no")}
    s = read_llava(write_json(root / "d.json", [rec])).samples[0]
    assert s.images == [str(root / n) for n in ("a.png", "b.png", "c.png")]
    assert s.turns[0][1].count("<image>") == 2 and s.turns[2][1] == "and <image>?" and s.videos == []


@pytest.mark.parametrize("text, images, counts", [
    ("<image>\n<image>\n<image>\nQ", ["a.png", "b.png"], "3 <image> tags but 2 images"),
    ("<image>\nQ", ["a.png", "b.png"], "1 <image> tags but 2 images"),
    ("Q", ["a.png", "b.png"], "0 <image> tags but 2 images"),
])
def test_tag_count_mismatch_names_file_record_and_both_counts(root, text, images, counts):
    path = write_json(root / "bad.json", [{"image": "a.png", "conversations": human_gpt("<image>Q")},
                                          {"image": images, "conversations": human_gpt(text)}])
    with pytest.raises(DataError) as info:
        read_llava(path)
    assert str(info.value).startswith(f"{path}, record 1: {counts}") and info.value.reason == "tag_mismatch"


def test_video_folder_becomes_frames_among_the_images_in_reading_order(root):
    rec = {"image": ["a.png", "b.png"], "video": "clip",
           "conversations": human_gpt("<image>\nthen <video>\nthen <image>\nQ")}
    s = read_llava(write_json(root / "v.json", [rec])).samples[0]
    frames = [str(root / "clip" / f"{k:03d}.png") for k in range(5)]
    assert s.images == [str(root / "a.png")] + frames + [str(root / "b.png")]
    assert s.videos == [(1, 5)]
    assert s.turns[0][1] == "<image>\nthen " + "\n".join(["<image>"] * 5) + "\nthen <image>\nQ"


def test_frames_of_a_folder_go_by_the_numbers_in_their_names(root):
    for k in (1, 2, 10):
        png(root / "unpadded" / f"frame{k}.png")
    s = read_llava(write_json(root / "u.json", [{"video": "unpadded", "conversations": human_gpt("Q")}])).samples[0]
    assert [p.rsplit("/", 1)[1] for p in s.images] == ["frame1.png", "frame2.png", "frame10.png"]


def test_video_without_tag_goes_first_and_frames_are_sampled_evenly(root):
    frames = [f"clip/{k:03d}.png" for k in range(5)]
    recs = [{"video": frames, "conversations": human_gpt("which way?")},
            {"image": "a.png", "video": "clip", "conversations": human_gpt("both untagged")}]
    s0, s1 = read_llava(write_json(root / "v.json", recs), video_frames=3).samples
    assert s0.images == [str(root / f) for f in (frames[0], frames[2], frames[4])]
    assert s0.turns[0][1] == "<image>\n<image>\n<image>\nwhich way?" and s0.videos == [(0, 3)]
    assert s1.images[0] == str(root / "a.png") and s1.videos == [(1, 3)]
    assert s1.turns[0][1].startswith("<image>\n<image>\n<image>\n<image>\nboth")
    one = read_llava(write_json(root / "one.json", recs[:1]), video_frames=1).samples[0]
    assert one.images == [str(root / frames[2])]


@pytest.mark.parametrize("rec, cause, reason", [
    ({"video": "nowhere", "conversations": human_gpt("Q")}, "video folder not found: 'nowhere'", "image_missing"),
    ({"video": "empty", "conversations": human_gpt("Q")}, "video folder 'empty' holds no frame files", "image_missing"),
    ({"video": ["clip/000.png", "clip/999.png"], "conversations": human_gpt("Q")},
     "image file not found: 'clip/999.png'", "image_missing"),
    ({"video": "../x", "conversations": human_gpt("Q")}, "video path '../x' escapes the image root",
     "image_outside_root"),
    ({"video": [], "conversations": human_gpt("Q")}, "key 'video' must be a folder or a non-empty list", "bad_record"),
    ({"video": "clip", "conversations": human_gpt("<video> and <video>")},
     "2 <video> tags but 1 videos (a record holds at most one video)", "tag_mismatch"),
    ({"conversations": human_gpt("<video> Q")}, "1 <video> tags but 0 videos", "tag_mismatch"),
])
def test_bad_video_names_file_record_and_cause(root, rec, cause, reason):
    path = write_json(root / "bad.json", [{"conversations": human_gpt("fine")}, rec])
    res = read_llava(path, on_error="skip")
    assert len(res.samples) == 1 and len(res.skipped) == 1
    err = res.skipped[0]
    assert str(err).startswith(f"{path}, record 1: {cause}") and err.reason == reason


def test_chatml_several_images_and_a_video(root):
    recs = [{"image": ["a.png", "b.png"], "conversations": [["<image>\n<image>\nsame?", "no"]]},
            {"video": "clip", "conversations": [["<video>\nwhat moves?", "circle"], ["faster?", "no"]]}]
    s0, s1 = read_chatml(write_json(root / "c.json", recs), video_frames=2).samples
    assert len(s0.images) == 2 and s0.videos == []
    assert s1.images == [str(root / "clip" / "000.png"), str(root / "clip" / "004.png")]
    assert s1.turns[0] == ("user", "<image>\n<image>\nwhat moves?") and len(s1.turns) == 4
    bad = write_json(root / "cbad.json", [{"image": ["a.png"], "conversations": [["<image><image>x", "y"]]}])
    with pytest.raises(DataError, match=r"cbad.json, record 0: 2 <image> tags but 1 images"):
        read_chatml(bad)


def test_vqav2_questions_over_several_images_or_a_video(root):
    q = write_json(root / "q.json", {"questions": [
        {"question_id": 1, "image_ids": ["a", "b"], "question": "which image has more circles?"},
        {"question_id": 2, "video": "clip", "question": "which way does the circle move?"},
        {"question_id": 3, "image_id": "c", "question": "one image"}]})
    s1, s2, s3 = read_vqav2(q, image_root=root, image_pattern="{image_id}.png", prompt_template="<image>\n{question}",
                            video_frames=2).samples
    assert s1.images == [str(root / "a.png"), str(root / "b.png")]
    assert s1.turns[0][1] == "<image>\n<image>\nwhich image has more circles?" and s1.meta["image_id"] == ["a", "b"]
    assert len(s2.images) == 2 and s2.videos == [(0, 2)] and s2.turns[0][1].startswith("<image>\n<image>\nwhich way")
    assert s3.images == [str(root / "c.png")] and s3.turns[0][1] == "<image>\none image"
    write_json(q, {"questions": [{"question_id": 1, "question": "no image, no video"}]})
    with pytest.raises(DataError, match="record 0: missing key 'image_id'"):
        read_vqav2(q, image_root=root)


def test_visual_prompt_widens_the_one_image_tag():
    assert visual_prompt("<image>\n{question}", 1) == "<image>\n{question}"
    assert visual_prompt("<image>\n{question}", 2) == "<image>\n<image>\n{question}"
    assert visual_prompt("<image>\n{question}", 1, 1) == "<image>\n<video>\n{question}"
    assert visual_prompt("{question}", 2) == "<image>\n<image>\n{question}"
    assert visual_prompt("{question}", 0) == "{question}"
    assert visual_prompt("<image>\n{question}", 0) == "<image>\n{question}"
    assert visual_prompt("<image> vs <image>: {question}", 2) == "<image> vs <image>: {question}"
    with pytest.raises(ValueError, match="holds 2 <image> tags"):
        visual_prompt("<image> vs <image>: {question}", 3)
