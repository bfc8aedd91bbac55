"""Weights from other implementations: Hugging Face and PaddleMIX folders, mapped by explicit tables."""
