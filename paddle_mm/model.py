"""The vision-language model: vision_tower -> multi_modal_projector -> language_model.

Reads top to bottom like the data flow in docs/ARCHITECTURE.md: embed the tokens, encode and project
the images, write the image features at the image-token positions, run the LM, and take
the loss where labels != IGNORE_INDEX.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from paddle_mm.config import ModelConfig
from paddle_mm.data.tokenizer import IGNORE_INDEX
from paddle_mm.lm.adapter import build_language_model, run_language_model
from paddle_mm.lm.decoding import beam_search, decode
from paddle_mm.projectors import build_projector
from paddle_mm.vision.vit import VisionTransformer


class VisionLanguageModel(nn.Layer):
    def __init__(self, cfg: ModelConfig, special_ids: dict[str, int] | None = None):
        super().__init__()
        if cfg.image_token_id < 0:
            raise ValueError("ModelConfig.image_token_id is not set; take it from the tokenizer")
        if cfg.image_token_id >= cfg.lm.vocab_size:
            raise ValueError(
                f"image_token_id {cfg.image_token_id} is outside the LM vocabulary of {cfg.lm.vocab_size}"
            )
        self.config = cfg
        self.vision_tower = VisionTransformer(cfg.vision)
        self.multi_modal_projector = build_projector(cfg.projector, cfg.vision.hidden_size, cfg.lm.hidden_size)
        self.language_model = build_language_model(cfg.lm, special_ids)

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    def image_features(self, pixel_values):  # [N, 3, H, W] -> [N, T, D]
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with image features written at the image-token positions.

        pixel_values holds every image of the batch in reading order (row by row, each row's in
        the order of its tags): a row may hold any number of images, or none.
        """
        is_image = input_ids == self.config.image_token_id  # [B, L]
        text_ids = paddle.where(is_image, paddle.zeros_like(input_ids), input_ids)
        embeds = self.language_model.get_input_embeddings()(text_ids)  # [B, L, D]
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        features = self.image_features(pixel_values) if num_images else None  # [N, T, D]
        return write_image_features(embeds, is_image, features, num_images)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None, position_ids=None,
                attn_mask_startend_row_indices=None):
        """Return (loss or None, logits [B, L, V]).

        Packed rows (paddle_mm.data.packing) pass position_ids and attn_mask_startend_row_indices
        instead of attention_mask.
        """
        embeds = self.embed(input_ids, pixel_values)
        logits, _ = run_language_model(self.language_model, embeds, attention_mask, position_ids=position_ids,
                                       attn_mask_startend_row_indices=attn_mask_startend_row_indices)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return loss, logits

    # generation ---------------------------------------------------------------------------
    @paddle.no_grad()
    def generate(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        num_beams: int = 1,
        use_cache: bool = True,
        on_token=None,
    ) -> list[list[int]]:
        """Decode new tokens for a left-padded batch; returns the new ids per row (eos cut).

        on_token(row, token id) sees each token as it is chosen (not with beam search, whose
        hypotheses are only final at the end).
        """
        if attention_mask is None:
            attention_mask = paddle.ones_like(input_ids)
        embeds = self.embed(input_ids, pixel_values)
        if num_beams > 1:
            if on_token is not None:
                raise ValueError("on_token (streaming) needs num_beams=1")
            return beam_search(self.language_model, embeds, attention_mask, max_new_tokens, eos_token_id, num_beams)
        return decode(self.language_model, embeds, attention_mask, max_new_tokens, eos_token_id,
                      do_sample, temperature, top_p, use_cache, on_token)


def write_image_features(embeds, is_image, features, num_images: int):
    """embeds [B, L, D] with the image features written at the image positions (is_image [B, L]).

    features: [N, T, D] (N images of T tokens each) or [sum of T_i, D] (images of their own token
    counts, in reading order), or None. The k-th image position, row-major over the batch, takes
    the k-th feature row: images follow each other in reading order whatever their count per row.
    A count mismatch is a ValueError naming both counts.
    """
    num_positions = int(is_image.astype("int64").sum())
    d = embeds.shape[-1]
    flat = None if features is None else features.astype(embeds.dtype).reshape([-1, d])  # [N*T, D]
    rows = 0 if flat is None else flat.shape[0]
    if num_positions != rows:
        each = f" ({features.shape[1]} each)" if features is not None and features.ndim == 3 else ""
        raise ValueError(f"image token count mismatch: the text has {num_positions} image token positions, "
                         f"but {num_images} images give {rows} image features{each}")
    if rows == 0:
        return embeds
    order = paddle.cumsum(is_image.flatten().astype("int64")) - 1
    gathered = paddle.gather(flat, paddle.clip(order, min=0)).reshape(embeds.shape)
    return paddle.where(is_image.unsqueeze(-1), gathered, embeds)


def causal_lm_loss(logits, labels, reduction: str = "mean"):
    """Next-token cross-entropy over the positions whose label is not IGNORE_INDEX: their mean,
    or their sum (training divides the sum by the labelled-token count of the whole global batch).

    Summed and divided by the count by hand: Paddle 3.3's cross_entropy with reduction="mean"
    divides by every position when ignore_index is negative, so padding and prompt length
    would shrink the loss. On CPU, for vocabularies of 64 and more, Paddle 3.3.1's
    cross_entropy turns a row of NaN logits into the finite loss log(V), which would hide a
    diverged model: a zero-weighted sum of the logits carries any NaN or inf into the loss.
    (log_softmax + gather would propagate NaN by itself, but Paddle 3.3.1's CPU log_softmax
    took 68 s for a [640, 32000] input, against 0.14 s for cross_entropy: measured.)
    """
    shift_logits = logits[:, :-1].astype("float32")
    shift_labels = labels[:, 1:].reshape([-1])
    v = shift_logits.shape[-1]
    flat = shift_logits.reshape([-1, v])
    keep = shift_labels != IGNORE_INDEX
    targets = paddle.where(keep, shift_labels, paddle.zeros_like(shift_labels)).unsqueeze(-1)
    per_token = F.cross_entropy(flat, targets, reduction="none").reshape([-1])
    per_token = paddle.where(keep, per_token, paddle.zeros_like(per_token))
    total = per_token.sum() + 0.0 * flat.sum()
    return total if reduction == "sum" else total / paddle.clip(keep.astype("float32").sum(), min=1.0)
