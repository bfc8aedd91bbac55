"""Image-caption pairs for the alignment stages: WordPiece ids and one image per item."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from paddle_mm.alignment.text import TextTokenizer
from paddle_mm.data.dataset import Encoded, encode_each
from paddle_mm.data.image import ImageProcessor
from paddle_mm.data.readers import Sample
from paddle_mm.errors import DataError


def caption_of(sample: Sample) -> str:
    """The caption of an image-caption sample (the caption reader's answer turn)."""
    if len(sample.images) != 1 or len(sample.turns) != 2 or sample.turns[-1][0] != "assistant":
        raise DataError(sample.source, "an alignment stage needs image-caption pairs "
                        "(one image and a caption each: data format `caption`)", sample.index)
    return sample.turns[-1][1]


class CaptionPairDataset:
    """The interface of ConversationDataset (items, skipped, item dicts), for caption pairs.

    `labels` repeats the ids: the generation loss (ITG) predicts the caption itself.
    """

    def __init__(self, samples: Sequence[Sample], tokenizer: TextTokenizer, image_processor: ImageProcessor,
                 max_length: int, on_error: str = "raise"):
        self.image_processor = image_processor

        def encode(sample: Sample) -> Encoded:
            ids = np.asarray(tokenizer.encode(caption_of(sample), max_length), dtype="int64")
            return Encoded(sample, ids, ids)

        self.items, self.skipped = encode_each(samples, encode, on_error)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        return {"id": item.sample.id, "input_ids": item.input_ids, "labels": item.labels,
                "pixel_values": self.image_processor(item.sample.images)}
