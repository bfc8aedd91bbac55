"""Qwen2-VL's inputs: images and video frames at their own resolution, their patches in the
order the encoder reads, and the prompt's vision pads and 3-row (M-RoPE) positions.

Computed as transformers' PIL processor does (Qwen2VLImageProcessor in 4.57,
Qwen2VLImageProcessorPil in 5.x):
- smart resize: each side rounded to a multiple of patch * merge (28), then scaled as a whole
  into [min_pixels, max_pixels] (the checkpoint's preprocessor_config.json / processor_config.json);
  bicubic through PIL, rescale and normalize as data/image.py does.
- patches: an image is one frame repeated to the temporal patch (2); a video's frames go in
  pairs (the last repeated when their count is odd). Rows run over (t, h / merge, w / merge,
  merge row, merge column), so each 2 x 2 block the merger joins is 4 consecutive rows;
  columns over (channel, frame of the pair, patch row, patch column): one Conv3D input.
- each image gives grid t*h*w / merge^2 LM tokens: its <|image_pad|> is widened to that many.
- positions (`rope_index`): text counts on by one in all three rows; a vision block gets
  (t, row, column) offsets from the position after the text before it, and the text after it
  continues from the block's largest position + 1 (transformers 5.x: from the block's start +
  max(rows, columns); RopeTokens.advance). Qwen2.5-VL spaces a video's t by tokens_per_second *
  seconds per temporal patch. Decoding continues at cache length + delta.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from paddle_mm.data.image import ImageInput, load_image, normalized_hwc, pil_filter, resample_name
from paddle_mm.errors import DataError
from paddle_mm.fileio import read_json_object

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Qwen2VLImageSettings:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255
    normalize: bool = True
    # video frames: their own pixel bounds (the video processor's; 0: the images'), taken as sampled
    # at fps (Qwen2.5-VL's temporal positions count seconds)
    video_min_pixels: int = 0
    video_max_pixels: int = 0
    fps: float = 2.0

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) as multiples of factor, the area within [min_pixels, max_pixels], the aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"an image of {width}x{height} is more than 200 times as long as it is wide")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _section(folder: str, own_file: str, key: str) -> tuple[dict, str]:
    """(settings, the file they came from) of one of a folder's processors: transformers 4.57's own
    file, or 5.x's entry `key` of processor_config.json; ({}, folder) when neither is there."""
    for name, entry in ((own_file, None), ("processor_config.json", key)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            found = read_json_object(path, lambda reason, p=path: DataError(p, reason))
            found = found.get(entry) if entry else found
            if isinstance(found, dict):
                return found, path
    return {}, folder


def _pixel_bounds(raw: dict, default_min: int, default_max: int) -> tuple[int, int]:
    """min_pixels / max_pixels, which override size's shortest_edge / longest_edge (as transformers'
    constructors apply them)."""
    size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
    low = raw.get("min_pixels") or size.get("shortest_edge") or default_min
    high = raw.get("max_pixels") or size.get("longest_edge") or default_max
    return int(low), int(high)


def settings_from_folder(folder: str) -> Qwen2VLImageSettings:
    """The image (and video) settings a Qwen2-VL folder ships (4.57: preprocessor_config.json and
    video_preprocessor_config.json; 5.x: their entries in processor_config.json); the defaults
    where it has none."""
    raw, source = _section(folder, "preprocessor_config.json", "image_processor")
    video, _ = _section(folder, "video_preprocessor_config.json", "video_processor")
    kind = str(raw.get("image_processor_type", "Qwen2VLImageProcessor"))
    if not kind.startswith(("Qwen2VLImageProcessor", "Qwen2_5_VLImageProcessor")):
        raise DataError(source, f"image processor {kind!r} is not Qwen2-VL's")
    defaults = Qwen2VLImageSettings()
    try:
        low, high = _pixel_bounds(raw, defaults.min_pixels, defaults.max_pixels)
        video_low, video_high = _pixel_bounds(video, 0, 0)
        return Qwen2VLImageSettings(
            patch_size=int(raw.get("patch_size", 14)), temporal_patch_size=int(raw.get("temporal_patch_size", 2)),
            merge_size=int(raw.get("merge_size", 2)), min_pixels=low, max_pixels=high,
            mean=tuple(float(m) for m in raw.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(float(s) for s in raw.get("image_std", OPENAI_CLIP_STD)),
            resample=resample_name(raw.get("resample", 3), source),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else 1.0,
            normalize=bool(raw.get("do_normalize", True)),
            video_min_pixels=video_low, video_max_pixels=video_high, fps=float(video.get("fps") or 2.0),
        )
    except (TypeError, ValueError) as e:
        raise DataError(source, f"cannot read the Qwen2-VL image settings: {e}") from None


def sample_frame_indices(total: int, source_fps: float = 0.0, fps: float = 0.0, num_frames: int = 0,
                         temporal_patch_size: int = 2, min_frames: int = 4, max_frames: int = 768) -> list[int]:
    """Which of a clip's `total` frames to keep, as transformers' Qwen2-VL video processor samples:
    num_frames of them (rounded to whole temporal patches), or as many as `fps` gives for a clip
    recorded at source_fps (within [min_frames, max_frames], whole patches); evenly spaced. Neither:
    every frame."""
    tp = temporal_patch_size
    if num_frames:
        n = round(num_frames / tp) * tp
    elif fps > 0 and source_fps > 0:
        most = math.floor(min(max_frames, total) / tp) * tp
        n = math.floor(min(max(total / source_fps * fps, min_frames), most, total) / tp) * tp
    else:
        return list(range(total))
    if not 0 < n <= total:
        raise ValueError(f"cannot sample {n} frames of a clip of {total} (temporal patches of {tp})")
    # torch.arange(0, total, total / n) in float32, as transformers computes it
    return [int(i) for i in np.arange(0, total, np.float32(total / n), dtype=np.float32)]


class Qwen2VLProcessor:
    """Images and videos -> (pixel rows [N, C*T*p*p] float32, grid [n, 3] int64 of (t, h, w) patches)."""

    def __init__(self, settings: Qwen2VLImageSettings | None = None):
        self.settings = settings or Qwen2VLImageSettings()

    def _frame(self, image: ImageInput, size: tuple[int, int] | None, bounds: tuple[int, int]) -> np.ndarray:
        """One picture as float32 CHW at the smart-resized size (or the given one)."""
        s = self.settings
        image = image if isinstance(image, Image.Image) else load_image(image)
        image = image.convert("RGB") if image.mode != "RGB" else image
        w, h = image.size
        nh, nw = size or smart_resize(h, w, s.factor, *bounds)
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), pil_filter(s.resample))
        arr = normalized_hwc(image, s.rescale_factor, s.mean, s.std, s.normalize)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def patchify(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """[F, C, H, W] frames of one image or clip -> (patch rows, (t, h, w))."""
        s = self.settings
        tp, p, m = s.temporal_patch_size, s.patch_size, s.merge_size
        if frames.shape[0] % tp:
            frames = np.concatenate([frames, np.repeat(frames[-1:], tp - frames.shape[0] % tp, axis=0)])
        f, c, height, width = frames.shape
        t, gh, gw = f // tp, height // p, width // p
        x = frames.reshape(t, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, bh, bw, mh, mw | c, tp, ph, pw
        return np.ascontiguousarray(x.reshape(t * gh * gw, c * tp * p * p)), (t, gh, gw)

    def images(self, images: list[ImageInput]) -> tuple[np.ndarray, np.ndarray]:
        s = self.settings
        rows, grids = [], []
        for image in images:
            patches, grid = self.patchify(self._frame(image, None, (s.min_pixels, s.max_pixels))[None])
            rows.append(patches)
            grids.append(grid)
        return self._stack(rows, grids)

    def video(self, frames: list[ImageInput]) -> tuple[np.ndarray, np.ndarray]:
        """One clip (its frames, already sampled) -> (pixel rows, grid [1, 3]); every frame takes the
        size smart resize gives the first."""
        s = self.settings
        if not frames:
            raise ValueError("a video needs at least one frame")
        bounds = (s.video_min_pixels or s.min_pixels, s.video_max_pixels or s.max_pixels)
        first = self._frame(frames[0], None, bounds)
        size = first.shape[1:]
        stack = np.stack([first] + [self._frame(f, size, bounds) for f in frames[1:]])
        patches, grid = self.patchify(stack)
        return self._stack([patches], [grid])

    def _stack(self, rows, grids) -> tuple[np.ndarray, np.ndarray]:
        s = self.settings
        width = 3 * s.temporal_patch_size * s.patch_size ** 2
        pixels = np.concatenate(rows) if rows else np.zeros((0, width), np.float32)
        return pixels, np.asarray(grids, dtype=np.int64).reshape(-1, 3)

    def token_counts(self, grid: np.ndarray) -> list[int]:
        """LM tokens per image or video of a grid [n, 3]."""
        return [int(np.prod(g)) // self.settings.merge_size ** 2 for g in np.asarray(grid).reshape(-1, 3)]

    def image_token_counts(self, images: list[str]) -> list[int]:
        """LM tokens of each image file, from its header's size alone (nothing decoded): what
        images() will give, so a dataset can widen its prompts before any pixel is read."""
        s = self.settings
        counts = []
        for path in images:
            try:
                with Image.open(path) as img:
                    width, height = img.size
            except FileNotFoundError:
                raise DataError(path, "cannot read image: file not found", reason="image_missing") from None
            except (OSError, SyntaxError, ValueError) as exc:
                raise DataError(path, f"cannot read image: {exc}", reason="image_unreadable") from None
            h, w = smart_resize(height, width, s.factor, s.min_pixels, s.max_pixels)
            counts.append((h // s.patch_size) * (w // s.patch_size) // s.merge_size ** 2)
        return counts

    def load(self, path) -> Image.Image:
        return load_image(path)

    def blank(self, image: ImageInput) -> Image.Image:
        """A uniform mean-colour picture of the image's size (the blanked-image baseline's: the
        same grid and token count, no visual information)."""
        if not isinstance(image, Image.Image):
            image = load_image(image)
        colour = tuple(int(m * 255) for m in self.settings.mean)
        return Image.new("RGB", image.size, colour)


def expand_pads(ids: list[int], labels: list[int], pads: dict[int, list[int]], ignore: int) -> tuple[list[int], list[int]]:
    """Widen each pad token (pads: token id -> the token count of each of its images or videos, in
    order) to that many copies, labelled `ignore`; a count mismatch is a ValueError naming both."""
    out_ids: list[int] = []
    out_labels: list[int] = []
    seen = {pad: 0 for pad in pads}
    for token, label in zip(ids, labels):
        if token not in pads:
            out_ids.append(token)
            out_labels.append(label)
            continue
        counts = pads[token]
        if seen[token] >= len(counts):
            raise ValueError(f"the prompt has more than {len(counts)} vision pads of token {token}, "
                             f"but {len(counts)} images/videos were given")
        out_ids += [token] * counts[seen[token]]
        out_labels += [ignore] * counts[seen[token]]
        seen[token] += 1
    for pad, counts in pads.items():
        if seen[pad] != len(counts):
            raise ValueError(f"the prompt has {seen[pad]} vision pads of token {pad}, but {len(counts)} "
                             f"images/videos were given")
    return out_ids, out_labels


@dataclass(frozen=True)
class RopeTokens:
    """What rope_index needs to know of a checkpoint: its vision token ids and merge size."""
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    merge_size: int = 2
    tokens_per_second: float = 0.0  # Qwen2.5-VL: a video's temporal positions per second; 0: Qwen2-VL
    # Where the text after a vision block goes on: "max", its largest position + 1 (transformers 4.57
    # and Qwen's own code; seconds per temporal patch truncated to whole seconds, as 4.57 does);
    # "extent", the block's start + max(rows, columns) (transformers 5.x, whatever t is).
    advance: str = "max"


def vision_blocks(ids: list[int], tokens: RopeTokens, image_grids: np.ndarray, video_grids: np.ndarray):
    """(start, is video, grid) of each vision block of one sequence, in reading order.

    A block is found where a pad token follows <|vision_start|> (without one, vision_start_token_id
    -1 as in ChatML models built here: where a pad token begins); it covers t*h*w / merge^2 tokens
    and takes the next image's or video's grid."""
    grids = {False: np.asarray(image_grids if image_grids is not None else [], np.int64).reshape(-1, 3),
             True: np.asarray(video_grids if video_grids is not None else [], np.int64).reshape(-1, 3)}
    used = {False: 0, True: 0}
    pads = (tokens.image_token_id, tokens.video_token_id)
    blocks, k = [], 0
    while k < len(ids):
        starts = ids[k] in pads and (tokens.vision_start_token_id < 0 or (k > 0 and ids[k - 1] == tokens.vision_start_token_id))
        if not starts:
            k += 1
            continue
        video = ids[k] == tokens.video_token_id
        if used[video] >= len(grids[video]):
            kind = "video" if video else "image"
            raise ValueError(f"the prompt has more {kind} blocks than the {len(grids[video])} {kind} grids given")
        grid = grids[video][used[video]]
        used[video] += 1
        blocks.append((k, video, grid))
        k += int(np.prod(grid)) // tokens.merge_size ** 2
    return blocks


def rope_index(ids: list[int], image_grids: np.ndarray, video_grids: np.ndarray, tokens: RopeTokens,
               seconds_per_grid: list[float] | None = None) -> tuple[np.ndarray, int]:
    """M-RoPE positions [3, L] of one unpadded sequence, and its delta (next position - L)."""
    m = tokens.merge_size
    seconds = list(seconds_per_grid or [])
    parts: list[np.ndarray] = []
    next_pos = done = n_video = 0
    for start, video, grid in vision_blocks(ids, tokens, image_grids, video_grids):
        parts.append(np.tile(np.arange(next_pos, next_pos + start - done), (3, 1)))  # the text before it
        next_pos += start - done
        t, h, w = int(grid[0]), int(grid[1]) // m, int(grid[2]) // m
        t_index = np.arange(t)
        if video and tokens.tokens_per_second:
            sec = seconds[n_video] if n_video < len(seconds) else 1.0
            step = (int(sec) if tokens.advance == "max" else sec) * tokens.tokens_per_second
            t_index = (t_index * step).astype(np.int64)
        n_video += video
        block = np.stack([np.repeat(t_index, h * w), np.tile(np.repeat(np.arange(h), w), t),
                          np.tile(np.arange(w), t * h)]) + next_pos
        parts.append(block)
        next_pos = int(block.max()) + 1 if tokens.advance == "max" else next_pos + max(h, w)
        done = start + t * h * w
    parts.append(np.tile(np.arange(next_pos, next_pos + len(ids) - done), (3, 1)))
    next_pos += len(ids) - done
    positions = np.concatenate(parts, axis=1)
    return positions[:, :len(ids)], next_pos - len(ids)

VIDEO_TAG = "<video>"


def _clip_tags(turns, images: list, videos: list[tuple[int, int]]):
    """The turns with each clip's frame tags (consecutive <image> tags, readers' Sample.videos:
    (first frame's index in images, frame count)) turned into one <video> tag, and the images and
    clips apart, in reading order."""
    from paddle_mm.data.tokenizer import IMAGE_TOKEN

    first = {start: count for start, count in videos}
    in_clip = {start + k for start, count in videos for k in range(count)}
    stills = [im for i, im in enumerate(images) if i not in in_clip]
    clips = [images[start:start + count] for start, count in sorted(videos)]
    out, index = [], 0
    for role, text in turns:
        pieces = text.split(IMAGE_TOKEN)
        rebuilt = pieces[0]
        for piece in pieces[1:]:
            if index in first:
                rebuilt += VIDEO_TAG
            elif index not in in_clip:
                rebuilt += IMAGE_TOKEN
            # a clip's later frames: their tag goes, with the newline that followed it
            elif piece.startswith("\n"):
                piece = piece[1:]
            rebuilt += piece
            index += 1
        out.append((role, rebuilt))
    return out, stills, clips


def encode_conversation(tokenizer, processor: Qwen2VLProcessor, turns, images: list, videos=(), *,
                        image_pad_id: int, video_pad_id: int, system: str = "",
                        add_generation_prompt: bool = False, ignore_index: int = -100) -> dict:
    """A conversation with its images and clips as Qwen2-VL reads it: the checkpoint's chat template
    rendered (data/chat_template.py), each <|image_pad|> / <|video_pad|> widened to its picture's
    token count. Returns input_ids, labels, pixel_values + image_grid_thw, pixel_values_videos +
    video_grid_thw (None where there are none), second_per_grid_ts (one per clip)."""
    turns, stills, clips = _clip_tags(turns, list(images), list(videos))
    ids, labels = tokenizer.encode_chat(turns, 1, system=system, add_generation_prompt=add_generation_prompt)
    out = {"pixel_values": None, "image_grid_thw": None, "pixel_values_videos": None, "video_grid_thw": None}
    pads = {image_pad_id: [], video_pad_id: []}
    if stills:
        out["pixel_values"], out["image_grid_thw"] = processor.images(stills)
        pads[image_pad_id] = processor.token_counts(out["image_grid_thw"])
    if clips:
        parts = [processor.video(frames) for frames in clips]
        out["pixel_values_videos"] = np.concatenate([p for p, _ in parts])
        out["video_grid_thw"] = np.concatenate([g for _, g in parts])
        pads[video_pad_id] = processor.token_counts(out["video_grid_thw"])
    # the frames are taken as sampled at the processor's fps (Qwen2.5-VL's temporal positions read it)
    out["second_per_grid_ts"] = [processor.settings.temporal_patch_size / processor.settings.fps] * len(clips)
    out["input_ids"], out["labels"] = expand_pads(ids, labels, pads, ignore_index)
    return out
