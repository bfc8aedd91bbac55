"""Bundled questions over two images and over short clips, from the demo's synthetic shapes.

Opt-in beside the demo's scenes (`generate_multi_data`, never called by `generate_demo_data`, so
`paddle-mm demo` writes what it always wrote). Each item of a split is one pair of scenes and one
clip, with two questions each:

- pair ("<image>\\n<image>\\n..."): "which image has more circles?" (first / second; the counts
  always differ) and "is the red square in both images?" (yes / no, half each; a "no" object is
  always in one of the two images, so neither image alone answers it);
- clip ("<video>\\n...", frames in a folder): one shape moves a fixed step per frame ("which way
  does the red circle move?": left / right / up / down) and another appears after the first
  frame and stays ("which shape appears?": its shape, never the moving one's).

Files per split: `<split>_multi_llava.json` (LLaVA records, "image": [a, b] or "video": folder),
`<split>_multi_vqa_questions.json` / `_annotations.json` (VQAv2 layout with paddle_mm's
"image_ids" / "video" question fields, per-type scoring by question_type), pair images under
`images/<split>_pairs/`, clip frames under `videos/<split>/<k>/`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from paddle_mm.data.synthetic import COLOURS, SHAPES, render_scene, sample_scene
from paddle_mm.fileio import write_json_atomic, write_text_atomic

MULTI_TYPES = {"compare_count": "other", "in_both": "yes/no", "motion": "other", "appears": "other"}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_MULTI_VERSION = 1  # bump when the output changes, so cached files are redone


def pair_image_pattern(split: str) -> str:
    """The image_pattern (with `{image_id}`) of a split's pair images, for read_vqav2."""
    return f"images/{split}_pairs/{{image_id:05d}}.png"


def _count(scene: dict, shape: str) -> int:
    return sum(o["shape"] == shape for o in scene["objects"])


def _kinds(scene: dict) -> set:
    return {(o["colour"], o["shape"]) for o in scene["objects"]}


def sample_pair(rng: np.random.Generator, grid: int = 3, cell: int = 16) -> tuple[dict, dict, list[dict]]:
    """Two scenes and their two questions (in random order)."""
    # 50/50 so "yes" or "no" is not a free answer: drawn once, then scenes until one fits it
    # (redrawing it with the scenes would favour "no", the answer most pairs allow).
    want_yes = rng.random() < 0.5
    while True:
        a, b = sample_scene(rng, grid, cell), sample_scene(rng, grid, cell)
        in_both = sorted(_kinds(a) & _kinds(b))
        in_one = sorted(_kinds(a) ^ _kinds(b))
        differ = [s for s in SHAPES if _count(a, s) != _count(b, s)]
        if differ and (in_both if want_yes else in_one):
            break
    shape = differ[int(rng.integers(len(differ)))]
    more = "first" if _count(a, shape) > _count(b, shape) else "second"
    pool = in_both if want_yes else in_one
    colour, kind = pool[int(rng.integers(len(pool)))]
    qas = [{"question_type": "compare_count", "question": f"which image has more {shape}s?", "answer": more},
           {"question_type": "in_both", "question": f"is the {colour} {kind} in both images?",
            "answer": "yes" if want_yes else "no"}]
    return a, b, [qas[int(i)] for i in rng.permutation(2)]


def _object(colour: str, shape: str, x0: int, y0: int, size: int, rng: np.random.Generator) -> dict:
    rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, 3), 0, 255)
    return {"colour": colour, "shape": shape, "rgb": [int(v) for v in rgb], "bbox": [x0, y0, x0 + size - 1, y0 + size - 1]}


def sample_clip(rng: np.random.Generator, frames: int = 4, grid: int = 3, cell: int = 16) -> tuple[list[dict], list[dict]]:
    """The scenes of a clip's frames and its two questions (in random order).

    The moving shape keeps to one row (left / right) or column (up / down) of the grid and steps
    cell / 2 pixels a frame; the shape that appears sits in a cell off that row or column, so the
    two never overlap.
    """
    side, size = grid * cell, int(round(0.75 * cell))
    step = cell // 2
    travel = step * (frames - 1)
    if travel + size > side:
        raise ValueError(f"{frames} frames of {step} px steps do not fit a {side} px image")
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    dx, dy = DIRECTIONS[direction]
    mover_colour, mover_shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    lane = int(rng.integers(grid))  # the row (horizontal motion) or column (vertical) it keeps to
    across = lane * cell + (cell - size) // 2
    start = int(rng.integers(0, side - size - travel + 1))
    if dx + dy < 0:  # left or up: start at the far end
        start += travel
    appear_shape = str(rng.choice([s for s in SHAPES if s != mover_shape]))
    appear_colour = str(rng.choice(list(COLOURS)))
    other_lane = int(rng.choice([k for k in range(grid) if k != lane]))
    along_cell = int(rng.integers(grid))
    at = (along_cell * cell + (cell - size) // 2, other_lane * cell + (cell - size) // 2)
    appear_x, appear_y = at if dx else at[::-1]
    appear_at = int(rng.integers(1, frames))
    scenes = []
    for f in range(frames):
        along = start + f * step * (dx + dy)
        x0, y0 = (along, across) if dx else (across, along)
        objects = [_object(mover_colour, mover_shape, x0, y0, size, rng)]
        if f >= appear_at:
            objects.append(_object(appear_colour, appear_shape, appear_x, appear_y, size, rng))
        scenes.append({"grid": grid, "cell": cell, "objects": objects})
    qas = [{"question_type": "motion", "question": f"which way does the {mover_colour} {mover_shape} move?",
            "answer": direction},
           {"question_type": "appears", "question": "which shape appears?", "answer": appear_shape}]
    return scenes, [qas[int(i)] for i in rng.permutation(2)]


def _paths(out: Path, split: str) -> dict:
    return {k: str(out / f"{split}_multi_{k}.json") for k in ("llava", "vqa_questions", "vqa_annotations")}


def _save(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=6, optimize=False)  # no timestamp: same pixels, same bytes


def generate_multi_split(out_dir, split: str, num_items: int, seed: int, frames: int = 4,
                         grid: int = 3, cell: int = 16) -> dict:
    """Write one split's pairs and clips (num_items of each) and their files; returns the paths."""
    out = Path(out_dir)
    paths = _paths(out, split)
    rng = np.random.default_rng(seed)
    llava, questions, annotations = [], [], []
    for i in range(num_items):
        a, b, pair_qas = sample_pair(rng, grid, cell)
        pair_ids = [2 * i, 2 * i + 1]
        for image_id, scene in zip(pair_ids, (a, b)):
            _save(render_scene(scene, rng), out / pair_image_pattern(split).format(image_id=image_id))
        clip_scenes, clip_qas = sample_clip(rng, frames, grid, cell)
        video = f"videos/{split}/{i:05d}"
        for f, scene in enumerate(clip_scenes):
            _save(render_scene(scene, rng), out / video / f"{f}.png")
        images = [pair_image_pattern(split).format(image_id=k) for k in pair_ids]
        for kind, where, tags, qas in (("pair", {"image": images}, "<image>\n<image>\n", pair_qas),
                                       ("clip", {"video": video}, "<video>\n", clip_qas)):
            turns = []
            for k, qa in enumerate(qas):
                turns += [{"from": "human", "value": (tags if k == 0 else "") + qa["question"]},
                          {"from": "gpt", "value": qa["answer"]}]
                qid = (2 * i + (kind == "clip")) * 10 + k
                questions.append({"question_id": qid, "question": qa["question"],
                                  **({"image_ids": pair_ids} if kind == "pair" else {"video": video})})
                annotations.append({
                    "question_id": qid, "question_type": qa["question_type"],
                    "answer_type": MULTI_TYPES[qa["question_type"]], "multiple_choice_answer": qa["answer"],
                    "answers": [{"answer": qa["answer"], "answer_confidence": "yes", "answer_id": j}
                                for j in range(1, 11)]})
            llava.append({"id": f"{split}-{kind}-{i:05d}", **where, "conversations": turns})
    header = {"info": {"description": "paddle_mm synthetic shapes: two-image and clip questions"},
              "task_type": "Open-Ended", "data_type": "synthetic", "data_subtype": split}
    write_json_atomic(Path(paths["llava"]), llava)
    write_json_atomic(Path(paths["vqa_questions"]), {**header, "questions": questions})
    write_json_atomic(Path(paths["vqa_annotations"]), {**header, "annotations": annotations})
    return paths


def generate_multi_data(out_dir, num_train: int, num_val: int, num_test: int, seed: int = 0,
                        frames: int = 4, grid: int = 3, cell: int = 16) -> dict:
    """Write train/val/test pairs and clips beside the demo data (seeds of their own, distinct per
    split), a tokenizer corpus of their text and a manifest; cached by parameters."""
    out = Path(out_dir)
    params = {"num_train": num_train, "num_val": num_val, "num_test": num_test, "seed": seed, "frames": frames,
              "grid": grid, "cell": cell, "version": _MULTI_VERSION}
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    result = {split: _paths(out, split) for split in sizes}
    result["corpus"] = str(out / "multi_corpus.txt")
    manifest = out / "multi_manifest.json"
    files = [result["corpus"]] + [p for s in sizes for p in result[s].values()]
    if manifest.is_file():
        try:
            same = json.loads(manifest.read_text(encoding="utf-8")) == params
        except (OSError, ValueError):
            same = False
        if same and all(Path(p).exists() for p in files):
            return result
        manifest.unlink()  # stale: an interrupted rerun must not pass for done
    out.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate(sizes.items(), start=1):
        generate_multi_split(out, split, n, seed * 1000 + 100 + k, frames, grid, cell)
    lines = []
    for rec in json.loads(Path(result["train"]["llava"]).read_text(encoding="utf-8")):
        lines += [t["value"].replace("<image>\n", "").replace("<video>\n", "") for t in rec["conversations"]]
    write_text_atomic(out / "multi_corpus.txt", "\n".join(lines) + "\n")
    write_json_atomic(manifest, params)  # last: its presence means every file above is complete
    return result
