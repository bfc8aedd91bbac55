"""The language model side: the one adapter over PaddleFormers causal LMs, decoding loops, LoRA."""
