"""Score a model on held-out samples: VQAv2 accuracy, caption metrics, and the question-prior baseline."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from paddle_mm.data.readers import Sample
from paddle_mm.data.tokenizer import IMAGE_TOKEN
from paddle_mm.eval.metrics.caption import caption_report
from paddle_mm.eval.metrics.vqa import vqa_report
from paddle_mm.inference.generate import generate_answers, prompt_turns


def _vqa_annotations(samples: Sequence[Sample]) -> dict:
    return {s.id: {"answers": s.meta["answers"], "question_type": s.meta.get("question_type") or "all"}
            for s in samples}


def evaluate_vqa(model, tokenizer, samples, image_processor, infer, blind=False, system="",
                 normalize="official") -> dict:
    """VQAv2 accuracy overall and per question type; samples need meta["answers"].

    ``normalize``: "official" (the VQA evaluation script's rule) or "symmetric" (always
    normalize both sides); see paddle_mm.eval.metrics.vqa.
    """
    preds = generate_answers(model, tokenizer, samples, image_processor, infer, blind=blind, system=system)
    report = vqa_report(preds, _vqa_annotations(samples), normalize=normalize)
    report["predictions"] = preds
    return report


def _question_key(text: str) -> str:
    return text.replace(IMAGE_TOKEN, "").strip().lower()


def question_prior_report(train_samples: Sequence[Sample], samples: Sequence[Sample],
                          normalize: str = "official") -> dict:
    """The text-only baseline: answer each question with the answer the training data gives it
    most often (over every user turn of every conversation). No model, no image: what the
    question alone is worth, the yardstick a model that ignores the image would approach.
    ``normalize`` as in ``evaluate_vqa``.
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
    return vqa_report(preds, _vqa_annotations(samples), normalize=normalize)


def evaluate_captions(model, tokenizer, samples, image_processor, infer, system="") -> dict:
    """BLEU-4, ROUGE-L and CIDEr-D against meta["references"] (or the sample's own caption)."""
    preds = generate_answers(model, tokenizer, samples, image_processor, infer, system=system)
    refs = {s.id: s.meta.get("references") or [s.turns[-1][1]] for s in samples}
    report = caption_report(refs, preds)
    report["predictions"] = preds
    return report
