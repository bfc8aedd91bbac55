"""Evaluation metrics: VQAv2 accuracy, COCO-style caption scores, POPE and CHAIR (pure Python)."""
from paddle_mm.eval.metrics.caption import bleu, caption_report, cider_d, rouge_l, tokenize
from paddle_mm.eval.metrics.chair import chair, mentioned_objects
from paddle_mm.eval.metrics.pope import pope_answer, pope_questions, pope_report, pope_scores
from paddle_mm.eval.metrics.vqa import NORMALIZE_MODES, normalize_answer, vqa_accuracy, vqa_report

__all__ = ["NORMALIZE_MODES", "normalize_answer", "vqa_accuracy", "vqa_report",
           "tokenize", "bleu", "rouge_l", "cider_d", "caption_report",
           "pope_answer", "pope_scores", "pope_report", "pope_questions", "chair", "mentioned_objects"]
