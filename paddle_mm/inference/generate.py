"""Answer held-out samples with a model and score them (VQAv2 accuracy, caption metrics)."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from paddle_mm.config import InferConfig
from paddle_mm.data.dataset import collate
from paddle_mm.data.image import ImageProcessor
from paddle_mm.data.readers import IMAGE_TOKEN, Sample
from paddle_mm.data.tokenizer import Tokenizer
from paddle_mm.eval.metrics.caption import caption_report
from paddle_mm.eval.metrics.vqa import vqa_report


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
    on_token: Callable[[str, int], None] | None = None,
) -> dict[str, str]:
    """{sample id: generated text}. blind=True replaces every image with a blank one.

    on_token(sample id, token id) sees each new token as it is chosen, for streaming.
    """
    import paddle

    answers: dict[str, str] = {}
    tpi = model.tokens_per_image
    for start in range(0, len(samples), infer.batch_size):
        chunk = samples[start: start + infer.batch_size]
        items = []
        for s in chunk:
            ids, _ = tokenizer.encode_chat(prompt_turns(s), tpi, system=system, add_generation_prompt=True)
            if blind:
                pixels = np.stack([image_processor.blank() for _ in s.images]) if s.images else None
            else:
                pixels = image_processor(s.images) if s.images else None
            items.append({"id": s.id, "input_ids": np.asarray(ids, "int64"), "labels": np.asarray(ids, "int64"),
                          "pixel_values": pixels})
        batch = collate(items, tokenizer.pad_token_id, padding_side="left")
        pixel_values = None if batch["pixel_values"] is None else paddle.to_tensor(batch["pixel_values"])
        outs = model.generate(
            paddle.to_tensor(batch["input_ids"]),
            paddle.to_tensor(batch["attention_mask"]),
            pixel_values,
            max_new_tokens=infer.max_new_tokens,
            eos_token_id=tokenizer.im_end_id,
            do_sample=infer.do_sample,
            temperature=infer.temperature,
            top_p=infer.top_p,
            num_beams=infer.num_beams,
            on_token=None if on_token is None else (lambda row, t, ids=batch["ids"]: on_token(ids[row], t)),
        )
        for sid, out in zip(batch["ids"], outs):
            answers[sid] = tokenizer.decode(out).strip()
    return answers


def _vqa_annotations(samples: Sequence[Sample]) -> dict:
    return {s.id: {"answers": s.meta["answers"], "question_type": s.meta.get("question_type") or "all"}
            for s in samples}


def evaluate_vqa(model, tokenizer, samples, image_processor, infer, blind=False, system="") -> dict:
    """VQAv2 accuracy overall and per question type; samples need meta["answers"]."""
    preds = generate_answers(model, tokenizer, samples, image_processor, infer, blind=blind, system=system)
    report = vqa_report(preds, _vqa_annotations(samples))
    report["predictions"] = preds
    return report


def _question_key(text: str) -> str:
    return text.replace(IMAGE_TOKEN, "").strip().lower()


def question_prior_report(train_samples: Sequence[Sample], samples: Sequence[Sample]) -> dict:
    """The text-only baseline: answer each question with the answer the training data gives it
    most often (over every user turn of every conversation). No model, no image: what the
    question alone is worth, the yardstick a model that ignores the image would approach.
    """
    counts: dict[str, Counter] = {}
    for s in train_samples:
        for (role, question), (_, answer) in zip(s.turns[::2], s.turns[1::2]):
            if role == "user":
                counts.setdefault(_question_key(question), Counter())[answer.strip()] += 1
    overall = Counter(a for c in counts.values() for a in c.elements())
    fallback = overall.most_common(1)[0][0] if overall else ""
    preds = {}
    for s in samples:
        c = counts.get(_question_key(prompt_turns(s)[-1][1]))
        preds[s.id] = c.most_common(1)[0][0] if c else fallback
    return vqa_report(preds, _vqa_annotations(samples))


def evaluate_captions(model, tokenizer, samples, image_processor, infer, system="") -> dict:
    """BLEU-4, ROUGE-L and CIDEr-D against meta["references"] (or the sample's own caption)."""
    preds = generate_answers(model, tokenizer, samples, image_processor, infer, system=system)
    refs = {s.id: s.meta.get("references") or [s.turns[-1][1]] for s in samples}
    report = caption_report(refs, preds)
    report["predictions"] = preds
    return report
