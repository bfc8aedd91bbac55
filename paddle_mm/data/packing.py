"""Several samples in one row: the alternative to padding every row to its batch's longest.

Each sample keeps its own positions (0, 1, ...) and sees only its own earlier tokens. The
attention limits are carried as PaddleFormers' `attn_mask_startend_row_indices`
([rows, 1, L, 1], int32: for key column j, the first query row that may not attend to it,
which is the end of j's sample), the form its variable-length (flashmask) kernel reads on
GPU. On CPU, Qwen2 / Llama / Qwen3 attend sample by sample from it (lm/full_forward.Segments);
other backbones get it as a dense mask (lm/adapter.dense_mask_from_row_indices).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from paddle_mm.data.dataset import stacked_images
from paddle_mm.data.tokenizer import IGNORE_INDEX


def plan_rows(lengths: Sequence[int], pack_length: int) -> list[list[int]]:
    """Indices of the samples in each row: first-fit, longest first, rows of at most pack_length tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        n = lengths[i]
        if n > pack_length:
            raise ValueError(f"a sample of {n} tokens does not fit a packed row of {pack_length}")
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(pack_length - n)
    return rows


def pack(items: Sequence[dict], pad_token_id: int, pack_length: int) -> dict:
    """Pack dataset items into rows; returns the arrays `collate` returns, with position_ids and
    attn_mask_startend_row_indices in place of attention_mask.

    Rows are padded to the longest row, not to pack_length. A sample's first label is
    ignored: it would be the next-token target of the previous sample's last token.
    pixel_values stacks the images in the order their image tokens appear, row by row (with
    image_grid_thw where the items carry grids). Items with position_ids of their own (M-RoPE's
    [3, n]: the dataset's rope_index) keep them; the others count 0, 1, ... from their start.
    """
    plan = plan_rows([len(x["input_ids"]) for x in items], pack_length)
    width = max(sum(len(items[i]["input_ids"]) for i in row) for row in plan)
    r = len(plan)
    input_ids = np.full([r, width], pad_token_id, dtype="int64")
    labels = np.full([r, width], IGNORE_INDEX, dtype="int64")
    rope_rows = items[0].get("position_ids")
    positions = np.zeros(([len(rope_rows)] if rope_rows is not None else []) + [r, width], dtype="int64")
    # Padding forms one trailing segment of its own, ending at the row's end.
    ends = np.full([r, width], width, dtype="int32")
    placed, ids = [], []
    for row, members in enumerate(plan):
        start = 0
        for i in members:
            x = items[i]
            n = len(x["input_ids"])
            span = slice(start, start + n)
            input_ids[row, span] = x["input_ids"]
            labels[row, span] = x["labels"]
            labels[row, start] = IGNORE_INDEX
            positions[..., row, span] = np.arange(n) if rope_rows is None else x["position_ids"]
            ends[row, span] = start + n
            start += n
            ids.append(x["id"])
            placed.append(x)
    return {
        "ids": ids,
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": positions,
        "attn_mask_startend_row_indices": ends[:, None, :, None],
        **stacked_images(placed),
    }
