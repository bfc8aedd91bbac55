"""The checkpoint folders a recipe names: model.path (a whole LLaVA), model.vision.path (CLIP),
model.lm.path (Qwen2 / Llama / Qwen3 / OPT, weights/llm.py). Configs first, weights after building."""
from __future__ import annotations

from dataclasses import replace

from paddle_mm.config import ModelConfig
from paddle_mm.errors import RecipeError
from paddle_mm.weights.llm import load_lm_folder, resolved_lm_config


def resolved_model_config(cfg: ModelConfig) -> ModelConfig:
    """The config with the architecture fields of every named folder filled in."""
    if cfg.path:
        if cfg.vision.path or cfg.lm.path:
            raise RecipeError("model.path (a whole LLaVA checkpoint) cannot be combined with "
                              "model.vision.path or model.lm.path")
        from paddle_mm.weights.llava import llava_model_config

        return llava_model_config(cfg.path, cfg)
    vision = cfg.vision
    if vision.path:
        from paddle_mm.weights.clip import vision_config_from_folder

        vision = replace(vision_config_from_folder(vision.path, vision), path=vision.path)
    return replace(cfg, vision=vision, lm=resolved_lm_config(cfg.lm))


def load_pretrained_parts(model, cfg: ModelConfig) -> None:
    """Load the LLaVA, CLIP and LM weights the config names into a model built from it.

    The model was built from resolved_model_config's fields; loading draws no random numbers,
    so every part not loaded has the same initial weights as in a model built without folders.
    """
    if cfg.lm.path:
        # First, as when the LM adapter loaded it while the model was built: its errors come first.
        load_lm_folder(model.language_model, cfg.lm.path)
    if cfg.path:
        from paddle_mm.weights.llava import load_llava

        load_llava(model, cfg.path)
    elif cfg.vision.path:
        from paddle_mm.weights.clip import load_clip_vision

        load_clip_vision(model.vision_tower, cfg.vision.path)
