"""Retrieval and zero-shot classification with an align (Q-Former) or clip run.

Both models give normalized image embeddings [N, Q, E] (Q = 1 for CLIP) and text embeddings
[M, E]; an image-text score is the best query's cosine similarity.

Retrieval candidates are the distinct caption strings: a caption written for several scenes
is one text relevant to each of those images (otherwise the copies would be
indistinguishable candidates and only one of them could count).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from paddle_mm.data.readers import Sample
from paddle_mm.errors import DataError
from paddle_mm.eval.metrics.retrieval import retrieval_report


def encode_images(model, paths: Sequence[str], image_processor, batch_size: int = 32) -> np.ndarray:
    import paddle

    out = []
    with paddle.no_grad():
        for start in range(0, len(paths), batch_size):
            pixels = image_processor(list(paths[start: start + batch_size]))
            out.append(model.image_embeddings(paddle.to_tensor(pixels)).numpy())
    return np.concatenate(out)


def encode_texts(model, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    import paddle

    from paddle_mm.data.dataset import collate

    tok, max_length = model.text_tokenizer, model.config.text.max_length
    out = []
    with paddle.no_grad():
        for start in range(0, len(texts), batch_size):
            ids = [np.asarray(tok.encode(t, max_length), "int64") for t in texts[start: start + batch_size]]
            # labels are unused here; collate wants one per input id
            items = [{"id": str(i), "input_ids": x, "labels": x, "pixel_values": None} for i, x in enumerate(ids)]
            b = collate(items, tok.pad_token_id)
            out.append(model.text_embeddings(paddle.to_tensor(b["input_ids"]),
                                             paddle.to_tensor(b["attention_mask"])).numpy())
    return np.concatenate(out)


def scores(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """[N, M]: max over each image's queries of the cosine similarity."""
    return np.einsum("nqe,me->nqm", image_embeds, text_embeds).max(axis=1)


def evaluate_retrieval(model, samples: Sequence[Sample], image_processor) -> dict:
    """Recall@1/5/10 image->text and text->image over caption samples (see the module note)."""
    from paddle_mm.alignment.data import caption_of

    texts: dict[str, int] = {}
    refs = []
    for s in samples:
        caps = s.meta.get("references") or [caption_of(s)]
        refs.append([texts.setdefault(c, len(texts)) for c in caps])
    relevant = np.zeros((len(samples), len(texts)), dtype=bool)
    for i, r in enumerate(refs):
        relevant[i, r] = True
    sim = scores(encode_images(model, [s.images[0] for s in samples], image_processor),
                 encode_texts(model, list(texts)))
    report = retrieval_report(sim, relevant)
    report["num_captions_repeated"] = int((relevant.sum(axis=0) > 1).sum())
    return report


def read_zero_shot(path: str) -> tuple[str, list[str], list[tuple[str, str]]]:
    """A zero-shot task file: {"template": "a photo of a {}", "classes": [...],
    "images": [{"image": path relative to the file, "label": one of classes}, ...]}."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(path, f"cannot read zero-shot task ({e})") from e
    template, classes, images = data.get("template"), data.get("classes"), data.get("images")
    if not isinstance(template, str) or "{}" not in template:
        raise DataError(path, "key 'template' must be a string with a {} for the class name")
    if not isinstance(classes, list) or len(set(classes)) < 2:
        raise DataError(path, "key 'classes' must list at least two distinct class names")
    if not isinstance(images, list) or not images:
        raise DataError(path, "key 'images' must be a non-empty list")
    root = os.path.dirname(os.path.abspath(path))
    out = []
    for i, rec in enumerate(images):
        if not isinstance(rec, dict) or rec.get("label") not in classes or not isinstance(rec.get("image"), str):
            raise DataError(path, "each image needs 'image' (a path) and 'label' (one of the classes)", i)
        image = os.path.join(root, rec["image"])
        if not os.path.isfile(image):
            raise DataError(path, f"image not found: {image}", i)
        out.append((image, rec["label"]))
    return template, classes, out


def evaluate_zero_shot(model, path: str, image_processor) -> dict:
    """Accuracy of picking, for each image, the class whose prompt scores highest."""
    template, classes, images = read_zero_shot(path)
    sim = scores(encode_images(model, [p for p, _ in images], image_processor),
                 encode_texts(model, [template.format(c) for c in classes]))
    predicted = [classes[j] for j in sim.argmax(axis=1)]
    correct = np.array([p == label for p, (_, label) in zip(predicted, images)])
    per_class = {c: float(np.mean([ok for ok, (_, label) in zip(correct, images) if label == c]))
                 for c in classes if any(label == c for _, label in images)}
    return {"accuracy": float(correct.mean()), "chance": 1 / len(classes), "per_class": per_class,
            "count": len(images)}


def evaluate_alignment_run(run_dir: str, captions: str = "", zero_shot: str = "", image_root: str = "") -> dict:
    from paddle_mm.builder import image_processor_for
    from paddle_mm.data.readers import read_captions
    from paddle_mm.run_folder import load_align_run

    recipe, model = load_align_run(run_dir)
    proc = image_processor_for(recipe)
    report = {}
    if captions:
        samples = read_captions(captions, image_root=image_root or None).samples
        report["retrieval"] = evaluate_retrieval(model, samples, proc)
    if zero_shot:
        report["zero_shot"] = evaluate_zero_shot(model, zero_shot, proc)
    return report
