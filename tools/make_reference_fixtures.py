"""Build tiny random models with Hugging Face transformers (PyTorch) and save reference outputs.

Run by hand (needs the optional extra torch: `pip install -r requirements-bench.txt`):
    python tools/make_reference_fixtures.py [--out tests/fixtures/reference]
Each family gets a folder holding a checkpoint in the Hugging Face layout and
`reference.safetensors` with the outputs the tests compare paddle_mm against, without torch.
"""
from __future__ import annotations

import argparse
import os


def perturb_(model, seed: int, scale: float = 0.02) -> None:
    """Move every parameter away from its initial value (LayerNorm weights off 1, biases off 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def save_reference(folder: str, outputs: dict) -> None:
    """Save {name: torch.Tensor} as fp32 safetensors (int tensors kept as int64)."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    arrays = {k: (v.detach().float() if v.is_floating_point() else v.detach().long()).contiguous() for k, v in outputs.items()}
    save_file(arrays, os.path.join(folder, "reference.safetensors"))
    del torch


FAMILIES: dict = {}  # name -> function(out_folder); families register below


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "reference"))
    parser.add_argument("families", nargs="*", help=f"default: all ({', '.join(FAMILIES)})")
    args = parser.parse_args()
    for name in args.families or list(FAMILIES):
        FAMILIES[name](os.path.join(args.out, name))
        print(f"wrote {name}")


if __name__ == "__main__":
    main()
