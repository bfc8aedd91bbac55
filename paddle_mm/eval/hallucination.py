"""Hallucination of a model: POPE on yes/no question files, CHAIR on its captions of the bundled scenes.

The metrics are eval/metrics/pope.py and chair.py (pure); this module asks the model and
builds the inputs: POPE question files for the synthetic scenes in all three settings, and
the scenes' object lists for CHAIR (names as captions say them, "red circle").
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

from paddle_mm.data.readers import Sample, read_captions
from paddle_mm.data.synthetic import COLOURS, SHAPES, scene_objects
from paddle_mm.eval.metrics.chair import chair
from paddle_mm.eval.metrics.pope import SETTINGS, pope_questions, pope_report
from paddle_mm.fileio import write_text_atomic
from paddle_mm.inference.generate import generate_answers

SCENE_VOCABULARY = [f"{c} {s}" for c in COLOURS for s in SHAPES]


def _scenes(data_dir: str, split: str) -> list[dict]:
    with open(os.path.join(data_dir, f"{split}_scenes.json"), encoding="utf-8") as f:
        return json.load(f)


# The scenes' own phrasing of a presence question (data/synthetic.py), so the question asks what
# the demo model was taught to answer, not a paraphrase it never saw.
SCENE_QUESTION = "is there a {}?"


def write_pope_file(data_dir: str, split: str = "test", per_image: int = 3, seed: int = 0,
                    template: str = SCENE_QUESTION) -> str:
    """{split}_pope.jsonl beside the demo data: POPE's question format (+ "setting"), every setting's
    questions over the split's scenes, question ids unique across settings. Returns its path."""
    images = [(rec["image"], scene_objects(rec)) for rec in _scenes(data_dir, split)]
    lines = []
    for setting in SETTINGS:
        for q in pope_questions(images, setting, per_image, seed, template):
            lines.append(json.dumps({**q, "question_id": f"{setting}-{q['question_id']}"}))
    path = os.path.join(data_dir, f"{split}_pope.jsonl")
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def evaluate_pope(model, tokenizer, samples: Sequence[Sample], image_processor, infer, system="") -> dict:
    """POPE scores per setting and over all (samples from data.readers.read_pope), with the answers."""
    preds = generate_answers(model, tokenizer, samples, image_processor, infer, system=system)
    questions = [{"question_id": s.id, "label": s.meta["label"], "setting": s.meta["setting"]} for s in samples]
    report = pope_report(questions, preds)
    report["predictions"] = preds
    return report


def evaluate_chair(model, tokenizer, data_dir: str, split: str, image_processor, infer, system="") -> dict:
    """CHAIR-s / CHAIR-i of the model's captions of a split's scenes (its captions file's images)."""
    samples = read_captions(os.path.join(data_dir, f"{split}_captions.json"), prompt=infer.caption_prompt).samples
    # The reader resolves image paths under the data folder; the scenes name them relative to it.
    held = {os.path.abspath(os.path.join(data_dir, rec["image"])): scene_objects(rec) for rec in _scenes(data_dir, split)}
    by_id = {s.id: held[os.path.abspath(s.images[0])] for s in samples}
    preds = generate_answers(model, tokenizer, samples, image_processor, infer, system=system)
    report = chair(preds, by_id, SCENE_VOCABULARY)
    report["predictions"] = preds
    return report
