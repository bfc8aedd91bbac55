"""The inference primitive: answer samples (VQA, captions, chat turns) with a model, in batches.

The CLI's infer and chat, the batch JSONL runner, the server and the evaluations all go through
`generate_answers`: the prompt rendered by the tokenizer's chat template, images through the
image processor, then the model's generate."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from paddle_mm.config import InferConfig
from paddle_mm.data.dataset import collate
from paddle_mm.data.image import ImageProcessor
from paddle_mm.data.readers import Sample
from paddle_mm.data.tokenizer import Tokenizer


def prompt_turns(sample: Sample) -> list[tuple[str, str]]:
    """The conversation up to (not including) its last assistant answer."""
    turns = list(sample.turns)
    if turns and turns[-1][0] == "assistant":
        turns = turns[:-1]
    return turns


def generate_answers(
    model,
    tokenizer: Tokenizer,
    samples: Sequence[Sample],
    image_processor: ImageProcessor,
    infer: InferConfig,
    blind: bool = False,
    system: str = "",
    on_token: Callable[[str, int], bool | None] | None = None,
) -> dict[str, str]:
    """{sample id: generated text}. blind=True replaces every image with a blank one.

    on_token(sample id, token id) sees each new token as it is chosen, for streaming; returning
    True ends that sample's answer there (the others in its batch go on).
    """
    import paddle

    from paddle_mm.data.qwen2_vl import Qwen2VLProcessor

    if isinstance(image_processor, Qwen2VLProcessor):
        return _native_resolution_answers(model, tokenizer, samples, image_processor, infer, blind, system, on_token)
    answers: dict[str, str] = {}
    for start in range(0, len(samples), infer.batch_size):
        batch = encode_prompts(model, tokenizer, samples[start: start + infer.batch_size], image_processor, system,
                               blind)
        pixel_values = None if batch["pixel_values"] is None else paddle.to_tensor(batch["pixel_values"])
        outs = model.generate(
            paddle.to_tensor(batch["input_ids"]),
            paddle.to_tensor(batch["attention_mask"]),
            pixel_values,
            max_new_tokens=infer.max_new_tokens,
            eos_token_id=tokenizer.stop_ids,
            do_sample=infer.do_sample,
            temperature=infer.temperature,
            top_p=infer.top_p,
            num_beams=infer.num_beams,
            on_token=None if on_token is None else (lambda row, t, ids=batch["ids"]: on_token(ids[row], t)),
        )
        for sid, out in zip(batch["ids"], outs):
            answers[sid] = tokenizer.decode(out).strip()
    return answers


def encode_prompts(model, tokenizer: Tokenizer, samples: Sequence[Sample], image_processor: ImageProcessor,
                   system: str = "", blind: bool = False) -> dict:
    """The samples' prompts as collate() batches them, left-padded, with their images' pixels, for a
    model of fixed-size image tokens (model.VisionLanguageModel)."""
    items = []
    for s in samples:
        ids, _ = tokenizer.encode_chat(prompt_turns(s), model.tokens_per_image, system=system, add_generation_prompt=True)
        if blind:
            pixels = np.stack([image_processor.blank() for _ in s.images]) if s.images else None
        else:
            pixels = image_processor(s.images) if s.images else None
        items.append({"id": s.id, "input_ids": np.asarray(ids, "int64"), "labels": np.asarray(ids, "int64"),
                      "pixel_values": pixels})
    return collate(items, tokenizer.pad_token_id, padding_side="left")


def joinable(model, infer: InferConfig) -> bool:
    """Whether requests to this model with these settings can join a running batch (decoding.RunningBatch):
    fixed-size image tokens, a backbone kv_decode covers, no beam search."""
    from paddle_mm.lm.decoding import RunningBatch
    from paddle_mm.model import VisionLanguageModel

    return isinstance(model, VisionLanguageModel) and infer.num_beams == 1 and RunningBatch.supports(model.language_model)


def prompt_embeddings(model, tokenizer: Tokenizer, samples: Sequence[Sample], image_processor: ImageProcessor,
                      system: str = ""):
    """(embeddings [n, L, D] with the image features written in, mask [n, L]) of the samples' left-padded
    prompts: what RunningBatch.add takes (no gradient)."""
    import paddle

    batch = encode_prompts(model, tokenizer, samples, image_processor, system)
    pixels = None if batch["pixel_values"] is None else paddle.to_tensor(batch["pixel_values"])
    with paddle.no_grad():
        return model.embed(paddle.to_tensor(batch["input_ids"]), pixels), paddle.to_tensor(batch["attention_mask"])


def prompt_length(model, tokenizer: Tokenizer, image_processor, sample: Sample, system: str = "") -> int:
    """The token count of the sample's prompt as generate_answers builds it (each image's own count
    for a native-resolution model)."""
    from paddle_mm.data.qwen2_vl import Qwen2VLProcessor

    if isinstance(image_processor, Qwen2VLProcessor):
        return len(_native_encoding(model, tokenizer, image_processor, sample, system)["input_ids"])
    ids, _ = tokenizer.encode_chat(prompt_turns(sample), model.tokens_per_image, system=system,
                                   add_generation_prompt=True)
    return len(ids)


def _native_encoding(model, tokenizer, processor, sample: Sample, system: str, blind: bool = False) -> dict:
    """encode_conversation of a sample's prompt for model.Qwen2VLModel. A model without a video token
    (one built here with a ChatML tokenizer) reads a clip's frames as images, as it was trained;
    blind: every picture blanked at its own size (same grids and token counts)."""
    from paddle_mm.data.qwen2_vl import encode_conversation

    cfg = model.config
    images = [processor.blank(im) for im in sample.images] if blind else sample.images
    videos = getattr(sample, "videos", []) if cfg.video_token_id >= 0 else []
    return encode_conversation(tokenizer, processor, prompt_turns(sample), images, videos,
                               image_pad_id=cfg.image_token_id, video_pad_id=cfg.video_token_id, system=system,
                               add_generation_prompt=True)


def _native_resolution_answers(model, tokenizer, samples, processor, infer, blind, system, on_token):
    """generate_answers for Qwen2-VL (model.Qwen2VLModel): every image and clip at its own size and
    token count, infer.batch_size samples at a time (left-padded; their pictures' rows and grids
    concatenated in row order)."""
    import paddle

    answers: dict[str, str] = {}
    for start in range(0, len(samples), infer.batch_size):
        chunk = samples[start: start + infer.batch_size]
        encoded = [_native_encoding(model, tokenizer, processor, s, system, blind) for s in chunk]
        items = [{"id": s.id, "input_ids": np.asarray(e["input_ids"], "int64"),
                  "labels": np.asarray(e["input_ids"], "int64"), "pixel_values": e["pixel_values"],
                  **({"image_grid_thw": e["image_grid_thw"]} if e["pixel_values"] is not None else {})}
                 for s, e in zip(chunk, encoded)]
        batch = collate(items, tokenizer.pad_token_id, padding_side="left")
        tensors = {k: paddle.to_tensor(batch[k]) for k in ("pixel_values",) if batch[k] is not None}
        videos = [e for e in encoded if e["pixel_values_videos"] is not None]
        if videos:
            tensors["pixel_values_videos"] = paddle.to_tensor(np.concatenate([e["pixel_values_videos"] for e in videos]))
        seconds = [sec for e in encoded for sec in e["second_per_grid_ts"]]
        outs = model.generate(
            paddle.to_tensor(batch["input_ids"]), paddle.to_tensor(batch["attention_mask"]),
            image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=np.concatenate([e["video_grid_thw"] for e in videos]) if videos else None,
            second_per_grid_ts=seconds or None,
            max_new_tokens=infer.max_new_tokens, eos_token_id=tokenizer.stop_ids, do_sample=infer.do_sample,
            temperature=infer.temperature, top_p=infer.top_p, num_beams=infer.num_beams,
            on_token=None if on_token is None else (lambda row, t, ids=batch["ids"]: on_token(ids[row], t)), **tensors)
        for sid, out in zip(batch["ids"], outs):
            answers[sid] = tokenizer.decode(out).strip()
    return answers
