"""`paddle-mm check-data`: find what would go wrong with a recipe's training data before a run.

Reads every dataset of `data.train` and `data.eval` the way training does (the held-out sets
are read and checked like the training data), but collects every problem instead
of stopping at the first: records that do not parse, conversations without an assistant
turn, `<image>` (and `<video>`) tags that do not match the images (and videos: a folder of frames or a
list of frame files), a text whose image token positions differ from its images' tokens, image paths outside the image root,
missing images, images that do not decode, samples longer than `data.max_length` (training
drops them, it never cuts), samples with nothing to learn (an empty loss mask), and repeated
samples (a held-out sample that repeats a training one is reported too). Each bad record is
counted once, under the first problem found, in this order: reading (JSON, record layout,
turns, tags, paths), images, tokenization.

The report (JSON) holds the counts by reason with the first few examples of each, the
token-length statistics and the bad fraction; the command exits 1 when that fraction is above
--max-bad-fraction (default 0: any bad record fails the check) or a data file cannot be read.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from paddle_mm.config import Recipe
from paddle_mm.data.tokenizer import IGNORE_INDEX
from paddle_mm.errors import DataError

# reason -> what it means. Errors make a sample unusable; warnings do not.
ERRORS = {
    "bad_file": "the data file cannot be read at all",
    "bad_json": "a JSONL line is not valid JSON",
    "bad_record": "a record lacks a key, has a wrong type or a malformed turn",
    "no_assistant_turn": "the conversation has no assistant turn",
    "tag_mismatch": "the number of <image> (<video>) tags differs from the number of images (videos), or the "
                    "tokenized text's image positions from its images' tokens",
    "image_outside_root": "an image path leads outside the dataset's image root",
    "image_missing": "an image file does not exist",
    "image_unreadable": "an image file exists but does not decode",
    "too_long": "the tokenized sample is longer than data.max_length (dropped, never cut)",
    "empty_loss_mask": "no assistant token to learn from",
    "identical_answers": "a preference pair whose chosen and rejected answers are the same",
}
WARNINGS = {"duplicate": "the same images and turns as an earlier sample"}
EXAMPLES = 5


class _Tally:
    def __init__(self):
        self.by_reason: dict[str, dict] = {}

    def add(self, reason: str, path: str, record, sample_id: str | None, message: str) -> None:
        entry = self.by_reason.setdefault(reason, {
            "count": 0, "severity": "warning" if reason in WARNINGS else "error",
            "meaning": WARNINGS.get(reason) or ERRORS.get(reason, ""), "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES:
            entry["examples"].append({"path": path, "record": record, "id": sample_id, "message": message})

    def error(self, err: DataError, sample_id: str | None = None) -> None:
        reason = err.reason if err.reason in ERRORS else "bad_record"
        self.add(reason, err.path, err.record, sample_id, str(err))


def check_data(recipe: Recipe, decode_images: bool = True) -> dict:
    """Check every record of recipe.data.train and data.eval; returns the report (see the module docstring)."""
    from paddle_mm import builder
    from paddle_mm.data.dataset import check_encoded, encode_turns, image_token_counts
    from paddle_mm.data.readers import pair_turns

    tokenizer = builder.load_tokenizer(recipe)
    tokens_per_image = builder.fixed_image_tokens(builder.model_config_for(recipe, tokenizer))
    processor = builder.image_processor_for(recipe)
    collecting = replace(recipe, data=replace(recipe.data, on_error="skip"))
    tally, datasets, lengths, empty_masks = _Tally(), [], [], 0
    image_errors: dict[str, DataError | None] = {}
    seen: dict[tuple, str] = {}
    for split, spec in [("train", s) for s in recipe.data.train] + [("eval", s) for s in recipe.data.eval]:
        entry = {"path": spec.path, "format": spec.format, "split": split, "records": 0, "usable": 0}
        datasets.append(entry)
        try:
            samples, skipped = builder.read_samples([replace(spec, repeat=1)], collecting)
        except DataError as err:
            tally.add("bad_file", err.path, None, None, str(err))
            entry["unreadable"] = True
            continue
        entry["records"] = len(samples) + len(skipped)
        for err in skipped:
            tally.error(err)
        for sample in samples:
            problem = None
            if decode_images:
                problem = next((e for e in (_decode(p, processor, image_errors) for p in sample.images) if e), None)
                if problem is not None:  # the image's error, told as this record's
                    problem = DataError(sample.source, f"image {problem.path}: {problem.cause}", sample.index,
                                        problem.reason)
            try:
                # A preference pair (llava_pairs) trains both answers' rows: check the rejected one too.
                for turns in pair_turns(sample) if "rejected" in sample.meta else [sample.turns]:
                    counts = image_token_counts(sample, tokens_per_image, processor)
                    ids, labels = encode_turns(sample, turns, tokenizer, counts, recipe.data.system_prompt)
                    lengths.append(len(ids))
                    empty_masks += all(label == IGNORE_INDEX for label in labels)
                    if problem is None:
                        check_encoded(sample, ids, labels, recipe.data.max_length)
            except DataError as err:
                problem = problem or DataError(sample.source, err.cause, sample.index, err.reason)
            if problem is not None:
                tally.error(problem, sample.id)
                continue
            key = (tuple(sample.images), tuple(sample.turns))
            if key in seen:
                tally.add("duplicate", sample.source, sample.index, sample.id, f"same as {seen[key]}")
            else:
                seen[key] = f"{sample.source}, record {sample.index}"
            entry["usable"] += 1
    return _report(recipe, datasets, tally, lengths, empty_masks)


def _decode(path: str, processor, cache: dict) -> DataError | None:
    """The error of decoding `path` (None when it decodes); each file is decoded once."""
    if path not in cache:
        try:
            processor.load(path)
            cache[path] = None
        except DataError as err:
            cache[path] = err
    return cache[path]


def _report(recipe: Recipe, datasets: list, tally: _Tally, lengths: list, empty_masks: int) -> dict:
    records = sum(d["records"] for d in datasets)
    usable = sum(d["usable"] for d in datasets)
    bad = records - usable
    arr = np.asarray(lengths or [0])
    return {
        "datasets": datasets,
        "records": records,
        "usable": usable,
        "bad": bad,
        "bad_fraction": bad / records if records else 0.0,
        "unreadable_files": sum(1 for d in datasets if d.get("unreadable")),
        "by_reason": dict(sorted(tally.by_reason.items(), key=lambda kv: -kv[1]["count"])),
        "tokens": {
            "max_length": recipe.data.max_length,
            "samples": len(lengths),
            "max": int(arr.max()),
            "mean": round(float(arr.mean()), 1),
            "p50": int(np.percentile(arr, 50)),
            "p95": int(np.percentile(arr, 95)),
            "over_max_length": int((arr > recipe.data.max_length).sum()) if lengths else 0,
        },
        "empty_loss_mask": empty_masks,
        "empty_loss_mask_fraction": empty_masks / len(lengths) if lengths else 0.0,
    }


def passed(report: dict, max_bad_fraction: float) -> bool:
    return report["unreadable_files"] == 0 and report["records"] > 0 and report["bad_fraction"] <= max_bad_fraction


def summary(report: dict, max_bad_fraction: float) -> str:
    """The printed form: totals, then each reason with its first examples."""
    lines = [f"check-data: {report['records']} records in {len(report['datasets'])} file(s): "
             f"{report['usable']} usable, {report['bad']} bad ({report['bad_fraction']:.1%}; "
             f"allowed {max_bad_fraction:.1%})"]
    for reason, entry in report["by_reason"].items():
        lines.append(f"  {reason:<19} {entry['count']:>6}  {entry['severity']}: {entry['meaning']}")
        for ex in entry["examples"][:3]:
            lines.append(f"      {ex['message']}")
    t = report["tokens"]
    lines.append(f"tokens: max {t['max']} (max_length {t['max_length']}), mean {t['mean']}, p50 {t['p50']}, "
                 f"p95 {t['p95']}; {t['over_max_length']} over max_length would be dropped (never cut)")
    lines.append(f"empty loss mask: {report['empty_loss_mask']} of {t['samples']} tokenized samples "
                 f"({report['empty_loss_mask_fraction']:.1%})")
    lines.append("PASSED" if passed(report, max_bad_fraction) else "FAILED")
    return "\n".join(lines)


def default_report_path(recipe: Recipe) -> str:
    return os.path.join(recipe.train.output_dir, "check_data.json")
