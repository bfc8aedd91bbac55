"""Task inference: VQA, captioning and multi-turn chat, for one request or a JSONL file of them.

A request is {"id", "task": "vqa"|"caption"|"chat", "image": path (optional for chat),
"prompt": text} or, for chat, "messages": [{"role": "user"|"assistant", "content": text}, ...].
"images": [path, ...] in place of "image" asks about several images at once: a vqa or caption
prompt's <image> then stands for all of them, one tag a line (readers.visual_prompt); a chat's
tags say where each goes (none: all before the first message). "video": a folder of frame files
(taken in name order) or a list of them is one clip, after the images (a vqa or caption prompt)
or where a chat's <video> tag stands; Qwen2-VL models read it as a clip, the others as its frames.
Answers are appended to the output JSONL batch by batch (flushed), so a rerun skips the ids
already answered instead of starting over (a line a kill cut short is dropped and answered
again); a bad request is written to <output>.errors.jsonl with its reason and the rest go on.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

from paddle_mm.config import InferConfig
from paddle_mm.data.readers import IMAGE_TOKEN, VIDEO_TOKEN, Sample, folder_frames, visual_prompt, with_video
from paddle_mm.errors import DataError, PaddleMMError
from paddle_mm.inference.generate import generate_answers

TASKS = ("vqa", "caption", "chat")


def request_to_sample(req: dict, infer: InferConfig, source: str = "<request>", index: int = 0) -> Sample:
    """Turn one request into a Sample whose last turn is the user's (ready for generation)."""
    if not isinstance(req, dict):
        raise DataError(source, "request must be a JSON object", index)
    task = req.get("task", "vqa")
    if task not in TASKS:
        raise DataError(source, f"unknown task {task!r}; expected one of {TASKS}", index)
    images = _request_images(req, source, index)
    frames = _request_video(req, source, index)
    videos = int(frames is not None)
    try:
        if task == "caption":
            turns = [("user", visual_prompt(infer.caption_prompt, len(images), videos))]
        elif task == "vqa":
            question = req.get("prompt") or req.get("question")
            if not isinstance(question, str) or not question.strip():
                raise DataError(source, "a vqa request needs a non-empty 'prompt'", index)
            turns = [("user", visual_prompt(infer.vqa_prompt, len(images), videos).format(question=question.strip()))]
        else:
            turns = _chat_turns(req, source, index)
            tags = sum(text.count(IMAGE_TOKEN) + text.count(VIDEO_TOKEN) for _, text in turns)
            if (images or videos) and tags == 0:
                turns[0] = (turns[0][0], visual_prompt(turns[0][1], len(images), videos))
    except DataError:
        raise
    except ValueError as e:  # a prompt template that cannot be worded for several images
        raise DataError(source, str(e), index) from None
    for tag, count, noun in ((IMAGE_TOKEN, len(images), "images"), (VIDEO_TOKEN, videos, "videos")):
        tags = sum(text.count(tag) for _, text in turns)
        if tags != count:
            raise DataError(source, f"{tags} {tag} tags but {count} {noun}", index)
    sample = Sample(id=str(req.get("id", index)), images=images, turns=turns, source=source, index=index)
    return sample if frames is None else with_video(sample, frames)


def _request_images(req: dict, source: str, index: int) -> list[str]:
    """The request's image paths in order: "image" (one) or "images" (a list), each an existing file."""
    if req.get("image") and req.get("images"):
        raise DataError(source, "a request holds 'image' or 'images', not both", index)
    images = req.get("images")
    if images is None:
        images = [req["image"]] if req.get("image") else []
    elif not isinstance(images, list):
        raise DataError(source, f"'images' must be a list of image paths, got {type(images).__name__}", index)
    for path in images:
        if not isinstance(path, str) or not os.path.isfile(path):
            raise DataError(source, f"image not found: {path!r}", index)
    return list(images)


def _request_video(req: dict, source: str, index: int) -> list[str] | None:
    """The request's clip as frame files: "video" is a folder of them or a list; None without one."""
    raw = req.get("video")
    if raw is None:
        return None
    if isinstance(raw, str):
        if not os.path.isdir(raw):
            raise DataError(source, f"video folder not found: {raw!r}", index)
        frames = folder_frames(raw)
        if not frames:
            raise DataError(source, f"video folder {raw!r} holds no frame files", index)
        return frames
    if not isinstance(raw, list) or not raw:
        raise DataError(source, f"'video' must be a folder or a non-empty list of frame files, got {raw!r}", index)
    for path in raw:
        if not isinstance(path, str) or not os.path.isfile(path):
            raise DataError(source, f"video frame not found: {path!r}", index)
    return list(raw)


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
                    continue  # not an answer line; its request is answered again
    return done


def drop_cut_line(path: str) -> None:
    """Cut a last line a kill left without its newline, so the next append starts a clean line."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            chunk = f.read(pos - start)
            if pos == end and chunk.endswith(b"\n"):
                return
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            pos = start
        f.truncate(0)


def run_requests(model, tokenizer, image_processor, infer: InferConfig, input_path: str, output_path: str) -> dict:
    """Answer every request of input_path into output_path; returns counts.

    Every non-blank input line ends up either answered (now, or by an earlier run: its id is
    in the output) or in <output>.errors.jsonl with its line and reason, so total = answered +
    skipped_done + errors on every run. The errors file is rewritten by each run, which tries
    every unanswered request again. A repeated id is an error: answers are keyed by id.
    """
    errors_path = output_path + ".errors.jsonl"
    drop_cut_line(output_path)
    done = answered_ids(output_path)
    counts = {"total": 0, "answered": 0, "skipped_done": 0, "errors": 0}
    first_line: dict[str, int] = {}
    pending: list[Sample] = []
    with open(output_path, "a", encoding="utf-8") as out, open(errors_path, "w", encoding="utf-8") as err:
        def fail(line_no: int, rid, reason: str) -> None:
            err.write(json.dumps({"line": line_no, "id": rid, "error": reason}) + "\n")
            err.flush()
            counts["errors"] += 1

        def flush():
            try:
                answers = generate_answers(model, tokenizer, pending, image_processor, infer)
            except PaddleMMError:  # one bad request (an image that does not decode) must not sink the batch
                answers = {}
                for sample in pending:
                    try:
                        answers.update(generate_answers(model, tokenizer, [sample], image_processor, infer))
                    except PaddleMMError as e:
                        fail(sample.index, sample.id, str(e))
            for sample in pending:
                if sample.id in answers:
                    out.write(json.dumps({"id": sample.id, "answer": answers[sample.id]}) + "\n")
                    counts["answered"] += 1
            out.flush()
            pending.clear()

        for line_no, req in read_requests(input_path):
            counts["total"] += 1
            try:
                if isinstance(req, DataError):
                    raise req
                sample = request_to_sample(req, infer, input_path, line_no)
            except DataError as e:
                fail(line_no, req.get("id") if isinstance(req, dict) else None, str(e))
                continue
            if sample.id in first_line:
                fail(line_no, sample.id, f"{input_path}, line {line_no}: id {sample.id!r} repeats line "
                                         f"{first_line[sample.id]}")
                continue
            first_line[sample.id] = line_no
            if sample.id in done:
                counts["skipped_done"] += 1
                continue
            pending.append(sample)
            if len(pending) >= infer.batch_size:
                flush()
        if pending:
            flush()
    return counts
