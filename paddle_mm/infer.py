"""Task inference: VQA, captioning and multi-turn chat, for one request or a JSONL file of them.

A request is {"id", "task": "vqa"|"caption"|"chat", "image": path (optional for chat),
"prompt": text} or, for chat, "messages": [{"role": "user"|"assistant", "content": text}, ...].
Answers are appended to the output JSONL one by one (flushed), so a rerun skips the ids
already answered instead of starting over; a bad request is written to <output>.errors.jsonl
with its reason and the rest go on.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

from paddle_mm.config import InferConfig
from paddle_mm.data.readers import IMAGE_TOKEN, Sample
from paddle_mm.errors import DataError
from paddle_mm.evaluate import generate_answers

TASKS = ("vqa", "caption", "chat")


def request_to_sample(req: dict, infer: InferConfig, source: str = "<request>", index: int = 0) -> Sample:
    """Turn one request into a Sample whose last turn is the user's (ready for generation)."""
    if not isinstance(req, dict):
        raise DataError(source, "request must be a JSON object", index)
    task = req.get("task", "vqa")
    if task not in TASKS:
        raise DataError(source, f"unknown task {task!r}; expected one of {TASKS}", index)
    image = req.get("image")
    images = [image] if image else []
    for path in images:
        if not isinstance(path, str) or not os.path.isfile(path):
            raise DataError(source, f"image not found: {path!r}", index)
    if task == "caption":
        turns = [("user", infer.caption_prompt)]
    elif task == "vqa":
        question = req.get("prompt") or req.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(source, "a vqa request needs a non-empty 'prompt'", index)
        turns = [("user", infer.vqa_prompt.format(question=question.strip()))]
    else:
        turns = _chat_turns(req, source, index)
    tags = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if images and tags == 0:
        role, text = turns[0]
        turns[0] = (role, f"{IMAGE_TOKEN}\n{text}")
        tags = 1
    if tags != len(images):
        raise DataError(source, f"{tags} {IMAGE_TOKEN} tags but {len(images)} images", index)
    return Sample(id=str(req.get("id", index)), images=images, turns=turns, source=source, index=index)


def _chat_turns(req: dict, source: str, index: int) -> list[tuple[str, str]]:
    messages = req.get("messages")
    if messages is None and isinstance(req.get("prompt"), str):
        messages = [{"role": "user", "content": req["prompt"]}]
    if not isinstance(messages, list) or not messages:
        raise DataError(source, "a chat request needs 'messages' (or a 'prompt')", index)
    turns = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
            raise DataError(source, f"bad chat message {m!r}: needs role user|assistant and string content", index)
        turns.append((m["role"], m["content"]))
    if turns[-1][0] != "user":
        raise DataError(source, "the last chat message must be the user's", index)
    return turns


def read_requests(path: str) -> Iterator[tuple[int, dict | DataError]]:
    """(line number, request or the DataError of a malformed line) for each non-blank line."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, DataError(path, f"invalid JSON: {e.msg} (column {e.colno})", line_no)


def answered_ids(path: str) -> set[str]:
    done: set[str] = set()
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    done.add(str(json.loads(line)["id"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut by a crash: that request is answered again
    return done


def run_requests(model, tokenizer, image_processor, infer: InferConfig, input_path: str, output_path: str) -> dict:
    """Answer every request of input_path into output_path; returns counts."""
    errors_path = output_path + ".errors.jsonl"
    done = answered_ids(output_path)
    counts = {"answered": 0, "skipped_done": 0, "errors": 0}
    pending: list[Sample] = []
    with open(output_path, "a", encoding="utf-8") as out, open(errors_path, "a", encoding="utf-8") as err:
        def flush():
            answers = generate_answers(model, tokenizer, pending, image_processor, infer)
            for s in pending:
                out.write(json.dumps({"id": s.id, "answer": answers[s.id]}) + "\n")
            out.flush()
            counts["answered"] += len(pending)
            pending.clear()

        for line_no, req in read_requests(input_path):
            try:
                if isinstance(req, DataError):
                    raise req
                sample = request_to_sample(req, infer, input_path, line_no)
            except DataError as e:
                err.write(json.dumps({"line": line_no, "id": getattr(req, "get", lambda k: None)("id"),
                                      "error": str(e)}) + "\n")
                counts["errors"] += 1
                continue
            if sample.id in done:
                counts["skipped_done"] += 1
                continue
            pending.append(sample)
            if len(pending) >= infer.batch_size:
                flush()
        if pending:
            flush()
    return counts
