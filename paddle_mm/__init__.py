"""paddle_mm: vision-language models from parts, trained and run from recipe files."""
import os as _os

# Paddle's bundled MKL takes a slow code path on AMD processors unless told otherwise; it reads
# this once when it loads, so it has to be set before paddle is imported. A user's own setting wins.
_os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
# PaddleFormers imports transformers without torch; its advice that torch is missing is noise here.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
