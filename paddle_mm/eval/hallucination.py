"""Hallucination of a model: POPE on yes/no question files, CHAIR on its captions of the bundled scenes.

The metrics are eval/metrics/pope.py and chair.py (pure); this module asks the model and
builds the inputs: POPE question files for the synthetic scenes in all three settings, the
scenes' object lists for CHAIR (names as captions say them, "red circle"), and the bundled
preference pairs that train against both kinds of hallucination (train.stage dpo).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import numpy as np

from paddle_mm.data.readers import Sample, read_captions
from paddle_mm.data.synthetic import CAPTION_PROMPT, COLOURS, SHAPES, caption, position_name, scene_objects
from paddle_mm.eval.metrics.chair import chair, mentioned_objects
from paddle_mm.eval.metrics.pope import SETTINGS, pope_questions, pope_report
from paddle_mm.fileio import write_json_atomic, write_text_atomic
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


# How a rejected caption invents an object: "swap" renames one of the scene's objects as any
# colour-shape the scene lacks, "shape" and "colour" change only that one attribute (the near
# misses a model that half-sees makes: a green circle where there is a green square), "add"
# puts one more, absent, object in an empty cell. "every_shape" is one "shape" edit per object of
# the scene (each object in turn), for a model whose errors are mostly wrong shapes.
CAPTION_EDITS = ("swap", "shape", "colour", "add", "every_shape")
# The bundled pairs'. On 500 held-out scenes (tools/dpo_experiment.py --test-scenes 500) the demo's
# instruct model names a present colour 99% of the time but a present shape 71%, and adding the
# shape edit took CHAIR-i from -1.7% to -7.8% at 300 DPO steps (the colour edit was not measured).
DEFAULT_CAPTION_EDITS = ("shape", "swap", "add")


def hallucinated_scene(scene: dict, rng: np.random.Generator, edit: str, target: int | None = None) -> dict:
    """The scene with one object the image does not hold, by `edit` (CAPTION_EDITS but
    "every_shape"), changing object `target` (an index; None: drawn). A "shape" or "colour" edit
    that finds no absent object that way (every other shape of that colour is there too) is a "swap"."""
    if edit not in CAPTION_EDITS or edit == "every_shape":
        raise ValueError(f"caption edit {edit!r} is not one of {CAPTION_EDITS}")
    present = {(o["colour"], o["shape"]) for o in scene["objects"]}
    objects = [dict(o) for o in scene["objects"]]
    if edit == "add":
        grid = scene["grid"]
        taken = {(o["row"], o["col"]) for o in objects}
        free = [divmod(c, grid) for c in range(grid * grid) if divmod(c, grid) not in taken]
        row, col = free[int(rng.integers(len(free)))]
        colour, shape = _draw([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present], rng)
        objects.append({"colour": colour, "shape": shape, "row": row, "col": col,
                        "position": position_name(row, col, grid)})
        objects.sort(key=lambda o: (o["row"], o["col"]))  # captions list the objects row-major
        return {**scene, "objects": objects}
    target = objects[int(rng.integers(len(objects))) if target is None else target]
    near = {"shape": [(target["colour"], s) for s in SHAPES],
            "colour": [(c, target["shape"]) for c in COLOURS]}.get(edit, [])
    choices = [k for k in near if k not in present] or [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    target["colour"], target["shape"] = _draw(choices, rng)
    return {**scene, "objects": objects}


_MENTION = re.compile(r"^an? (\w+) (\w+) (?:at|in) the (.+)$")


def corrected_caption(own: str, scene: dict) -> str | None:
    """A model's caption mended: each "a <colour> <shape> at the <position>" becomes the scene
    object it most likely meant (the same colour in that cell, else the same colour and shape,
    else another object of that colour), and a part that means none is dropped; the objects are
    listed as the scene's captions list them. None where a part does not parse or nothing is
    left. Against the model's own caption this is a pair that differs where the model erred (as
    in RLHF-V's corrections), not in the objects it left out as the true caption does."""
    meant: list[dict] = []
    for part in re.split(r", | and ", own.strip()):
        m = _MENTION.match(part)
        if m is None:
            return None
        colour, shape, position = m.groups()
        free = [o for o in scene["objects"] if o["colour"] == colour and not any(o is x for x in meant)]
        pick = ([o for o in free if o["position"] == position] or [o for o in free if o["shape"] == shape] or free)
        if pick:
            meant.append(pick[0])
    meant.sort(key=lambda o: (o["row"], o["col"]))
    return caption({"objects": meant}) if meant else None


def _draw(choices: list, rng: np.random.Generator):
    return choices[int(rng.integers(len(choices)))]


def write_preference_pairs(data_dir: str, split: str = "train", seed: int = 0, presence_per_image: int = 3,
                           caption_edits: Sequence[str] = DEFAULT_CAPTION_EDITS, model_captions: dict | None = None,
                           model_corrections: bool = False) -> str:
    """Preference pairs (format llava_pairs) from a split's scenes, for train.stage dpo; {split}_pairs.json
    beside the demo data (never written by generate_demo_data, so the demo's files stay as they
    were). Returns its path.

    Per scene: its caption against one rejected caption per edit (of CAPTION_EDITS: the
    hallucination CHAIR counts), and POPE's adversarial questions for it (up to
    presence_per_image present objects, chosen "yes" over "no", and as many absent ones that
    co-occur most with its own, chosen "no" over "yes": as many of each, since pairs that
    mostly prefer one answer teach that answer). The co-occurrence counts are the split's own
    scenes', so pairs of the train split know nothing of the test scenes POPE is measured on.
    model_captions ({image_id: caption}, a model's own captions of the split, evaluate_chair's
    predictions): each one that names an object its scene lacks is one more rejected caption,
    the hallucination that model really makes rather than an invented one. model_corrections:
    each such caption is also rejected against itself mended (corrected_caption), where that
    names no absent object and is not the true caption.
    """
    if split == "test":
        raise ValueError(f"{data_dir}: preference pairs from the test scenes would train on the held-out "
                         "hallucination measure (POPE and CHAIR read them); use the train split")
    scenes = _scenes(data_dir, split)
    rng = np.random.default_rng([seed, len(scenes)])
    pairs = []
    for rec in scenes:
        for edit in caption_edits:
            each = range(len(rec["objects"])) if edit == "every_shape" else [None]
            for i in each:
                wrong = hallucinated_scene(rec, rng, "shape" if i is not None else edit, target=i)
                pairs.append({"id": f"{rec['image_id']}-caption-{edit}" + ("" if i is None else f"-{i}"),
                              "image": rec["image"],
                              "conversations": [{"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"}],
                              "chosen": rec["caption"], "rejected": caption(wrong)})
        own = (model_captions or {}).get(rec["image_id"])
        if own and set(mentioned_objects(own, SCENE_VOCABULARY)) - set(scene_objects(rec)):
            pairs.append({"id": f"{rec['image_id']}-caption-model", "image": rec["image"],
                          "conversations": [{"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"}],
                          "chosen": rec["caption"], "rejected": own})
            mended = corrected_caption(own, rec) if model_corrections else None
            # A mended caption that is the true one adds nothing to the pair above.
            absent = mended and set(mentioned_objects(mended, SCENE_VOCABULARY)) - set(scene_objects(rec))
            if mended and mended not in (own, rec["caption"]) and not absent:
                pairs.append({"id": f"{rec['image_id']}-caption-mended", "image": rec["image"],
                              "conversations": [{"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"}],
                              "chosen": mended, "rejected": own})
    images = [(rec["image"], scene_objects(rec)) for rec in scenes]
    ids = {rec["image"]: rec["image_id"] for rec in scenes}
    if presence_per_image:
        for q in pope_questions(images, "adversarial", presence_per_image, seed, SCENE_QUESTION):
            pairs.append({"id": f"{ids[q['image']]}-presence-{q['question_id']}", "image": q["image"],
                          "conversations": [{"from": "human", "value": f"<image>\n{q['text']}"}],
                          "chosen": q["label"], "rejected": "no" if q["label"] == "yes" else "yes"})
    path = os.path.join(data_dir, f"{split}_pairs.json")
    write_json_atomic(path, pairs)
    return path
