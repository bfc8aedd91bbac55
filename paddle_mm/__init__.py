"""paddle_mm: vision-language models from parts, trained and run from recipe files."""
import os as _os


def _is_amd_cpu() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return "AuthenticAMD" in line
    except OSError:
        pass
    return False


# Paddle's bundled MKL (2019) takes a slow code path on AMD processors unless told to use its AVX2
# one; it reads this once when it loads, so it is set before paddle is imported. Only on AMD: on an
# Intel processor with AVX-512 the same setting forces the AVX2 path, which ran the bench's matrix
# products 1.3-2.2x slower (docs/ARCHITECTURE.md, "the machine"). A user's own setting wins.
if _is_amd_cpu():
    _os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")
# PaddleFormers imports transformers without torch; its advice that torch is missing is noise here.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

# The public API (paddle_mm/api/): loaded on first use, so `import paddle_mm` stays cheap.
__all__ = ["Recipe", "Pipeline", "load", "load_recipe", "train", "evaluate_vqa", "evaluate_captions", "evaluate_retrieval",
           "generate_demo_data", "train_tokenizer", "plot_runs", "metrics"]


def __getattr__(name: str):
    if name == "metrics":  # the metrics as plain functions: VQA accuracy, BLEU/ROUGE-L/CIDEr-D
        import importlib

        return importlib.import_module("paddle_mm.eval.metrics")
    if name in __all__:
        from paddle_mm import api

        return getattr(api, name)
    raise AttributeError(f"module 'paddle_mm' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
