"""From a dataset to a step's batches: the epoch order, reading items, padding or packing."""
from __future__ import annotations

import sys

import numpy as np

from paddle_mm.data.dataset import collate
from paddle_mm.data.packing import pack
from paddle_mm.data.tokenizer import IGNORE_INDEX
from paddle_mm.errors import DataError


def epoch_order(seed: int, lengths: np.ndarray, epoch: int, batch_size: int) -> np.ndarray:
    """The sample order of an epoch, batched by similar length.

    Shuffle, then sort by length inside windows of 16 batches and shuffle the batches: a
    batch pads to its longest sample, and mixing 45-token captions with 130-token
    conversations wasted about a third of each step. Depends only on (seed, epoch), so a
    resumed run sees the same order.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = 16 * batch_size
    for start in range(0, len(order), window):
        chunk = order[start: start + window]
        order[start: start + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches = [order[i: i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    return np.concatenate([batches[i] for i in rng.permutation(len(batches))]) if batches else order


class DataCursor:
    """Where a run is in its data: state["epoch"] and state["cursor"], updated in place (they go
    into every checkpoint), and the epoch's order, rebuilt when an epoch runs out."""

    def __init__(self, seed: int, lengths: np.ndarray, batch_size: int, state: dict):
        self.seed, self.lengths, self.batch_size, self.state = seed, lengths, batch_size, state
        self.order = epoch_order(seed, lengths, state["epoch"], batch_size)

    def take(self) -> np.ndarray:
        """The dataset indices of the next global (micro-)batch."""
        state, size = self.state, self.batch_size
        if state["cursor"] + size > len(self.order):
            state["epoch"] += 1
            state["cursor"] = 0
            self.order = epoch_order(self.seed, self.lengths, state["epoch"], size)
        idx = self.order[state["cursor"]: state["cursor"] + size]
        state["cursor"] += size
        return idx


def make_batch(items: list[dict], pad_token_id: int, data_cfg) -> dict:
    """A padded (collate) or packed (pack) batch, as data.packing says."""
    if data_cfg.packing:
        return pack(items, pad_token_id, data_cfg.pack_length or data_cfg.max_length)
    return collate(items, pad_token_id)


def batch_inputs(batch: dict, labels: bool = False) -> dict:
    """The model's keyword arguments for a padded (collate) or packed (pack) batch, as tensors;
    with labels, the labels too (VisionLanguageModel then returns per-token losses, not logits)."""
    import paddle

    keys = ("input_ids", "attention_mask", "position_ids", "attn_mask_startend_row_indices", "pixel_values",
            "image_grid_thw")  # image_grid_thw: native-resolution images (model.Qwen2VLModel)
    keys += ("labels",) if labels else ()
    return {k: paddle.to_tensor(batch[k]) for k in keys if batch.get(k) is not None}


def item_targets(dataset) -> np.ndarray:
    """Each item's next-token targets (the loss's denominator counts these over the global batch)."""
    return np.array([int((item.labels[1:] != IGNORE_INDEX).sum()) for item in dataset.items])


def labelled_tokens(batch: dict) -> int:
    """Positions that count in the loss: a label that is a next-token target (not the first column)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def read_items(dataset, idx, on_error: str, skipped: list) -> list[dict]:
    """Dataset items of a batch; an unreadable image stops the run or is skipped and counted."""
    items = []
    for i in idx:
        try:
            items.append(dataset[int(i)])
        except DataError as err:
            if on_error == "raise":
                raise
            skipped.append(err)
            print(f"skipped: {err}", file=sys.stderr)
    return items


def first_readable(dataset) -> dict:
    """A stand-in item, weighted 0 where used: it only keeps a rank in the gradient all-reduce."""
    for i in range(len(dataset)):
        try:
            return dataset[i]
        except DataError:
            continue
    raise DataError(dataset.items[0].sample.source, "no item of the dataset can be read")


def sample_ref(dataset, i: int) -> dict:
    """What names a dataset item in logs and reports: its id, data file and record index."""
    sample = dataset.items[i].sample
    return {"id": sample.id, "source": sample.source, "record": sample.index}
