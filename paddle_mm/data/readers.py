"""Readers that turn the common vision-language data layouts into one in-memory record.

Every reader returns a :class:`ReadResult` of :class:`Sample` objects. All formats go through
one checker (:meth:`_Reader.make_sample`) so text, role order, ``<image>`` tag counts and image paths
are validated the same way everywhere. A bad record becomes a :class:`DataError` naming the
data file, the record index and the cause; with ``on_error="skip"`` it is collected in
``ReadResult.skipped`` and reading goes on. Errors about the file as a whole (missing file,
a JSON document that does not parse, wrong top-level type) always raise.

Several images and video: a record's "image" may be a list, one per ``<image>`` tag in reading
order. A record's "video" (a folder of frame files, taken in name order, or a list of frame files)
stands where its ``<video>`` tag is; LLaVA-style models see a video as its frames, so the reader
turns the tag into one ``<image>`` tag per frame (one a line) and puts the frames among the
images in reading order; ``Sample.videos`` remembers which images are a video's frames.
``video_frames`` (data.video_frames) keeps that many frames, evenly spaced, first and last
included. The counts must match: tags against images, ``<video>`` tags against videos.

Record indices: for a JSON list, the 0-based position in the list; for JSONL, the 0-based
line number (so ``index + 1`` is the line an editor shows; blank lines are skipped but still
counted).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from paddle_mm.data.tokenizer import IMAGE_TOKEN
from paddle_mm.errors import DataError

OnError = Literal["raise", "skip"]
VIDEO_TOKEN = "<video>"  # reader syntax only: replaced by its frames' <image> tags before tokenizing
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_TAGS = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Sample:
    id: str
    images: list[str]  # resolved image paths, in the order of their <image> tags
    turns: list[tuple[str, str]]  # (role, text), role in {"user", "assistant"}
    source: str  # data file path
    index: int  # record index (see module docstring)
    meta: dict = field(default_factory=dict)
    # (index of the first frame in images, frame count) of each video: its frames are consecutive
    # <image> tags in the text, so every model reads them as images; a video-aware processor
    # (Qwen2-VL's temporal patches) can take them back as one clip.
    videos: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class ReadResult:
    samples: list[Sample]
    skipped: list[DataError]


class _Bad(Exception):
    """A problem with the current record; turned into a DataError with file and index."""

    def __init__(self, message: str, reason: str = "bad_record"):
        super().__init__(message)
        self.reason = reason


class _Reader:
    """Holds the options shared by all formats and collects samples / skipped records."""

    def __init__(self, path, image_root, on_error, allow_outside_root, video_frames: int = 0):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.path = str(path)
        self.stem = os.path.splitext(os.path.basename(self.path))[0]
        root = os.path.dirname(self.path) if image_root is None else str(image_root)
        self.root = os.path.abspath(root)
        self.on_error = on_error
        self.allow_outside_root = allow_outside_root
        if not isinstance(video_frames, int) or video_frames < 0:
            raise ValueError(f"video_frames must be an int >= 0 (0: every frame), got {video_frames!r}")
        self.video_frames = video_frames
        self.samples: list[Sample] = []
        self.skipped: list[DataError] = []

    def record(self, index: int, build: Callable[[], Sample]) -> None:
        try:
            self.samples.append(build())
        except _Bad as exc:
            self.fail(DataError(self.path, str(exc), index, exc.reason))

    def fail(self, err: DataError) -> None:
        if self.on_error == "raise":
            raise err
        self.skipped.append(err)

    def result(self) -> ReadResult:
        return ReadResult(self.samples, self.skipped)

    def _inside_root(self, raw: Any, what: str = "image") -> str:
        """The full path of `raw` (relative to the image root), refused when it leaves the root."""
        if not isinstance(raw, str) or not raw.strip():
            raise _Bad(f"{what} path must be a non-empty string, got {raw!r}")
        if os.path.isabs(raw):
            if not self.allow_outside_root:
                raise _Bad(f"absolute {what} path {raw!r} is outside the image root {self.root} "
                           "(data.allow_outside_root: true allows it)", "image_outside_root")
            return os.path.normpath(raw)
        full = os.path.normpath(os.path.join(self.root, raw))
        rel = os.path.relpath(full, self.root)
        if (rel == ".." or rel.startswith(".." + os.sep)) and not self.allow_outside_root:
            raise _Bad(f"{what} path {raw!r} escapes the image root {self.root} "
                       "(data.allow_outside_root: true allows it)", "image_outside_root")
        return full

    def resolve(self, raw: Any) -> str:
        full = self._inside_root(raw)
        if not os.path.isfile(full):
            raise _Bad(f"image file not found: {raw!r} (looked for {full})", "image_missing")
        return full

    def frames(self, raw: Any) -> list[str]:
        """A video's frame files: a folder's image files in name order (numbers by value: 2.png before
        10.png), or a list of files; then video_frames of them, evenly spaced with the first and last
        kept (what motion is read from)."""
        if isinstance(raw, str):
            folder = self._inside_root(raw, "video")
            if not os.path.isdir(folder):
                raise _Bad(f"video folder not found: {raw!r} (looked for {folder})", "image_missing")
            paths = folder_frames(folder)
            if not paths:
                raise _Bad(f"video folder {raw!r} holds no frame files ({', '.join(FRAME_SUFFIXES)})", "image_missing")
        elif isinstance(raw, list) and raw:
            paths = [self.resolve(f) for f in raw]
        else:
            raise _Bad(f"key 'video' must be a folder or a non-empty list of frame files, got {raw!r}")
        keep = self.video_frames
        if keep == 1:
            return [paths[len(paths) // 2]]
        if keep and keep < len(paths):
            step = (len(paths) - 1) / (keep - 1)
            return [paths[round(i * step)] for i in range(keep)]
        return paths

    def make_sample(self, index, sid, images, turns, meta=None, empty_answer_ok=False, video=None) -> Sample:
        """The checks shared by every format; ``turns`` holds (role, text) with roles mapped.

        ``empty_answer_ok`` lets the last assistant turn be "" (evaluation data without answers).
        One image and no tag at all: "<image>\\n" is prepended to the first user turn; one video and
        no <video> tag: "<video>\\n" likewise. ``video``: the record's raw "video" value (see the
        module docstring).
        """
        if not turns:
            raise _Bad("conversation is empty")
        for i, (role, text) in enumerate(turns):
            open_answer = empty_answer_ok and i == len(turns) - 1 and role == "assistant" and text == ""
            if not open_answer and (not isinstance(text, str) or not text.strip()):
                raise _Bad(f"turn {i} ({role}): text must be a non-empty string, got {text!r}")
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise _Bad(f"turn {i} is {role!r} but roles must alternate starting with 'user'")
        if len(turns) < 2:
            raise _Bad("conversation has no assistant turn", "no_assistant_turn")
        turns = list(turns)
        videos = [] if video is None else [video]
        for tag, items, noun in ((VIDEO_TOKEN, videos, "videos"), (IMAGE_TOKEN, images, "images")):
            n_tags = sum(text.count(tag) for _, text in turns)
            if n_tags == len(items):
                continue
            if n_tags == 0 and len(items) == 1:
                turns[0] = ("user", f"{tag}\n{turns[0][1]}")
            else:
                limit = " (a record holds at most one video)" if tag == VIDEO_TOKEN and n_tags > 1 else ""
                raise _Bad(f"{n_tags} {tag} tags but {len(items)} {noun}{limit}", "tag_mismatch")
        resolved = [self.resolve(raw) for raw in images]
        if not videos:
            return Sample(str(sid), resolved, turns, self.path, index, dict(meta or {}))
        return self._with_frames(index, sid, resolved, self.frames(videos[0]), turns, meta)

    def _with_frames(self, index, sid, images, frames, turns, meta) -> Sample:
        return with_video(Sample(str(sid), images, turns, self.path, index, dict(meta or {})), frames)


def with_video(sample: Sample, frames: list[str]) -> Sample:
    """The sample with its one <video> tag replaced by one <image> tag per frame and the frames put
    among its images in reading order (Sample.videos records where)."""
    ordered, spans, out_turns = [], [], []
    pending = iter(sample.images)
    for role, text in sample.turns:
        pieces = []
        for piece in _TAGS.split(text):
            if piece == IMAGE_TOKEN:
                ordered.append(next(pending))
            elif piece == VIDEO_TOKEN:
                spans.append((len(ordered), len(frames)))
                ordered.extend(frames)
                piece = "\n".join([IMAGE_TOKEN] * len(frames))
            pieces.append(piece)
        out_turns.append((role, "".join(pieces)))
    return Sample(sample.id, ordered, out_turns, sample.source, sample.index, sample.meta, spans)


def folder_frames(folder: str) -> list[str]:
    """A folder's frame files in name order, numbers by value (2.png before 10.png)."""
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(FRAME_SUFFIXES)), key=_natural)
    return [os.path.join(folder, n) for n in names]


def _natural(name: str) -> list:
    """Sort key that orders the numbers in a name by value ("frame2" before "frame10")."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def visual_prompt(template: str, num_images: int, num_videos: int = 0) -> str:
    """A prompt template written for one image (infer.vqa_prompt, "<image>\\n{question}") worded for
    several images and videos: its one <image> becomes a tag per image, then a <video> tag per
    video, one a line. A template with no tag gets them in front; one with as many tags as images
    (and no video), or asked for no image at all, stays as it is."""
    count = template.count(IMAGE_TOKEN)
    if (count == num_images and num_videos == 0) or num_images + num_videos == 0:
        return template  # nothing to widen (no images: the tag count check says what is wrong)
    tags = "\n".join([IMAGE_TOKEN] * num_images + [VIDEO_TOKEN] * num_videos)
    if count == 0:
        return f"{tags}\n{template}" if tags else template
    if count == 1:
        return template.replace(IMAGE_TOKEN, tags)
    raise ValueError(f"the prompt template holds {count} {IMAGE_TOKEN} tags: it can be worded for one image "
                     f"only, not for {num_images} images and {num_videos} videos")


# ----------------------------------------------------------------------------- file loading
def _read_text(path: str) -> str:
    if not os.path.exists(path):
        raise DataError(path, "file not found")
    if not os.path.isfile(path):
        raise DataError(path, "not a regular file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read file: {exc}") from None


def _parse_json(path: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:  # json's decoder recurses once per level of nesting
        raise DataError(path, _TOO_DEEP) from None


_TOO_DEEP = "JSON nested too deeply to read (more levels than Python's recursion limit)"


def _load_json(path: str) -> Any:
    return _parse_json(path, _read_text(path))


def _iter_records(rd: _Reader):
    """Yield (index, record) of a JSON list or JSONL file; a bad JSONL line goes to rd.fail."""
    text = _read_text(rd.path)
    stripped = text.lstrip()
    jsonl = rd.path.endswith(".jsonl")
    if not jsonl and stripped.startswith("{"):
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            jsonl = exc.msg == "Extra data"  # several objects in a row: JSONL without the suffix
        except RecursionError:
            pass  # _parse_json below reports it
    if not jsonl:
        data = _parse_json(rd.path, text)
        if not isinstance(data, list):
            raise DataError(rd.path, f"expected a JSON list of records, got {type(data).__name__}")
        yield from enumerate(data)
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            rd.fail(DataError(rd.path, f"invalid JSON on line {lineno}, column {exc.colno}: {exc.msg}", lineno - 1,
                              "bad_json"))
            continue
        except RecursionError:
            rd.fail(DataError(rd.path, f"line {lineno}: {_TOO_DEEP}", lineno - 1, "bad_json"))
            continue
        yield lineno - 1, obj


def _need(rec: Any, key: str, types: type | tuple, optional: bool = False) -> Any:
    if not isinstance(rec, dict):
        raise _Bad(f"record must be a JSON object, got {type(rec).__name__}")
    if key not in rec:
        if optional:
            return None
        raise _Bad(f"missing key {key!r}")
    value = rec[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise _Bad(f"key {key!r} must be {names}, got {type(value).__name__}")
    return value


def _image_list(rec: dict) -> list:
    value = _need(rec, "image", (str, list), optional=True)
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _video(rec: dict):
    """A record's raw "video" value (checked by _Reader.frames), None when it has none."""
    return rec.get("video") if isinstance(rec, dict) else None


def _record_id(rd: _Reader, rec: dict, index: int, key: str = "id") -> str:
    value = rec.get(key)
    return f"{rd.stem}-{index}" if value is None or value == "" else str(value)


# ----------------------------------------------------------------------------- formats
def read_llava(path, image_root=None, on_error: OnError = "raise", allow_outside_root: bool = False,
               video_frames: int = 0) -> ReadResult:
    """LLaVA JSON list (or JSONL): {"id", "image"?: str | list, "video"?: folder | list of frames,
    "conversations": [{"from", "value"}, ...]}.

    Roles human/user -> "user", gpt/assistant -> "assistant"; one leading "system" turn is
    kept in meta["system"]. A record with one image and no <image> tag gets "<image>\\n"
    prepended to its first user turn (the LLaVA convention).
    """
    rd = _Reader(path, image_root, on_error, allow_outside_root, video_frames)
    for index, rec in _iter_records(rd):
        rd.record(index, lambda: _llava_sample(rd, index, rec))
    return rd.result()


def _llava_sample(rd: _Reader, index: int, rec: Any) -> Sample:
    """One LLaVA record through the shared checker (read_llava's and read_llava_pairs' records)."""
    convs = _need(rec, "conversations", list)
    meta, turns = {}, []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise _Bad(f"turn {i} must be an object with 'from' and 'value'")
        role, text = turn.get("from"), turn.get("value")
        if role == "system" and i == 0:
            if not isinstance(text, str):
                raise _Bad(f"turn {i} (system): text must be a string, got {text!r}")
            meta["system"] = text
            continue
        if not isinstance(role, str) or role not in _ROLES:
            raise _Bad(f"turn {i}: unknown role {role!r} (expected human/gpt or user/assistant)")
        turns.append((_ROLES[role], text))
    return rd.make_sample(index, _record_id(rd, rec, index), _image_list(rec), turns, meta, video=_video(rec))


def read_llava_pairs(path, image_root=None, on_error: OnError = "raise", allow_outside_root: bool = False,
                     video_frames: int = 0) -> ReadResult:
    """Preference pairs, LLaVA-style: {"id", "image"?, "conversations": [... ending on a user turn],
    "chosen": str, "rejected": str} (the layout ms-swift and LLaMA-Factory take, and RLAIF-V /
    VLFeedback-style sets convert to).

    The Sample's turns end with the chosen answer (so everything that reads a conversation reads
    it, check-data included); the rejected answer is meta["rejected"] (see :func:`pair_turns`).
    Identical answers teach nothing and are a bad record, as is an <image> tag with no image.
    """
    rd = _Reader(path, image_root, on_error, allow_outside_root, video_frames)

    def build(index: int, rec: Any) -> Sample:
        chosen, rejected = _need(rec, "chosen", str), _need(rec, "rejected", str)
        if not chosen.strip() or not rejected.strip():
            raise _Bad("'chosen' and 'rejected' must be non-empty answers")
        if chosen.strip() == rejected.strip():
            raise _Bad("'chosen' and 'rejected' are the same answer: the pair prefers nothing", "identical_answers")
        convs = _need(rec, "conversations", list)
        last = convs[-1] if convs else None
        if not isinstance(last, dict) or _ROLES.get(last.get("from")) != "user":
            raise _Bad("the conversation must end with the user turn that 'chosen' and 'rejected' answer")
        pair = dict(rec, conversations=convs + [{"from": "gpt", "value": chosen}])
        sample = _llava_sample(rd, index, pair)
        sample.meta["rejected"] = rejected
        return sample

    for index, rec in _iter_records(rd):
        rd.record(index, lambda: build(index, rec))
    return rd.result()


def pair_turns(sample: Sample) -> tuple[list, list]:
    """A preference Sample's (chosen turns, rejected turns): the same conversation, two final answers."""
    if "rejected" not in sample.meta:
        raise DataError(sample.source, "not a preference pair (no rejected answer; format llava_pairs)",
                        sample.index)
    return list(sample.turns), sample.turns[:-1] + [("assistant", sample.meta["rejected"])]


def read_chatml(path, image_root=None, on_error: OnError = "raise", allow_outside_root: bool = False,
                video_frames: int = 0) -> ReadResult:
    """PaddleMIX chatml layout: {"image"?: str | list, "video"?: folder | list of frames,
    "conversations": [[user, assistant], ...]}."""
    rd = _Reader(path, image_root, on_error, allow_outside_root, video_frames)

    def build(index: int, rec: Any) -> Sample:
        turns = []
        for i, pair in enumerate(_need(rec, "conversations", list)):
            if not isinstance(pair, list) or len(pair) != 2:
                raise _Bad(f"conversation {i} must be a [user_text, assistant_text] pair")
            turns += [("user", pair[0]), ("assistant", pair[1])]
        return rd.make_sample(index, _record_id(rd, rec, index), _image_list(rec), turns, video=_video(rec))

    for index, rec in _iter_records(rd):
        rd.record(index, lambda: build(index, rec))
    return rd.result()


def read_captions(path, image_root=None, on_error: OnError = "raise", allow_outside_root: bool = False,
                  prompt: str = f"{IMAGE_TOKEN}\nDescribe the image briefly.") -> ReadResult:
    """COCO Karpathy (LAVIS) list of {"image", "caption": str | list[str], "image_id"?}.

    A list caption gives one Sample answering with the first caption and
    meta["references"] holding the whole list.
    """
    rd = _Reader(path, image_root, on_error, allow_outside_root)

    def build(index: int, rec: Any) -> Sample:
        image = _need(rec, "image", str)
        caption = _need(rec, "caption", (str, list))
        meta = {"image_id": rec["image_id"]} if rec.get("image_id") is not None else {}
        if isinstance(caption, list):
            if not caption or not all(isinstance(c, str) and c.strip() for c in caption):
                raise _Bad("key 'caption' must be a non-empty list of non-empty strings")
            meta["references"] = list(caption)
            caption = caption[0]
        sid = _record_id(rd, rec, index, key="image_id")
        return rd.make_sample(index, sid, [image], [("user", prompt), ("assistant", caption)], meta)

    for index, rec in _iter_records(rd):
        rd.record(index, lambda: build(index, rec))
    return rd.result()


def read_pope(path, image_root=None, on_error: OnError = "raise", allow_outside_root: bool = False) -> ReadResult:
    """POPE question files: JSONL (or a JSON list) of {"question_id", "image", "text", "label": yes|no},
    with an optional "setting" (random / popular / adversarial; POPE ships one file per setting).
    One Sample per question, its answer open; meta holds label, setting and question_id."""
    rd = _Reader(path, image_root, on_error, allow_outside_root)

    def build(index: int, rec: Any) -> Sample:
        qid = _need(rec, "question_id", (int, str))
        label = _need(rec, "label", str).strip().lower()
        if label not in ("yes", "no"):
            raise _Bad(f"label must be 'yes' or 'no', got {rec['label']!r}")
        text = _need(rec, "text", str)
        meta = {"question_id": qid, "label": label, "setting": str(rec.get("setting") or "")}
        return rd.make_sample(index, str(qid), [_need(rec, "image", str)],
                              [("user", f"{IMAGE_TOKEN}\n{text}"), ("assistant", "")], meta, empty_answer_ok=True)

    for index, rec in _iter_records(rd):
        rd.record(index, lambda: build(index, rec))
    return rd.result()


def read_vqav2(questions_path, annotations_path=None, image_root=None, on_error: OnError = "raise",
               allow_outside_root: bool = False, image_pattern: str = "COCO_{split}_{image_id:012d}.jpg",
               split: str = "val2014",
               prompt_template: str = f"{IMAGE_TOKEN}\n{{question}}\nAnswer the question using a single word or phrase.",
               video_frames: int = 0) -> ReadResult:
    """Official VQAv2 question (and optional annotation) files; one Sample per question.

    paddle_mm's extension for questions over several images or a video (the bundled multi-image
    and clip questions): a question may hold "image_ids": [...] instead of "image_id", each one
    mapped through image_pattern, and a "video" (a frame folder or list, relative to the image
    root), in which case the image is optional. The template's <image> then stands for all of
    them (visual_prompt).
    """
    rd = _Reader(questions_path, image_root, on_error, allow_outside_root, video_frames)
    questions = _top_list(rd.path, "questions")
    annotations: dict[Any, dict] = {}
    if annotations_path is not None:
        for i, ann in enumerate(_top_list(str(annotations_path), "annotations")):
            if isinstance(ann, dict) and isinstance(ann.get("question_id"), (int, str)):
                annotations[ann["question_id"]] = ann
            else:
                rd.fail(DataError(str(annotations_path), "annotation must be an object with an int or string "
                                                         "'question_id'", i))

    def build(index: int, rec: Any) -> Sample:
        qid = _need(rec, "question_id", (int, str))
        video = _video(rec)
        if isinstance(rec, dict) and "image_ids" in rec:
            image_id = _need(rec, "image_ids", list)
            image_ids = image_id
        else:
            image_id = _need(rec, "image_id", (int, str), optional=video is not None)
            image_ids = [] if image_id is None else [image_id]
        question = _need(rec, "question", str)
        images = []
        for one in image_ids:
            try:
                images.append(image_pattern.format(split=split, image_id=one))
            except (ValueError, KeyError, IndexError) as exc:
                raise _Bad(f"image_pattern {image_pattern!r} cannot format image_id {one!r}: {exc}") from None
        try:
            template = visual_prompt(prompt_template, len(images), 0 if video is None else 1)
        except ValueError as exc:
            raise _Bad(str(exc)) from None
        meta: dict[str, Any] = {"question_id": qid, "image_id": image_id}
        answer = ""
        if annotations_path is not None:
            if qid not in annotations:
                raise _Bad(f"no annotation for question_id {qid!r}")
            ann = annotations[qid]
            answers = _need(ann, "answers", list)
            if not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
                raise _Bad(f"annotation of question_id {qid!r}: each answer must be an object with a string 'answer'")
            answer = _need(ann, "multiple_choice_answer", str)
            meta.update(answers=[a["answer"] for a in answers], question_type=ann.get("question_type"),
                        answer_type=ann.get("answer_type"))
        turns = [("user", template.format(question=question)), ("assistant", answer)]
        return rd.make_sample(index, str(qid), images, turns, meta, empty_answer_ok=True, video=video)

    for index, rec in enumerate(questions):
        rd.record(index, lambda: build(index, rec))
    return rd.result()


def _top_list(path: str, key: str) -> list:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(path, f"expected a JSON object with a {key!r} list")
    return data[key]


def read_dataset(path, format: Literal["llava", "llava_pairs", "chatml", "caption", "vqav2"], **kw) -> ReadResult:
    """Dispatch to the reader of ``format``; for "vqav2" ``path`` is the questions file."""
    readers = {"llava": read_llava, "llava_pairs": read_llava_pairs, "chatml": read_chatml, "caption": read_captions, "vqav2": read_vqav2}
    if format not in readers:
        raise ValueError(f"unknown data format {format!r}; expected one of {sorted(readers)}")
    return readers[format](path, **kw)
