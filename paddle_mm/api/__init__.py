"""The public Python API: what `from paddle_mm import ...` gives (paddle_mm/__init__.py lists it,
tests/test_public_api.py keeps its signatures). Everything else in the package is internal and
may move; these names stay.

    import paddle_mm
    vlm = paddle_mm.load("runs/demo/instruct")        # or a downloaded LLaVA / BLIP-2 folder
    vlm.answer("scene.png", "what colour is the circle?")
    run = paddle_mm.train("demo/pretrain", ["train.max_steps=50"])

Imports stay inside the functions, so `import paddle_mm` does not load paddle.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from paddle_mm.api.pipeline import Pipeline, load
from paddle_mm.config import Recipe


def load_recipe(recipe: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """A Recipe from a YAML file, or a bundled recipe by name ("demo/pretrain", "blip2/align", the
    files under recipes/), with `section.key=value` overrides applied last."""
    from paddle_mm.recipe import bundled_recipes
    from paddle_mm.recipe import load_recipe as read

    path = os.fspath(recipe)
    if not os.path.isfile(path):
        named = os.path.join(bundled_recipes(), path if path.endswith(".yaml") else f"{path}.yaml")
        if os.path.isfile(named):
            path = named
    return read(path, Recipe, list(overrides))


def train(recipe: Recipe | str | os.PathLike, overrides: Sequence[str] = (), quiet: bool = True) -> str:
    """Run the training stage a recipe describes (a Recipe, a YAML path or a bundled name, with
    overrides); returns the run folder. A run folder that exists is continued from its checkpoint."""
    from paddle_mm.training.loop import train as run

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise ValueError("overrides apply to a recipe file; edit the Recipe object's fields instead")
    return run(recipe, quiet=quiet)


def evaluate_vqa(model: Pipeline | str, questions: str, annotations: str = "", image_pattern: str = "",
                 image_root: str = "", blind: bool = False, normalize: str = "official") -> dict:
    """VQAv2 accuracy of a model (a Pipeline, or a folder `load` takes) on a questions file and its
    annotations: {"overall", "per_type", "count", ...}, computed as the official VQA code does."""
    from paddle_mm.data.readers import read_vqav2
    from paddle_mm.eval.tasks import evaluate_vqa as run

    vlm = load(model) if not isinstance(model, Pipeline) else model
    kw = {"image_pattern": image_pattern} if image_pattern else {}
    samples = read_vqav2(questions, annotations or None, image_root=image_root or None,
                         prompt_template=vlm.recipe.infer.vqa_prompt, **kw).samples
    return run(vlm.model, vlm.tokenizer, samples, vlm.image_processor, vlm.recipe.infer, blind=blind,
               normalize=normalize)


def evaluate_captions(model: Pipeline | str, captions: str, image_root: str = "") -> dict:
    """BLEU-4, ROUGE-L and CIDEr-D of a model's captions against a COCO-Karpathy-style file."""
    from paddle_mm.data.readers import read_captions
    from paddle_mm.eval.tasks import evaluate_captions as run

    vlm = load(model) if not isinstance(model, Pipeline) else model
    kw = {"image_root": image_root} if image_root else {}
    samples = read_captions(captions, prompt=vlm.recipe.infer.caption_prompt, **kw).samples
    return run(vlm.model, vlm.tokenizer, samples, vlm.image_processor, vlm.recipe.infer)


def evaluate_retrieval(run: str, captions: str = "", zero_shot: str = "", image_root: str = "") -> dict:
    """Image-text retrieval recall@1/5/10 both ways (and zero-shot accuracy) of an align or clip run."""
    from paddle_mm.eval.alignment import evaluate_alignment_run

    return evaluate_alignment_run(run, captions, zero_shot, image_root)


def generate_demo_data(folder: str, num_train: int = 1000, num_val: int = 20, num_test: int = 60,
                       seed: int = 0) -> dict:
    """The demo's synthetic scenes with captions and questions, in the LLaVA, caption and VQAv2
    formats. Returns {"train" | "val" | "test": {kind: path, ..., "vqa_image_pattern": the
    evaluate_vqa image_pattern of the split}, "corpus": the text for train_tokenizer}."""
    from paddle_mm.data.synthetic import generate_demo_data as make
    from paddle_mm.data.synthetic import vqa_image_pattern

    files = make(folder, num_train, num_val, num_test, seed=seed)
    for split in ("train", "val", "test"):
        files[split] = {**files[split], "vqa_image_pattern": vqa_image_pattern(split)}
    return files


def train_tokenizer(corpus: str | Sequence[str], vocab_size: int, out_dir: str) -> str:
    """A byte-level BPE trained on text files (one text per line), saved in out_dir; returns the
    tokenizer.json path a recipe's data.tokenizer can name."""
    from paddle_mm.data.tokenizer import Tokenizer, training_corpus

    files = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    return Tokenizer.train_bpe(training_corpus(files), vocab_size=vocab_size).save(out_dir)


def plot_runs(runs: Sequence[str], out_png: str) -> str:
    """Loss and learning-rate curves of run folders, overlaid, written to out_png; returns its path."""
    from paddle_mm.training.plot import plot_runs as plot

    return plot(list(runs), out_png)


__all__ = ["Recipe", "Pipeline", "load", "load_recipe", "train", "evaluate_vqa", "evaluate_captions", "evaluate_retrieval",
           "generate_demo_data", "train_tokenizer", "plot_runs"]
