"""Evaluation metrics: VQAv2 accuracy and COCO-style caption scores (pure Python)."""
from paddle_mm.eval.metrics.caption import bleu, caption_report, cider_d, rouge_l, tokenize
from paddle_mm.eval.metrics.vqa import NORMALIZE_MODES, normalize_answer, vqa_accuracy, vqa_report

__all__ = ["NORMALIZE_MODES", "normalize_answer", "vqa_accuracy", "vqa_report",
           "tokenize", "bleu", "rouge_l", "cider_d", "caption_report"]
