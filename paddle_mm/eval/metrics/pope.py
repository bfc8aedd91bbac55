"""POPE (Li et al., 2023): object hallucination as yes/no questions "is there a <object> in the image?".

Each image is asked about objects it holds (answer yes) and as many it does not (answer no),
the absent ones drawn in one of three settings: random (uniformly from the object vocabulary),
popular (the objects most frequent in the whole set) and adversarial (the objects that
co-occur most often with the image's own). The scores treat "yes" as the positive class:
accuracy, precision, recall, F1 and the yes-ratio (a model that says yes to everything
has recall 1 and yes-ratio 1: the ratio shows the bias F1 alone hides).

Pure Python, nothing of paddle_mm: the object lists come from the caller (a dataset's
annotations, or the synthetic scenes' objects).
"""
from __future__ import annotations

import random
import re
from collections import Counter

SETTINGS = ("random", "popular", "adversarial")
QUESTION = "Is there a {} in the image?"


def pope_answer(text: str) -> str:
    """A free answer read as POPE's evaluation reads it: its first sentence is "no" when it holds the
    word no or not, else "yes"."""
    first = re.split(r"[.!?\n]", text.strip(), maxsplit=1)[0]
    words = re.findall(r"[a-z']+", first.lower())
    return "no" if "no" in words or "not" in words or "n't" in first.lower() else "yes"


def pope_scores(labels: list[str], answers: list[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no answers against yes/no labels."""
    if len(labels) != len(answers):
        raise ValueError(f"{len(labels)} labels but {len(answers)} answers")
    pairs = list(zip(labels, answers))
    tp = sum(lab == "yes" and ans == "yes" for lab, ans in pairs)
    fp = sum(lab == "no" and ans == "yes" for lab, ans in pairs)
    tn = sum(lab == "no" and ans == "no" for lab, ans in pairs)
    fn = sum(lab == "yes" and ans == "no" for lab, ans in pairs)
    n = max(len(pairs), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n, "questions": len(pairs)}


def pope_report(questions: list[dict], answers: dict) -> dict:
    """Scores per setting and over all ("all") of POPE questions {"question_id", "label", "setting"?}
    and free-text answers by question_id. Every question needs an answer: a silent default would
    bias the yes-ratio."""
    missing = [q["question_id"] for q in questions if q["question_id"] not in answers]
    if missing:
        raise ValueError(f"{len(missing)} POPE questions have no answer (first: {missing[0]!r})")
    by_setting: dict[str, tuple[list, list]] = {}
    for q in questions:
        for key in {q.get("setting") or "all", "all"}:
            labels, preds = by_setting.setdefault(key, ([], []))
            labels.append(q["label"])
            preds.append(pope_answer(answers[q["question_id"]]))
    return {key: pope_scores(*lp) for key, lp in by_setting.items()}


def pope_questions(images: list[tuple[str, list[str]]], setting: str, per_image: int = 3,
                   seed: int = 0, template: str = QUESTION) -> list[dict]:
    """POPE questions in its file format ({"question_id", "image", "text", "label"}, + "setting").

    images: (image path, the objects it holds). Each image gets up to per_image present objects
    (yes) and as many absent ones (no), drawn as `setting` says; an image with no absent object
    left in the vocabulary gets fewer negatives. template: the question, "{}" the object (POPE's
    own by default). Deterministic for a seed.
    """
    if setting not in SETTINGS:
        raise ValueError(f"POPE setting {setting!r} is not one of {SETTINGS}")
    rng = random.Random(f"{seed}-{setting}")
    frequency = Counter(obj for _, objs in images for obj in set(objs))
    vocabulary = sorted(frequency)
    together: dict[str, Counter] = {}
    for _, objs in images:
        for a in set(objs):
            together.setdefault(a, Counter()).update(b for b in set(objs) if b != a)
    questions = []
    for image, objs in images:
        present = sorted(set(objs))
        positives = rng.sample(present, min(per_image, len(present)))
        absent = [o for o in vocabulary if o not in present]
        if setting == "random":
            negatives = rng.sample(absent, min(len(positives), len(absent)))
        else:
            if setting == "popular":
                score = {o: frequency[o] for o in absent}
            else:  # adversarial: how often an absent object appears beside this image's objects
                score = {o: sum(together.get(p, Counter())[o] for p in present) for o in absent}
            # Highest score first; ties broken by the seeded shuffle, not by name.
            order = rng.sample(absent, len(absent))
            negatives = sorted(order, key=lambda o: -score[o])[:len(positives)]
        for obj, label in [(o, "yes") for o in positives] + [(o, "no") for o in negatives]:
            questions.append({"question_id": len(questions), "image": image, "text": template.format(obj),
                              "label": label, "setting": setting, "object": obj})
    return questions
