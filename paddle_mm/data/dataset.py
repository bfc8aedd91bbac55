"""Samples -> token ids, labels and pixels; batches with padding.

Every sample is tokenized once, up front, so a sequence that is too long or a conversation
that leaves nothing to learn is found before the first step, not hours into a run.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from paddle_mm.data.image import ImageProcessor
from paddle_mm.data.qwen2_vl import Qwen2VLProcessor, rope_index
from paddle_mm.data.readers import Sample
from paddle_mm.data.tokenizer import IGNORE_INDEX, Tokenizer
from paddle_mm.errors import DataError

T = TypeVar("T")


@dataclass
class Encoded:
    sample: Sample
    input_ids: np.ndarray  # [L] int64
    labels: np.ndarray  # [L] int64, IGNORE_INDEX outside assistant text


def encode_each(samples: Sequence[Sample], encode: Callable[[Sample], T], on_error: str) -> tuple[list[T], list[DataError]]:
    """(encode(sample) of every sample that encodes, the DataErrors of the others): a bad record
    stops the run (on_error "raise") or is skipped and counted, in every dataset alike."""
    items: list[T] = []
    skipped: list[DataError] = []
    for sample in samples:
        try:
            items.append(encode(sample))
        except DataError as err:
            if on_error == "raise":
                raise
            skipped.append(err)
    return items, skipped


class ConversationDataset:
    """Tokenized conversations with their images; images are decoded when an item is read.

    tokens_per_image: every image's count (a ViT's), or None: each image's own, as a
    native-resolution processor (data/qwen2_vl.Qwen2VLProcessor) sizes it; its items then carry
    image_grid_thw beside the pixel rows. rope_tokens (M-RoPE models): items also carry their
    position_ids [3, n], computed by the rope_index the model's own positions come from, so a
    packed row keeps each sample's positions.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        tokens_per_image: int | None,
        max_length: int,
        on_error: str = "raise",
        system: str = "",
        rope_tokens=None,
    ):
        self.image_processor = image_processor
        self.rope_tokens = rope_tokens
        self.items, self.skipped = encode_each(
            samples, lambda s: encode_sample(s, tokenizer, image_token_counts(s, tokens_per_image, image_processor),
                                             max_length, system), on_error)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        out = {"id": item.sample.id, "input_ids": item.input_ids, "labels": item.labels, "pixel_values": None}
        if item.sample.images:
            out.update(image_inputs(self.image_processor, item.sample.images))
        if self.rope_tokens is not None:
            out["position_ids"] = rope_index(item.input_ids.tolist(), out.get("image_grid_thw"), None,
                                             self.rope_tokens)[0]
        return out


def image_inputs(image_processor, images) -> dict:
    """pixel_values of a sample's images ([N, 3, H, W]; a native-resolution processor's pixel rows
    [patches, C*T*p*p] with image_grid_thw [N, 3])."""
    if isinstance(image_processor, Qwen2VLProcessor):
        pixels, grid = image_processor.images(images)
        return {"pixel_values": pixels, "image_grid_thw": grid}
    return {"pixel_values": image_processor(images)}


def image_token_counts(sample: Sample, tokens_per_image: int | None, image_processor) -> int | list[int]:
    """The sample's image token counts: the one fixed count, or (None) each image's own from the
    processor, read from the image headers; an unreadable image names the record."""
    if tokens_per_image is not None:
        return tokens_per_image
    try:
        return image_processor.image_token_counts(sample.images)
    except DataError as err:
        raise DataError(sample.source, f"{err.path}: {err.cause}", sample.index, err.reason) from None


def encode_sample(sample: Sample, tokenizer: Tokenizer, tokens_per_image: int | Sequence[int], max_length: int,
                  system: str = "") -> Encoded:
    ids, labels = encode_turns(sample, sample.turns, tokenizer, tokens_per_image, system)
    check_encoded(sample, ids, labels, max_length)
    return Encoded(sample, np.asarray(ids, dtype="int64"), np.asarray(labels, dtype="int64"))


def encode_turns(sample: Sample, turns, tokenizer: Tokenizer, tokens_per_image: int | Sequence[int],
                 system: str = "") -> tuple[list[int], list[int]]:
    """(ids, labels) of the sample's turns, its images' token counts checked against the text's image
    positions; errors name the sample's file and record.

    tokens_per_image: one count for every image (a ViT's) or each image's own, in reading order.
    A sample may hold any number of images, each with its own count: nothing below assumes one
    count per sample (the images of a batch are stacked in reading order, the model writes their
    features at the image positions in that order).
    """
    counts = [tokens_per_image] * len(sample.images) if isinstance(tokens_per_image, int) else list(tokens_per_image)
    try:
        ids, labels = tokenizer.encode_chat(turns, counts, system=system)
    except DataError as err:
        raise DataError(sample.source, err.cause, sample.index, err.reason) from None
    positions = sum(1 for t in ids if t == tokenizer.image_token_id)
    if positions != sum(counts):
        # The text holds image tokens that are not images' (a chat template that adds or drops them).
        raise DataError(sample.source, f"the tokenized text has {positions} image token positions but its "
                        f"{len(counts)} images take {sum(counts)}", sample.index, "tag_mismatch")
    return ids, labels


def check_encoded(sample: Sample, ids: Sequence[int], labels: Sequence[int], max_length: int) -> None:
    """The rules a tokenized sample must pass to be trained on (check-data applies the same)."""
    if len(ids) > max_length:
        # Never cut: a cut could split an image span or drop the answer the loss needs.
        raise DataError(sample.source, f"sequence of {len(ids)} tokens exceeds max_length {max_length}",
                        sample.index, "too_long")
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(sample.source, "no assistant tokens to learn from (empty loss mask)", sample.index,
                        "empty_loss_mask")


def collate(items: Sequence[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad a list of dataset items into arrays.

    Right padding for training; left padding for generation, so every row's last real token
    sits in the last column. pixel_values stacks the images of all rows in row order (items'
    position_ids are not used: the model computes a padded batch's positions itself).
    """
    _check_batch(items)
    length = max(len(x["input_ids"]) for x in items)
    b = len(items)
    input_ids = np.full([b, length], pad_token_id, dtype="int64")
    labels = np.full([b, length], IGNORE_INDEX, dtype="int64")
    mask = np.zeros([b, length], dtype="int64")
    for row, x in enumerate(items):
        n = len(x["input_ids"])
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, span] = x["input_ids"]
        labels[row, span] = x["labels"]
        mask[row, span] = 1
    return {
        "ids": [x["id"] for x in items],
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": mask,
        **stacked_images(items),
    }


def stacked_images(items: Sequence[dict]) -> dict:
    """pixel_values of the items' images in the items' order (and image_grid_thw where the items
    carry grids: each image keeps its own rows, none is padded to the largest)."""
    images = [x for x in items if x["pixel_values"] is not None]
    out = {"pixel_values": np.concatenate([x["pixel_values"] for x in images], axis=0) if images else None}
    if any("image_grid_thw" in x for x in images):
        out["image_grid_thw"] = np.concatenate([x["image_grid_thw"] for x in images], axis=0)
    return out


def _check_batch(items: Sequence[dict]) -> None:
    if not items:
        raise DataError("<batch>", "cannot collate an empty batch")
    for x in items:
        if len(x["labels"]) != len(x["input_ids"]):
            raise DataError("<batch>", f"{len(x['input_ids'])} input ids but {len(x['labels'])} labels", x["id"])
    shapes = {x["pixel_values"].shape[1:] for x in items if x["pixel_values"] is not None}
    if len(shapes) > 1:
        raise DataError("<batch>", f"images of different shapes in one batch: {sorted(shapes)}")
