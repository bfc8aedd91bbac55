"""The checkpoint folders a recipe names: model.path (a whole LLaVA), model.vision.path (CLIP),
model.lm.path (Qwen2 / Llama, loaded by the LM adapter). Configs first, weights after building."""
from __future__ import annotations

from dataclasses import replace

from paddle_mm.config import ModelConfig
from paddle_mm.errors import RecipeError
from paddle_mm.lm.adapter import resolved_lm_config


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
    """Load the LLaVA or CLIP weights the config names into a freshly built model."""
    if cfg.path:
        from paddle_mm.weights.llava import load_llava

        load_llava(model, cfg.path)
    elif cfg.vision.path:
        from paddle_mm.weights.clip import load_clip_vision

        load_clip_vision(model.vision_tower, cfg.vision.path)
