"""The public Python API (paddle_mm/api/, re-exported by paddle_mm): its names and signatures stay
put, the quick-start notebook uses nothing else, and the calls give what the library gives."""
from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from reference_fixtures import REFERENCE

import paddle_mm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GEN = ("*, max_new_tokens: 'int | None' = None, temperature: 'float | None' = None, top_p: 'float | None' = None, "
        "num_beams: 'int | None' = None, stop: 'Sequence[str]' = (), on_text: 'Callable[[str], None] | None' = None")
# A deliberate change to the public API updates this table (and says so in the README and the notes).
PUBLIC = {
    "Pipeline.answer": f"(self, images: 'ImageLike | Sequence[ImageLike]', questions: 'str | Sequence[str]', {_GEN})"
                       " -> 'str | list[str]'",
    "Pipeline.caption": f"(self, images: 'ImageLike | Sequence[ImageLike]', {_GEN}) -> 'str | list[str]'",
    "Pipeline.chat": "(self, messages: 'Sequence[dict | tuple[str, str]]', images: 'Sequence[ImageLike]' = (), "
                     f"system: 'str' = '', {_GEN}) -> 'str'",
    "load": "(path: 'str') -> 'Pipeline'",
    "load_recipe": "(recipe: 'str | os.PathLike', overrides: 'Sequence[str]' = ()) -> 'Recipe'",
    "train": "(recipe: 'Recipe | str | os.PathLike', overrides: 'Sequence[str]' = (), quiet: 'bool' = True) -> 'str'",
    "evaluate_vqa": "(model: 'Pipeline | str', questions: 'str', annotations: 'str' = '', image_pattern: 'str' = '', "
                    "image_root: 'str' = '', blind: 'bool' = False, normalize: 'str' = 'official') -> 'dict'",
    "evaluate_captions": "(model: 'Pipeline | str', captions: 'str', image_root: 'str' = '') -> 'dict'",
    "evaluate_retrieval": "(run: 'str', captions: 'str' = '', zero_shot: 'str' = '', image_root: 'str' = '') -> 'dict'",
    "generate_demo_data": "(folder: 'str', num_train: 'int' = 1000, num_val: 'int' = 20, num_test: 'int' = 60, "
                          "seed: 'int' = 0) -> 'dict'",
    "train_tokenizer": "(corpus: 'str | Sequence[str]', vocab_size: 'int', out_dir: 'str') -> 'str'",
    "plot_runs": "(runs: 'Sequence[str]', out_png: 'str') -> 'str'",
}
METRICS = ["NORMALIZE_MODES", "normalize_answer", "vqa_accuracy", "vqa_report", "tokenize", "bleu", "rouge_l",
           "cider_d", "caption_report", "pope_answer", "pope_scores", "pope_report", "pope_questions", "chair",
           "mentioned_objects"]


def test_public_names_and_signatures_stay_put():
    assert sorted(paddle_mm.__all__) == sorted({n.split(".")[0] for n in PUBLIC} | {"Recipe", "metrics"})
    for name, signature in PUBLIC.items():
        owner, _, method = name.partition(".")
        obj = getattr(getattr(paddle_mm, owner), method) if method else getattr(paddle_mm, owner)
        assert str(inspect.signature(obj)) == signature, name
        assert obj.__doc__, f"{name} has no docstring"
    assert sorted(paddle_mm.metrics.__all__) == sorted(METRICS)


def test_import_paddle_mm_loads_neither_paddle_nor_the_api():
    code = "import sys, paddle_mm; print(sorted(m for m in ('paddle', 'paddle_mm.api', 'yaml') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def _notebook_code() -> list[str]:
    with open(os.path.join(REPO, "notebooks", "quickstart.ipynb"), encoding="utf-8") as f:
        return ["".join(c["source"]) for c in json.load(f)["cells"] if c["cell_type"] == "code"]


def test_the_notebook_uses_the_public_api_alone():
    used = set()
    for source in _notebook_code():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("paddle_mm"):
                assert node.module == "paddle_mm", f"the notebook imports {node.module}"
                used |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                assert all(a.name == "paddle_mm" or not a.name.startswith("paddle_mm") for a in node.names)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "paddle_mm":
                used.add(node.attr)
    assert used and used <= set(paddle_mm.__all__), sorted(used - set(paddle_mm.__all__))


def test_the_check_would_catch_an_internal_import():
    tree = ast.parse("from paddle_mm.builder import load_run\nx = paddle_mm.run_folder")
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    attrs = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
    assert modules == ["paddle_mm.builder"] and "run_folder" not in paddle_mm.__all__ and attrs == ["run_folder"]


# ---- the calls, on a LLaVA folder as downloaded (tests/inference/test_reference_pipeline.py) ----------
FOLDER = os.path.join(REFERENCE, "pipeline", "llava_llama", "hf5")
IMAGES = [os.path.join(REFERENCE, "pipeline", "images", f"{k}.png") for k in ("wide", "tall")]


@pytest.fixture(scope="module")
def vlm():
    return paddle_mm.load(FOLDER)


def _reference_answer(vlm, key: str) -> str:
    from safetensors.numpy import load_file

    greedy = load_file(os.path.join(FOLDER, "reference.safetensors"))[f"{key}.greedy"].tolist()
    if greedy and greedy[-1] in vlm.tokenizer.stop_ids:
        greedy = greedy[:-1]
    return vlm.tokenizer.decode(greedy).strip()


def test_answer_is_transformers_answer_for_paths_arrays_and_pil_images(vlm):
    q = "what colour is the circle?"
    expected = _reference_answer(vlm, "wide")
    assert vlm.answer(IMAGES[0], q, max_new_tokens=16) == expected
    assert vlm.answer(np.asarray(Image.open(IMAGES[0]).convert("RGB")), q, max_new_tokens=16) == expected
    batch = vlm.answer([Image.open(IMAGES[0]), IMAGES[1]], [q, q], max_new_tokens=16)
    assert batch == [expected, _reference_answer(vlm, "tall")]
    assert vlm.chat([{"role": "user", "content": q}], images=[IMAGES[0]], max_new_tokens=16) == expected


def test_one_question_over_several_images(vlm):
    """A list of images with one question: one block of image tokens per image, in that order; the
    same answer alone, in a batch beside a one-image question, and through chat with the tags."""
    q = "which image is wider?"
    pair = vlm.answer(IMAGES, q, max_new_tokens=8)
    assert vlm.answer([IMAGES, IMAGES[1]], [q, q], max_new_tokens=8) == [pair, vlm.answer(IMAGES[1], q, max_new_tokens=8)]
    prompt = vlm.recipe.infer.vqa_prompt.replace("<image>", "<image>\n<image>").format(question=q)
    assert vlm.chat([{"role": "user", "content": prompt}], images=IMAGES, max_new_tokens=8) == pair
    with pytest.raises(ValueError, match="1 <image> tags but 2 images"):
        vlm.chat([{"role": "user", "content": "<image> which?"}], images=IMAGES)


def test_streaming_adds_up_to_the_answer_and_a_stop_string_cuts_it(vlm):
    q = "what colour is the circle?"
    full = vlm.answer(IMAGES[0], q, max_new_tokens=16)
    pieces = []
    assert vlm.answer(IMAGES[0], q, max_new_tokens=16, on_text=pieces.append) == full == "".join(pieces)
    stop = full.split()[2]  # a word from the middle of the answer
    cut = vlm.answer(IMAGES[0], q, max_new_tokens=16, stop=[stop])
    assert cut == full[: full.index(stop)] and stop not in cut  # as the server cuts: spaces kept


def test_bad_calls_say_what_is_wrong(vlm):
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        vlm.answer(IMAGES, ["q"])
    with pytest.raises(ValueError, match="last message must be the user's"):
        vlm.chat([("user", "hi"), ("assistant", "hello")])
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        vlm.caption(np.zeros((4, 4), dtype=np.uint8))


def test_load_recipe_takes_bundled_names_and_overrides():
    recipe = paddle_mm.load_recipe("demo/pretrain", ["train.max_steps=7"])
    assert isinstance(recipe, paddle_mm.Recipe) and recipe.train.max_steps == 7 and recipe.train.stage == "pretrain"
    with pytest.raises(ValueError, match="overrides apply to a recipe file"):
        paddle_mm.train(recipe, ["train.max_steps=1"])
