"""The checkpoint folders a recipe names: model.path (a whole LLaVA), model.vision.path (CLIP or
SigLIP, told apart by config.json), model.lm.path (Qwen2 / Llama / Qwen3 / OPT, weights/llm.py).
Configs first, weights after building."""
from __future__ import annotations

from dataclasses import replace

from paddle_mm.config import ModelConfig
from paddle_mm.errors import RecipeError
from paddle_mm.weights.llm import load_lm_folder, resolved_lm_config


def _vision_readers(folder: str):
    """(config reader, weight loader) of a vision folder: SigLIP's if its config.json describes a
    SigLIP tower, else CLIP's (whose config reader refuses what is neither)."""
    from paddle_mm.weights import clip, siglip

    if siglip.is_siglip_folder(folder):
        return siglip.vision_config_from_folder, siglip.load_siglip_vision
    return clip.vision_config_from_folder, clip.load_clip_vision


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
        vision = replace(_vision_readers(vision.path)[0](vision.path, vision), path=vision.path)
        if not vision.class_token and vision.drop_cls_token:
            # transformers' LLaVA does drop the first patch of a SigLIP tower ("default"), so a whole
            # LLaVA folder keeps that; a model composed here would lose a patch by mistake.
            raise RecipeError(f"model.vision.path {vision.path}: a SigLIP tower has no class token, so "
                              "vision.drop_cls_token true would drop a real patch; set it to false")
    return replace(cfg, vision=vision, lm=resolved_lm_config(cfg.lm))


def load_pretrained_parts(model, cfg: ModelConfig) -> None:
    """Load the LLaVA, CLIP or SigLIP and LM weights the config names into a model built from it.

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
        _vision_readers(cfg.vision.path)[1](model.vision_tower, cfg.vision.path)
