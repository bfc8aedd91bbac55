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
from paddle_mm.runtime import cpu_linears, on_cpu, with_copying_views
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
        cpu_linears(self)

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
    @with_copying_views
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


LOGITS_CHUNK_BYTES = 32_000_000  # under glibc's largest mmap threshold, 32 MiB


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
    wanted = paddle.gather(targets, where).unsqueeze(-1)  # [K, 1]
    if head is None:
        chunks = [(rows.astype("float32"), wanted)]
    else:
        # On CPU in pieces of at most LOGITS_CHUNK_BYTES of logits: glibc maps a larger block fresh
        # from the system each time, a page fault per 4 KiB written (runtime.keep_freed_memory). The
        # head and loss of 2541 rows over 32000 words with gradients: 840 ms and 167k faults whole,
        # 764 ms and 10k faults in pieces of 250 rows. The same per-row figures; the head's weight
        # gradient summed piece by piece. A GPU keeps one product.
        weight = getattr(head, "weight", None)
        n = rows.shape[0]
        if weight is not None and on_cpu(rows):
            n = max(1, LOGITS_CHUNK_BYTES // (4 * max(weight.shape)))  # the vocabulary is the larger side
        chunks = [(head(rows[i:i + n].unsqueeze(0)).squeeze(0).astype("float32"), wanted[i:i + n])
                  for i in range(0, rows.shape[0], n)]
    nll = paddle.concat([F.cross_entropy(logits, t, reduction="none").reshape([-1]) for logits, t in chunks])
    nll = nll + 0.0 * paddle.add_n([logits.detach().sum() for logits, _ in chunks])
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


class Qwen2VLModel(nn.Layer):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: vision_tower (vision/qwen2_vl.py) -> multi_modal_projector (the
    patch merger; Qwen3-VL also deepstack_projectors) -> language_model (the M-RoPE decoder, lm/mrope.py).

    Images and videos come as the processor's pixel rows and grids (data/qwen2_vl.py), so each has
    its own token count: the features of all images are one [total, D] sequence in reading order,
    written where input_ids == image_token_id (videos: video_token_id). Positions are 3 rows,
    computed from the ids and grids as transformers' get_rope_index does.
    """

    def __init__(self, cfg, special_ids: dict[str, int] | None = None):
        super().__init__()
        from paddle_mm.projectors.patch_merger import PatchMerger
        from paddle_mm.vision.qwen2_vl import Qwen2VLVisionEncoder

        v = cfg.vision
        if v.out_hidden_size != cfg.lm.hidden_size:
            raise ValueError(f"vision.out_hidden_size {v.out_hidden_size} is not the LM's hidden size {cfg.lm.hidden_size}")
        self.config = cfg
        self.vision_tower = Qwen2VLVisionEncoder(v)
        self.multi_modal_projector = PatchMerger(v.hidden_size, v.out_hidden_size, v.spatial_merge_size,
                                                 rms_norm=v.variant == "qwen2_5_vl")
        # Qwen3-VL: one merger per DeepStack block, its tokens added to the LM's first layers' states
        self.deepstack_projectors = nn.LayerList([
            PatchMerger(v.hidden_size, v.out_hidden_size, v.spatial_merge_size, norm_after_join=True)
            for _ in v.deepstack_visual_indexes])
        self.language_model = build_language_model(cfg.lm, special_ids)
        cpu_linears(self)

    @property
    def tokens_per_image(self) -> int:
        """There is no one count: say so where code written for fixed-size images asks. Training,
        check-data, generate_answers and the server take each image's own count from the processor
        (builder.fixed_image_tokens, inference.generate.prompt_length) and never ask."""
        raise ValueError("a Qwen2-VL model gives each image its own token count (grid t*h*w / merge^2); this "
                         "path expects one count for every image")

    def vision_features(self, pixel_values, grid_thw):  # [N, C*T*p*p] -> [N / merge^2, D]
        return self._vision(pixel_values, grid_thw)[0]

    def _vision(self, pixel_values, grid_thw):
        """(merged features, the DeepStack mergers' features, one [N / merge^2, D] each)."""
        hidden, deep = self.vision_tower.encode(pixel_values, grid_thw)
        return self.multi_modal_projector(hidden), [m(h) for m, h in zip(self.deepstack_projectors, deep)]

    def rope_tokens(self):
        from paddle_mm.data.qwen2_vl import RopeTokens

        c = self.config
        return RopeTokens(c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision.spatial_merge_size,
                          c.vision.tokens_per_second if c.vision.variant == "qwen2_5_vl" else 0.0, c.mrope_advance)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None):
        return self._embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)[0]

    def _embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None):
        """(embeddings [B, L, D], the LM's DeepStack inputs: {} unless Qwen3-VL has vision tokens)."""
        embed_tokens = self.language_model.get_input_embeddings()
        c = self.config
        vision = [(c.image_token_id, "image", pixel_values, image_grid_thw),
                  (c.video_token_id, "video", pixel_values_videos, video_grid_thw)]
        is_vision = paddle.zeros_like(input_ids, dtype="bool")
        for token, _, _, _ in vision:
            is_vision = is_vision | (input_ids == token)
        embeds = embed_tokens(paddle.where(is_vision, paddle.zeros_like(input_ids), input_ids))
        deep = [paddle.zeros_like(embeds) for _ in self.deepstack_projectors]
        for token, kind, pixels, grid in vision:
            at = input_ids == token
            positions = int(at.astype("int64").sum())
            features, deep_features = (None, []) if pixels is None else self._vision(pixels, grid)
            count = 0 if features is None else features.shape[0]
            if positions != count:
                raise ValueError(f"{kind} token count mismatch: the text has {positions} {kind} token positions, "
                                 f"but the {kind}s give {count} features")
            if count == 0:
                continue
            # The k-th position of this kind takes the k-th row, as for fixed-size images.
            embeds = write_image_features(embeds, at, features, count)
            deep = [write_image_features(into, at, rows, count) for rows, into in zip(deep_features, deep)]
        if not deep or not bool(is_vision.any()):
            return embeds, {}
        where = paddle.nonzero(is_vision.flatten()).flatten()
        d = embeds.shape[-1]
        return embeds, {"visual_pos_masks": is_vision,
                        "deepstack_visual_embeds": [paddle.gather(x.reshape([-1, d]), where) for x in deep]}

    def rope_positions(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None):
        """(positions [3, B, L] int64, deltas [B]: a new token at column j takes j + delta).

        Each row's images and videos are the next ones in reading order; padding gets position 1,
        as in transformers."""
        import numpy as np

        from paddle_mm.data.qwen2_vl import rope_index, vision_blocks

        ids = input_ids.numpy()
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.numpy()
        grids = {k: np.zeros((0, 3), np.int64) if g is None else np.asarray(
            g.numpy() if isinstance(g, paddle.Tensor) else g).reshape(-1, 3)
            for k, g in (("image", image_grid_thw), ("video", video_grid_thw))}
        seconds = [] if second_per_grid_ts is None else [float(s) for s in np.asarray(second_per_grid_ts).reshape(-1)]
        tokens = self.rope_tokens()
        out = np.ones((3,) + ids.shape, np.int64)
        deltas = []
        used = {"image": 0, "video": 0}
        for row in range(ids.shape[0]):
            seq = ids[row][mask[row] == 1].tolist()
            blocks = vision_blocks(seq, tokens, grids["image"][used["image"]:], grids["video"][used["video"]:])
            n_vid = sum(video for _, video, _ in blocks)
            n_img = len(blocks) - n_vid
            img = grids["image"][used["image"]:used["image"] + n_img]
            vid = grids["video"][used["video"]:used["video"] + n_vid]
            pos, delta = rope_index(seq, img, vid, tokens, seconds[used["video"]:used["video"] + n_vid])
            used["image"] += n_img
            used["video"] += n_vid
            out[:, row, mask[row] == 1] = pos
            deltas.append(int(pos.max()) + 1 - ids.shape[1] if pos.size else delta)
        return paddle.to_tensor(out), paddle.to_tensor(np.asarray(deltas, np.int64))

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, labels=None,
                pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, position_ids=None,
                attn_mask_startend_row_indices=None):
        """As VisionLanguageModel.forward: without labels (None, logits [B, L, V]); with labels
        (token_nll [B, L], None), only the labelled positions projected onto the vocabulary.

        Packed rows (data/packing.py) pass each sample's own M-RoPE positions ([3, B, L], the
        dataset's rope_index) and attn_mask_startend_row_indices instead of attention_mask."""
        embeds, deepstack = self._embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if position_ids is None:
            if attn_mask_startend_row_indices is not None:
                raise ValueError("packed rows need their M-RoPE position_ids (the dataset's rope_index)")
            position_ids, _ = self.rope_positions(input_ids, attention_mask, image_grid_thw, video_grid_thw,
                                                  second_per_grid_ts)
        hidden, _ = run_backbone(self.language_model, embeds, attention_mask, position_ids=position_ids,
                                 attn_mask_startend_row_indices=attn_mask_startend_row_indices, **deepstack)
        if labels is not None:
            return next_token_nll(hidden, labels, self.language_model.lm_head), None
        return None, self.language_model.lm_head(hidden)

    @paddle.no_grad()
    @with_copying_views
    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, max_new_tokens: int = 32,
                 eos_token_id=None, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 num_beams: int = 1, use_cache: bool = True, on_token=None) -> list[list[int]]:
        """Decode new tokens for a left-padded batch: the prompt at its M-RoPE positions, each new
        token at its column + the row's delta (transformers' rope_deltas)."""
        if num_beams > 1:
            raise ValueError("beam search is not implemented for Qwen2-VL; use num_beams=1")
        if attention_mask is None:
            attention_mask = paddle.ones_like(input_ids)
        embeds, deepstack = self._embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        prompt, deltas = self.rope_positions(input_ids, attention_mask, image_grid_thw, video_grid_thw,
                                             second_per_grid_ts)
        length = input_ids.shape[1]

        def positions(start: int, n: int):
            cols = paddle.arange(max(start, length), start + n, dtype="int64")
            later = (cols.unsqueeze(0) + deltas.unsqueeze(-1)).unsqueeze(0).expand([3, -1, -1])
            return paddle.concat([prompt[:, :, start:length], later], axis=-1) if start < length else later

        def prefill(n: int):  # the DeepStack inputs of a step over the prompt (and n - length new columns)
            if not deepstack:
                return {}
            mask = deepstack["visual_pos_masks"]
            if n > length:
                mask = paddle.concat([mask, paddle.zeros([mask.shape[0], n - length], dtype=mask.dtype)], axis=1)
            return {**deepstack, "visual_pos_masks": mask}

        return decode(self.language_model, embeds, attention_mask, max_new_tokens, eos_token_id, do_sample,
                      temperature, top_p, use_cache, on_token, positions=positions, prefill=prefill)
