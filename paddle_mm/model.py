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
from paddle_mm.lm.adapter import build_language_model, run_backbone
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
        """Token embeddings with image features written at the image-token positions."""
        is_image = input_ids == self.config.image_token_id  # [B, L]
        text_ids = paddle.where(is_image, paddle.zeros_like(input_ids), input_ids)
        embeds = self.language_model.get_input_embeddings()(text_ids)  # [B, L, D]
        num_positions = int(is_image.astype("int64").sum())
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        expected = num_images * self.tokens_per_image
        if num_positions != expected:
            raise ValueError(
                f"image token count mismatch: the text has {num_positions} image token positions, "
                f"but {num_images} images x {self.tokens_per_image} tokens = {expected} image features"
            )
        if num_images == 0:
            return embeds
        features = self.image_features(pixel_values).astype(embeds.dtype)  # [N, T, D]
        d = embeds.shape[-1]
        flat = features.reshape([-1, d])  # [N*T, D], in reading order of the image positions
        # The k-th image position (row-major over the batch) takes the k-th feature row.
        order = paddle.cumsum(is_image.flatten().astype("int64")) - 1
        gathered = paddle.gather(flat, paddle.clip(order, min=0)).reshape(embeds.shape)
        return paddle.where(is_image.unsqueeze(-1), gathered, embeds)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None, position_ids=None,
                attn_mask_startend_row_indices=None):
        """Without labels: (None, logits [B, L, V]). With labels: (token_nll [B, L], None), see
        next_token_nll: only the labelled positions are projected onto the vocabulary.

        Packed rows (paddle_mm.data.packing) pass position_ids and attn_mask_startend_row_indices
        instead of attention_mask.
        """
        embeds = self.embed(input_ids, pixel_values)
        hidden, _ = run_backbone(self.language_model, embeds, attention_mask, position_ids=position_ids,
                                 attn_mask_startend_row_indices=attn_mask_startend_row_indices)
        if labels is not None:
            return next_token_nll(hidden, labels, self.language_model.lm_head), None
        return None, self.language_model.lm_head(hidden)

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

        on_token(row, token id) sees each token as it is chosen, and ends the row by returning True
        (not with beam search, whose hypotheses are only final at the end).
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


def next_token_nll(hidden, labels, head=None):
    """[B, L] float32: at each position j whose label is a target (labels[:, j] != IGNORE_INDEX, j >= 1),
    -log p(labels[:, j]) as predicted from position j - 1; zero elsewhere.

    hidden [B, L, D] goes through head (the LM head; None: hidden already holds the logits) only
    at the positions that predict a label: the labels are shifted, not the logits, so neither a
    [B, L, V] projection nor the backward of a slice of it is paid for unlabelled positions
    (together a third of the benchmark's training step, profiled).

    On CPU, Paddle 3.3.1's cross_entropy turns a row holding NaN or inf into a finite loss,
    which would hide a diverged model: a zero times the (detached) sum of the logits makes every
    term NaN instead, without a backward over the vocabulary. (log_softmax + gather would
    propagate NaN by itself, but Paddle 3.3.1's CPU log_softmax took 68 s for a [640, 32000]
    input, against 0.14 s for cross_entropy: measured.)
    """
    b, length = labels.shape
    targets = paddle.concat([labels[:, 1:], paddle.full([b, 1], IGNORE_INDEX, dtype=labels.dtype)], axis=1)
    targets = targets.reshape([-1])  # the label each position predicts
    where = paddle.nonzero(targets != IGNORE_INDEX).reshape([-1])  # [K] flat positions
    if where.shape[0] == 0:
        return paddle.zeros([b, length], dtype="float32") + 0.0 * hidden.astype("float32").sum()
    rows = paddle.gather(hidden.reshape([b * length, -1]), where)  # [K, D]
    logits = (rows if head is None else head(rows.unsqueeze(0)).squeeze(0)).astype("float32")  # [K, V]
    nll = F.cross_entropy(logits, paddle.gather(targets, where).unsqueeze(-1), reduction="none").reshape([-1])
    nll = nll + 0.0 * logits.detach().sum()
    # Position j - 1 predicts label j; the last column predicts nothing, so j stays in its row.
    return paddle.scatter(paddle.zeros([b * length], dtype="float32"), where + 1, nll).reshape([b, length])


def mean_nll(token_nll, labels):
    """The mean next-token NLL over the labelled targets (not a mean of per-row means).

    Summed and divided by the count by hand: Paddle 3.3's cross_entropy with reduction="mean"
    divides by every position when ignore_index is negative, so padding and prompt length
    would shrink the loss.
    """
    return token_nll.sum() / paddle.clip((labels[:, 1:] != IGNORE_INDEX).astype("float32").sum(), min=1.0)


def causal_lm_loss(logits, labels, reduction: str = "mean"):
    """Next-token cross-entropy of logits [B, L, V] over the positions whose label is not
    IGNORE_INDEX: their mean, or their sum (training divides the sum by the labelled-token count
    of the whole global batch). For a model that has the logits already (the Q-Former's text side)."""
    nll = next_token_nll(logits, labels)
    return nll.sum() if reduction == "sum" else mean_nll(nll, labels)
