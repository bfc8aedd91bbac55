"""Bundled demo dataset: deterministic synthetic scenes of coloured shapes on a grid.

It exists to prove, in minutes on a CPU, that a tiny vision-language model learns: every
caption and answer is a pure function of the scene, so a model that reads the image can reach
near-perfect scores. The files are written in the layouts users already have (LLaVA JSON,
COCO-Karpathy captions, official VQAv2 questions/annotations), so the normal readers load them
and the demo exercises the same code paths as real data.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from paddle_mm.fileio import write_json_atomic, write_text_atomic

# Clearly distinct hues, far from the light-gray background even after the +-15 jitter.
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 200, 30),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle")
QUESTION_TYPES = ("colour", "shape", "count", "position", "presence")
ANSWER_TYPES = {"colour": "other", "shape": "other", "count": "number",
                "position": "other", "presence": "yes/no"}
POSITIONS_3X3 = (("top left", "top", "top right"),
                 ("left", "center", "right"),
                 ("bottom left", "bottom", "bottom right"))
BACKGROUND = 235
VQA_IMAGE_PATTERN = "images/{split}/{image_id:05d}.png"
_FORMAT_VERSION = 2  # bump when the generator's output changes, so cached demo data is redone


def vqa_image_pattern(split: str) -> str:
    """The `str.format` pattern (with `{image_id}`) mapping a VQA image_id to its image path."""
    return VQA_IMAGE_PATTERN.replace("{split}", split)


def position_name(row: int, col: int, grid: int = 3) -> str:
    if grid != 3:
        raise ValueError(f"position names are defined for a 3x3 grid only, got grid={grid}")
    return POSITIONS_3X3[row][col]


def _at(pos: str) -> str:
    # "in the center" reads naturally; every other cell is "at the ...".
    return "in the center" if pos == "center" else f"at the {pos}"


def sample_scene(rng: np.random.Generator, grid: int = 3, cell: int = 16) -> dict:
    """Draw the objects of one scene (no pixels): 1-3 objects in distinct cells, row-major."""
    n = int(rng.integers(1, 4))
    cells = sorted(int(c) for c in rng.choice(grid * grid, size=n, replace=False))
    while True:
        kinds = [(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))) for _ in cells]
        # Reject scenes where every object is the same colour+shape: nothing could be asked
        # about a single object's position, and each image should carry 4-5 QA turns.
        if n == 1 or len(set(kinds)) > 1:
            break
    objects = []
    for c, (colour, shape) in zip(cells, kinds):
        row, col = divmod(c, grid)
        rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, 3), 0, 255)
        size = int(round(rng.uniform(0.65, 0.9) * cell))
        # Centre the box in its cell, jitter by +-1 px, then clamp so it never leaves the cell.
        dx, dy = (int(v) for v in rng.integers(-1, 2, 2))
        x0 = col * cell + min(max((cell - size) // 2 + dx, 0), cell - size)
        y0 = row * cell + min(max((cell - size) // 2 + dy, 0), cell - size)
        objects.append({"colour": colour, "shape": shape, "row": row, "col": col,
                        "position": position_name(row, col, grid), "rgb": [int(v) for v in rgb],
                        "bbox": [x0, y0, x0 + size - 1, y0 + size - 1]})
    return {"grid": grid, "cell": cell, "objects": objects}


def render_scene(scene: dict, rng: np.random.Generator) -> Image.Image:
    side = scene["grid"] * scene["cell"]
    # Per-pixel noise so the background is not trivially flat.
    bg = BACKGROUND + rng.integers(-8, 9, (side, side, 3))
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        x0, y0, x1, y1 = obj["bbox"]
        fill = tuple(obj["rgb"])
        if obj["shape"] == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:  # upward isosceles triangle: apex at top centre, base along the bottom edge
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


def caption(scene: dict) -> str:
    parts = [f"a {o['colour']} {o['shape']} {_at(o['position'])}" for o in scene["objects"]]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def candidate_questions(scene: dict) -> dict:
    """All unambiguous (question, answer) pairs of each type, except presence (sampled)."""
    objs = scene["objects"]
    shape_n = {s: sum(o["shape"] == s for o in objs) for s in SHAPES}
    pair_n = {}
    for o in objs:
        pair_n[(o["colour"], o["shape"])] = pair_n.get((o["colour"], o["shape"]), 0) + 1
    return {
        "colour": [(f"what colour is the {o['shape']}?", o["colour"])
                   for o in objs if shape_n[o["shape"]] == 1],
        "shape": [(f"what shape is {_at(o['position'])}?", o["shape"]) for o in objs],
        "count": [("how many shapes are there?", str(len(objs)))],
        "position": [(f"where is the {o['colour']} {o['shape']}?", o["position"])
                     for o in objs if pair_n[(o["colour"], o["shape"])] == 1],
    }


def sample_questions(scene: dict, rng: np.random.Generator) -> list[dict]:
    """One question of each possible type, in random order."""
    cands = candidate_questions(scene)
    present = sorted({(o["colour"], o["shape"]) for o in scene["objects"]})
    if rng.random() < 0.5:  # 50/50 yes/no so "yes" is not a free answer
        colour, shape = present[int(rng.integers(len(present)))]
        answer = "yes"
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        colour, shape = absent[int(rng.integers(len(absent)))]
        answer = "no"
    cands["presence"] = [(f"is there a {colour} {shape}?", answer)]
    qas = []
    for qtype in QUESTION_TYPES:
        if cands[qtype]:
            q, a = cands[qtype][int(rng.integers(len(cands[qtype])))]
            qas.append({"question_type": qtype, "question": q, "answer": a})
    return [qas[int(i)] for i in rng.permutation(len(qas))]


def _split_paths(out: Path, split: str) -> dict:
    return {"images": str(out / "images" / split),
            **{k: str(out / f"{split}_{k}.json")
               for k in ("llava", "captions", "vqa_questions", "vqa_annotations", "scenes")}}


CAPTION_PROMPT = "Describe the image briefly."  # the caption prompt of the demo recipes


def generate_split(out_dir, split: str, num_images: int, seed: int,
                   grid: int = 3, cell: int = 16) -> dict:
    """Write one split's images and annotation files; returns their paths by kind."""
    position_name(0, 0, grid)  # fail early on unsupported grids
    out = Path(out_dir)
    paths = _split_paths(out, split)
    Path(paths["images"]).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    llava, captions, questions, annotations, scenes = [], [], [], [], []
    for i in range(num_images):
        scene = sample_scene(rng, grid, cell)
        rel = f"images/{split}/{i:05d}.png"
        # Fixed PNG settings: PIL writes no timestamp, so identical pixels give identical bytes.
        render_scene(scene, rng).save(out / rel, format="PNG", compress_level=6, optimize=False)
        qas = sample_questions(scene, rng)
        cap = caption(scene)
        key = f"{split}-{i:05d}"
        # The conversation also asks for the caption, at a random turn: every training
        # sequence then carries both signals, with no short caption-only sample to pad.
        dialogue = [(qa["question"], qa["answer"]) for qa in qas]
        dialogue.insert(int(rng.integers(0, len(dialogue) + 1)), (CAPTION_PROMPT, cap))
        turns = []
        for k, (question, answer) in enumerate(dialogue):
            turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + question})
            turns.append({"from": "gpt", "value": answer})
        for k, qa in enumerate(qas):
            qid = i * 10 + k
            questions.append({"image_id": i, "question": qa["question"], "question_id": qid})
            annotations.append({
                "question_id": qid, "image_id": i, "question_type": qa["question_type"],
                "answer_type": ANSWER_TYPES[qa["question_type"]],
                "multiple_choice_answer": qa["answer"],
                "answers": [{"answer": qa["answer"], "answer_confidence": "yes", "answer_id": j}
                            for j in range(1, 11)]})
        llava.append({"id": key, "image": rel, "conversations": turns})
        # Evaluation splits use the Karpathy test layout: a list of reference captions.
        captions.append({"image": rel, "image_id": key,
                         "caption": [cap] if split in ("test", "val") else cap})
        scenes.append({"image_id": key, "image": rel, "caption": cap, "qas": qas, **scene})
    header = {"info": {"description": "paddle_mm synthetic shapes demo"},
              "task_type": "Open-Ended", "data_type": "synthetic", "data_subtype": split}
    write_json_atomic(Path(paths["llava"]), llava)
    write_json_atomic(Path(paths["captions"]), captions)
    write_json_atomic(Path(paths["vqa_questions"]), {**header, "questions": questions})
    write_json_atomic(Path(paths["vqa_annotations"]), {**header, "annotations": annotations})
    write_json_atomic(Path(paths["scenes"]), scenes)
    return paths


def write_zero_shot_task(data_dir, split: str = "test", template: str = "a {}") -> str:
    """A zero-shot classification task over a split's one-object scenes: which of the 15
    colour-shape classes is it? Prompts ("a red circle") leave the position out, so a model
    must match a phrase it never saw whole. Returns the task file's path."""
    data = Path(data_dir)
    scenes = json.loads((data / f"{split}_scenes.json").read_text(encoding="utf-8"))
    classes = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    images = [{"image": rec["image"], "label": f"{rec['objects'][0]['colour']} {rec['objects'][0]['shape']}"}
              for rec in scenes if len(rec["objects"]) == 1]
    path = data / f"{split}_zero_shot.json"
    write_json_atomic(path, {"template": template, "classes": classes, "images": images})
    return str(path)


def scene_objects(scene: dict) -> list[str]:
    """The objects a scene holds, as captions name them ("red circle"), in scene order."""
    return [f"{o['colour']} {o['shape']}" for o in scene["objects"]]


def generate_demo_data(out_dir, num_train: int, num_val: int, num_test: int,
                       seed: int = 0, grid: int = 3, cell: int = 16) -> dict:
    """Write train/val/test splits, the tokenizer corpus and a manifest; cached by parameters."""
    out = Path(out_dir)
    params = {"num_train": num_train, "num_val": num_val, "num_test": num_test, "seed": seed,
              "grid": grid, "cell": cell, "version": _FORMAT_VERSION}
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    result = {split: _split_paths(out, split) for split in sizes}
    result["corpus"] = str(out / "corpus.txt")
    result["manifest"] = str(out / "manifest.json")
    manifest = out / "manifest.json"
    if manifest.is_file():
        try:
            same = json.loads(manifest.read_text(encoding="utf-8")) == params
        except (OSError, ValueError):
            same = False
        files = [result["corpus"]] + [p for s in sizes for k, p in result[s].items() if k != "images"]
        if same and all(os.path.exists(p) for p in files):
            return result
        manifest.unlink()  # stale: drop it first so an interrupted rerun is not mistaken for done
    out.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate(sizes.items(), start=1):
        generate_split(out, split, n, seed * 1000 + k, grid, cell)  # distinct seed per split
    lines = []
    for rec in json.loads(Path(result["train"]["scenes"]).read_text(encoding="utf-8")):
        lines.append(rec["caption"])
        for qa in rec["qas"]:
            lines += [qa["question"], qa["answer"]]
    write_text_atomic(out / "corpus.txt", "\n".join(lines) + "\n")
    write_json_atomic(manifest, params)  # last, so its presence means every file above is complete
    return result
