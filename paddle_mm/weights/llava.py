"""LLaVA-1.5 (transformers' LlavaForConditionalGeneration) -> paddle_mm's VisionLanguageModel.

Two on-disk layouts exist: the one transformers 4.57 holds in memory
(model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head.*)
and the older one most published checkpoints, and transformers' own save_pretrained, use
(vision_tower.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head.*).
Both are written out below as prefixes over the CLIP and LM tables.
"""
from __future__ import annotations

from dataclasses import replace

from paddle_mm.config import ModelConfig, ProjectorConfig
from paddle_mm.errors import CheckpointError
from paddle_mm.weights.clip import CLIP_VISION, vision_config_from_hf
from paddle_mm.weights.hf import read_config, read_tensors, tensor_index
from paddle_mm.weights.llm import LM_HEAD, TIED_LM_HEAD, decoder_table, nested_lm_config
from paddle_mm.weights.mapping import Rule, Table, load_mapped

PROJECTOR = Table("llava-projector", (
    Rule("linear_1.weight", "linear_1.weight", transpose=True),
    Rule("linear_1.bias", "linear_1.bias"),
    Rule("linear_2.weight", "linear_2.weight", transpose=True),
    Rule("linear_2.bias", "linear_2.bias"),
))

# layout -> source prefix of (vision tower, projector, LM decoder, LM head)
LAYOUTS = {
    "transformers-4.57": ("model.vision_tower.vision_model.", "model.multi_modal_projector.",
                          "model.language_model.", ""),
    "legacy": ("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.", "language_model."),
}


def llava_table(layout: str, family: str, tie_word_embeddings: bool) -> Table:
    vision, projector, decoder, head = LAYOUTS[layout]
    return (CLIP_VISION.prefixed(vision, "vision_tower.")
            + PROJECTOR.prefixed(projector, "multi_modal_projector.")
            + decoder_table(family).prefixed(decoder, "language_model.model.")
            + (TIED_LM_HEAD if tie_word_embeddings else LM_HEAD).prefixed(head, "language_model."))


def layout_of(names, source: str) -> str:
    for layout, (_, _, decoder, _) in LAYOUTS.items():
        if any(n.startswith(decoder + "layers.") for n in names):
            return layout
    raise CheckpointError(f"{source}: not a LLaVA checkpoint (no language model under "
                          f"{' or '.join(p[2] for p in LAYOUTS.values())})")


def llava_model_config(folder: str, base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig of a LLaVA folder's config.json (the LM weights come with the folder)."""
    raw = read_config(folder)
    source = f"{folder}/config.json"
    if raw.get("model_type") != "llava":
        raise CheckpointError(f"{source}: model_type {raw.get('model_type')!r} is not 'llava'")
    base = base or ModelConfig()
    layer = raw.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"{source}: vision_feature_layer {layer!r}: only a single layer is supported")
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise CheckpointError(f"{source}: vision_feature_select_strategy {strategy!r} is not 'default' or 'full'")
    if raw.get("projector_hidden_act", "gelu") != "gelu" or not raw.get("multimodal_projector_bias", True):
        raise CheckpointError(f"{source}: only the gelu projector with biases (LLaVA-1.5's) is supported")
    vision_raw = raw.get("vision_config") or {}
    if vision_raw.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(f"{source}: vision tower {vision_raw.get('model_type')!r} is not a CLIP vision model")
    vision = vision_config_from_hf(vision_raw, source, base.vision)
    vision = replace(vision, path="", feature_layer=layer, drop_cls_token=strategy == "default", post_norm=False)
    lm = nested_lm_config(raw.get("text_config") or {}, source)
    lm = replace(lm, attn_implementation=base.lm.attn_implementation)
    return replace(base, path=folder, vision=vision, projector=ProjectorConfig(type="mlp2x_gelu"), lm=lm,
                   image_token_id=int(raw.get("image_token_index", base.image_token_id)))


def load_llava(model, folder: str, strict: bool = True) -> list[str]:
    """Load a LLaVA folder (either layout) into a VisionLanguageModel built from its config."""
    tensors = read_tensors(folder)
    lm = model.config.lm
    table = llava_table(layout_of(tensors, folder), lm.family, lm.tie_word_embeddings)
    where = {k: path for k, (path, _) in tensor_index(folder).items()}
    return load_mapped(model, tensors, table, folder, where, strict)
