"""Evaluation: pure metric functions in metrics/, and scoring a model or an align/clip run with them."""
