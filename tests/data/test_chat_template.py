"""Where a checkpoint's chat template is found, how it renders, and how its labels are placed.
The reference comparison with transformers is tests/inference/test_reference_pipeline.py."""
import json
import os

import pytest

from paddle_mm.data.chat_template import ChatTemplate, find_chat_template
from paddle_mm.data.image import ImageProcessorConfig, image_config_from_folder
from paddle_mm.data.tokenizer import IGNORE_INDEX, Tokenizer
from paddle_mm.errors import CheckpointError, DataError

# trim_blocks (as in transformers) drops a newline right after a block tag: the template prints its own
ROLE_COLON = ("{% for m in messages %}{{ m['role'].upper() + ': ' + m['content'] }}{% if m['role'] == 'assistant' %}"
              "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _write(folder, name, data):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))


@pytest.mark.parametrize("name,data", [
    ("chat_template.jinja", ROLE_COLON),  # transformers 4.57 / 5.x save_pretrained
    ("chat_template.json", {"chat_template": ROLE_COLON}),  # older processors
    ("tokenizer_config.json", {"chat_template": ROLE_COLON}),  # older tokenizers
    ("tokenizer_config.json", {"chat_template": [{"name": "tool_use", "template": "x"},
                                                 {"name": "default", "template": ROLE_COLON}]}),
    ("processor_config.json", {"chat_template": ROLE_COLON}),
])
def test_template_is_found_where_transformers_saves_it(tmp_path, name, data):
    _write(tmp_path, name, data)
    text, origin = find_chat_template(str(tmp_path))
    assert text == ROLE_COLON and origin.endswith(name)


def test_a_folder_without_template_has_none_and_a_bad_entry_is_named(tmp_path):
    assert find_chat_template(str(tmp_path)) is None
    _write(tmp_path, "tokenizer_config.json", {"chat_template": 3})
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        find_chat_template(str(tmp_path))


def test_string_and_parts_templates_are_told_apart():
    assert not ChatTemplate(ROLE_COLON, "t").parts
    parts = "{% for m in messages %}{% for p in m['content'] %}{{ p['type'] }}{% endfor %}{% endfor %}"
    assert ChatTemplate(parts, "t").parts
    t = ChatTemplate(parts, "t")
    assert t._message("user", "<image>\nwhat?") == {"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "what?"}]}


def test_assistant_spans_cover_what_each_answer_adds():
    t = ChatTemplate(ROLE_COLON, "t", {"eos_token": "</s>"})
    turns = [("user", "hi"), ("assistant", "red"), ("user", "and?"), ("assistant", "blue")]
    full, spans = t.assistant_spans(turns)
    assert full == "USER: hi\nASSISTANT: red</s>\nUSER: and?\nASSISTANT: blue</s>\n"
    assert [full[a:b] for a, b in spans] == [" red</s>", " blue</s>"]


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # drops every assistant answer but the last one, as reasoning templates do with their thoughts
    rewriting = ("{% for m in messages %}{% if m['role'] == 'user' or loop.last %}{{ m['content'] }}|{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    t = ChatTemplate(rewriting, "rewriting.jinja")
    with pytest.raises(DataError, match="rewriting.jinja.*turn 2"):
        t.assistant_spans([("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")])


def test_raise_exception_in_a_template_is_a_data_error():
    t = ChatTemplate("{{ raise_exception('only user turns') }}", "strict.jinja")
    with pytest.raises(DataError, match="strict.jinja.*only user turns"):
        t.render([("user", "x")])


def test_broken_template_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="broken.jinja"):
        ChatTemplate("{% for %}", "broken.jinja")


def _folder_tokenizer(tmp_path, template: str):
    tok = Tokenizer.word_level("hi red blue and? USER: ASSISTANT:".split())
    tok._tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path))
    _write(tmp_path, "chat_template.jinja", template)
    _write(tmp_path, "tokenizer_config.json", {"eos_token": "</s>"})
    return str(tmp_path)


def test_tokenizer_with_a_template_labels_the_answers_and_stops_on_its_eos(tmp_path):
    tok = Tokenizer.load(_folder_tokenizer(tmp_path, ROLE_COLON))
    assert tok.template is not None and tok.stop_ids == [tok.token_to_id("</s>")]
    ids, labels = tok.encode_chat([("user", "hi"), ("assistant", "red")], 0)
    labelled = [tok.decode([i], skip_special_tokens=False) for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert labelled == ["red", "</s>"]


def test_recipe_can_ask_for_chatml_or_another_template_file(tmp_path):
    folder = _folder_tokenizer(tmp_path / "ckpt", ROLE_COLON)
    assert Tokenizer.load(folder, "chatml").template is None
    other = tmp_path / "other.jinja"
    other.write_text("{% for m in messages %}{{ m['content'] }};{% endfor %}")
    tok = Tokenizer.load(folder, str(other))
    assert tok.template.origin == str(other) and tok.template.render([("user", "hi")]) == "hi;"
    with pytest.raises(CheckpointError, match="missing.jinja"):
        Tokenizer.load(folder, str(tmp_path / "missing.jinja"))


def test_template_travels_with_a_saved_tokenizer(tmp_path):
    tok = Tokenizer.load(_folder_tokenizer(tmp_path / "ckpt", ROLE_COLON))
    tok.save(str(tmp_path / "run"))
    again = Tokenizer.load(str(tmp_path / "run"))
    assert again.template.text == ROLE_COLON and again.stop_ids == tok.stop_ids
    turns = [("user", "hi"), ("assistant", "red")]
    assert again.encode_chat(turns, 0) == tok.encode_chat(turns, 0)


# ---- image processor settings from a folder ---------------------------------------------------
CLIP_336 = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
            "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "resample": 3,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def test_clip_settings_read_from_4x_and_5x_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _write(tmp_path / "a", "preprocessor_config.json", CLIP_336)
    _write(tmp_path / "b", "processor_config.json", {"image_processor": CLIP_336, "patch_size": 14})
    a, b = image_config_from_folder(str(tmp_path / "a")), image_config_from_folder(str(tmp_path / "b"))
    assert a == b == ImageProcessorConfig(size=336, resize="shortest", resample="bicubic")


def test_llava_padding_and_blip_exact_resize(tmp_path):
    _write(tmp_path, "preprocessor_config.json", {**CLIP_336, "image_processor_type": "LlavaImageProcessor",
                                                  "do_pad": True})
    cfg = image_config_from_folder(str(tmp_path))
    assert cfg.pad_to_square and cfg.fill() == (122, 116, 104)
    _write(tmp_path, "preprocessor_config.json", {"image_processor_type": "BlipImageProcessor", "resample": 3,
                                                  "size": {"height": 224, "width": 224}, "do_normalize": True})
    assert image_config_from_folder(str(tmp_path)).resize == "exact"


@pytest.mark.parametrize("raw,match", [
    ({**CLIP_336, "image_processor_type": "Qwen2VLImageProcessor"}, "Qwen2VLImageProcessor"),
    ({**CLIP_336, "crop_size": {"height": 336, "width": 300}}, "non-square"),
    ({**CLIP_336, "do_center_crop": False}, "centre crop"),
    ({**CLIP_336, "resample": 9}, "resample"),
])
def test_settings_paddle_mm_cannot_reproduce_are_refused_with_the_file(tmp_path, raw, match):
    _write(tmp_path, "preprocessor_config.json", raw)
    with pytest.raises(DataError, match=match) as info:
        image_config_from_folder(str(tmp_path))
    assert "preprocessor_config.json" in str(info.value)
