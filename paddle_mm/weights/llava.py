"""LLaVA-1.5 (transformers' LlavaForConditionalGeneration) -> paddle_mm's VisionLanguageModel.

Three on-disk layouts exist: the one transformers 4.57 holds in memory
(model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head.*);
the older one most published checkpoints, and 4.57's own save_pretrained, use
(vision_tower.vision_model.*, multi_modal_projector.*, language_model.model.*,
language_model.lm_head.*); and what transformers 5.x save_pretrained writes, the legacy names
with the vision tower's own "vision_model." level gone (vision_tower.encoder.*).
All are written out below as prefixes over the vision and LM tables.
The vision tower is CLIP's (LLaVA-1.5) or SigLIP's (LLaVA-OneVision-style configs), as
vision_config.model_type says. Also here: the transformers LlavaConfig of a model built here
(what export writes) and the llava record of `paddle-mm convert`.
"""
from __future__ import annotations

from dataclasses import asdict, replace

from paddle_mm.config import ModelConfig, ProjectorConfig
from paddle_mm.errors import CheckpointError
from paddle_mm.weights import siglip
from paddle_mm.weights.clip import CLIP_VISION, vision_config_from_hf
from paddle_mm.weights.hf import read_config, read_tensors, tensor_index
from paddle_mm.weights.llm import LM_HEAD, TIED_LM_HEAD, decoder_table, hf_text_config, nested_lm_config
from paddle_mm.weights.mapping import Family, Rule, Table, load_mapped, refuse_inexpressible

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
    "transformers-5": ("vision_tower.", "multi_modal_projector.", "language_model.model.", "language_model."),
}

# vision_config.model_type -> (the tower's table, its config reader)
VISION_TOWERS = {
    "clip_vision_model": (CLIP_VISION, vision_config_from_hf),
    siglip.VISION_MODEL_TYPE: (siglip.SIGLIP_VISION, siglip.vision_config_from_hf),
}


def vision_tower_type(raw: dict, source: str) -> str:
    """The vision_config.model_type of a LLaVA config.json dict, refused unless a table exists for it."""
    kind = (raw.get("vision_config") or {}).get("model_type", "clip_vision_model")
    if kind not in VISION_TOWERS:
        raise CheckpointError(f"{source}: vision tower {kind!r} is not one of {tuple(VISION_TOWERS)}")
    return kind


def llava_table(layout: str, family: str, tie_word_embeddings: bool, vision_type: str = "clip_vision_model") -> Table:
    vision, projector, decoder, head = LAYOUTS[layout]
    return (VISION_TOWERS[vision_type][0].prefixed(vision, "vision_tower.")
            + PROJECTOR.prefixed(projector, "multi_modal_projector.")
            + decoder_table(family).prefixed(decoder, "language_model.model.")
            + (TIED_LM_HEAD if tie_word_embeddings else LM_HEAD).prefixed(head, "language_model."))


def layout_of(names, source: str) -> str:
    for layout, (vision, _, decoder, _) in LAYOUTS.items():  # legacy and 5.x differ in the tower's prefix
        if any(n.startswith(decoder + "layers.") for n in names) and any(
                n.startswith(vision + "encoder.layers.") for n in names):
            return layout
    raise CheckpointError(f"{source}: not a LLaVA checkpoint (no language model and vision tower under "
                          f"{' or '.join(p[2] + ' and ' + p[0] for p in LAYOUTS.values())})")


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
    read_vision = VISION_TOWERS[vision_tower_type(raw, source)][1]
    vision = read_vision(raw.get("vision_config") or {}, source, base.vision)
    vision = replace(vision, path="", feature_layer=layer, drop_cls_token=strategy == "default", post_norm=False)
    lm = nested_lm_config(raw.get("text_config") or {}, source)
    lm = replace(lm, attn_implementation=base.lm.attn_implementation)
    return replace(base, path=folder, vision=vision, projector=ProjectorConfig(type="mlp2x_gelu"), lm=lm,
                   image_token_id=int(raw.get("image_token_index", base.image_token_id)))


def load_llava(model, folder: str, strict: bool = True) -> list[str]:
    """Load a LLaVA folder (either layout) into a VisionLanguageModel built from its config."""
    tensors = read_tensors(folder)
    lm = model.config.lm
    vision_type = "clip_vision_model" if model.config.vision.class_token else siglip.VISION_MODEL_TYPE
    table = llava_table(layout_of(tensors, folder), lm.family, lm.tie_word_embeddings, vision_type)
    where = {k: path for k, (path, _) in tensor_index(folder).items()}
    return load_mapped(model, tensors, table, folder, where, strict)


def hf_llava_config(cfg: ModelConfig, source: str) -> dict:
    """A transformers LlavaConfig dict for a model built here; refuses what LLaVA cannot express."""
    v, lm = cfg.vision, cfg.lm
    refuse_inexpressible(source, "LLaVA", (
        (cfg.projector.type != "mlp2x_gelu", f"projector {cfg.projector.type!r} (LLaVA has mlp2x_gelu)"),
        (cfg.projector.pool != 1, "projector.pool > 1"),
        (v.post_norm, "vision.post_norm (LLaVA does not normalize the selected features)"),
        (v.class_token and not v.pre_norm, "vision.pre_norm false"),
        (v.class_token and v.patch_bias, "vision.patch_bias (CLIP's patch embedding has none)"),
        (v.class_token and v.hidden_act == "gelu_tanh", "vision hidden_act gelu_tanh with a class token (CLIP's "
                                                        "is quick_gelu or gelu)"),
        (lm.family not in ("llama", "qwen2"), f"LM family {lm.family!r}"),
        (cfg.family != "llava", f"model.family {cfg.family!r} (a Qwen2-VL model is not a LLaVA)"),
    ))
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": cfg.image_token_id, "image_seq_length": cfg.tokens_per_image,
        "vision_feature_layer": v.feature_layer,
        "vision_feature_select_strategy": "default" if v.drop_cls_token else "full",
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "tie_word_embeddings": lm.tie_word_embeddings,
        "vision_config": siglip.hf_vision_config(v, source) if not v.class_token else {
            "model_type": "clip_vision_model", "image_size": v.image_size, "patch_size": v.patch_size,
            "num_channels": v.num_channels, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": v.hidden_act,
        },
        "text_config": hf_text_config(lm),
    }


# ---- the convert record ------------------------------------------------------------------------
def _convert_table(raw: dict, layout: str, source: str) -> Table:
    text = raw.get("text_config") or {}
    return llava_table(layout, text.get("model_type", "llama"), bool(text.get("tie_word_embeddings", False)),
                       vision_tower_type(raw, source))


def _convert_config(src: str) -> dict:
    cfg = llava_model_config(src)
    cfg.path = ""  # the converted folder holds the weights itself
    return asdict(cfg)


LLAVA = Family("llava", layout=layout_of, table=_convert_table, config=_convert_config, makes_run_folder=True)
