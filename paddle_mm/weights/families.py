"""The checkpoint families `paddle-mm convert` and `export` know, by name: one `Family` record
(weights/mapping.py) each, defined in the family's own module."""
from __future__ import annotations

from paddle_mm.errors import CheckpointError
from paddle_mm.weights.blip2 import BLIP2
from paddle_mm.weights.clip import CLIP
from paddle_mm.weights.llava import LLAVA
from paddle_mm.weights.llm import LLAMA, QWEN2
from paddle_mm.weights.mapping import Family
from paddle_mm.weights.qwen2_vl import QWEN2_VL
from paddle_mm.weights.siglip import SIGLIP

# In the order messages (and the CLI's choices) list them.
FAMILIES: dict[str, Family] = {f.name: f for f in (LLAVA, CLIP, SIGLIP, QWEN2, LLAMA, BLIP2, QWEN2_VL)}


def family(name: str) -> Family:
    """The record of a family name; an unknown name is a CheckpointError listing the known ones."""
    if name not in FAMILIES:
        raise CheckpointError(f"unknown family {name!r}: one of {tuple(FAMILIES)}")
    return FAMILIES[name]
