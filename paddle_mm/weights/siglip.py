"""SigLIP vision tower: Hugging Face SiglipVisionModel / SiglipModel names -> paddle_mm's ViT.

SigLIP's tower is paddle_mm's ViT without a class token or pre-LayerNorm, with a bias on the
patch embedding and the tanh-approximated gelu; its encoder layers are named as CLIP's, so
the table shares their rules (weights/clip.py). Its attention-pooling head (`head.*`, the
pooled embedding of the contrastive model) is not used by LLaVA-style models and is ignored
by name, as are a SiglipModel's text tower and logit scale and bias.

Where the tower lies in a folder depends on the transformers version that saved it:
4.57 writes a SiglipVisionModel under "vision_model." and a LLaVA's tower under
"vision_tower.vision_model."; 5.x drops the "vision_model." of a SiglipVisionModel (and so
"vision_tower." alone in a LLaVA); both write a SiglipModel's tower under "vision_model.".
Also here: the siglip record of `paddle-mm convert` (the vision tower alone, as a paddle_mm folder).
"""
from __future__ import annotations

from dataclasses import asdict, replace

from paddle_mm.config import VisionConfig
from paddle_mm.errors import CheckpointError
from paddle_mm.weights.clip import HF_TEXT_TOWER, HF_VIT_ATTENTION, HF_VIT_NORMS_AND_MLP, VisionTower
from paddle_mm.weights.hf import read_config
from paddle_mm.weights.mapping import Rule, Table, refuse_inexpressible

# Source names relative to the tower (SiglipVisionTransformer, "vision_model." in most folders).
SIGLIP_VISION = Table("siglip-vision", (
    Rule("embeddings.patch_embedding.weight", "patch_embedding.weight"),
    Rule("embeddings.patch_embedding.bias", "patch_embedding.bias"),
    Rule("embeddings.position_embedding.weight", "position_embedding"),
) + HF_VIT_ATTENTION + HF_VIT_NORMS_AND_MLP, ignore=(
    "embeddings.position_ids",  # a buffer of 0..P-1, should a checkpoint hold it; recomputed here
    # the attention-pooling (MAP) head: a learned probe attends over the post-normed patches
    "head.probe",
    "head.attention.in_proj_weight",
    "head.attention.in_proj_bias",
    "head.attention.out_proj.weight",
    "head.attention.out_proj.bias",
    "head.layernorm.weight",
    "head.layernorm.bias",
    "head.mlp.fc1.weight",
    "head.mlp.fc1.bias",
    "head.mlp.fc2.weight",
    "head.mlp.fc2.bias",
))

# What a whole SiglipModel holds beside its vision tower: the text tower and the sigmoid loss's scale and bias.
SIGLIP_MODEL_EXTRAS = Table("siglip-model", (), ignore=HF_TEXT_TOWER + (
    "text_model.head.weight",
    "text_model.head.bias",
    "logit_scale",
    "logit_bias",
))

# The prefixes a SigLIP tower is found under: a SiglipModel (both versions) or a 4.57
# SiglipVisionModel; a 5.x SiglipVisionModel; a tower saved out of a LLaVA model (4.57's save,
# 4.57's in-memory names, 5.x's save).
LAYOUTS = ("vision_model.", "", "vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.")

VISION_MODEL_TYPE = "siglip_vision_model"
# transformers' activation name -> VisionConfig.hidden_act
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# SiglipVisionConfig's defaults, for the keys a config.json omits (a nested vision_config may
# hold only what differs from them).
_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def _square(value, key: str, source: str) -> int:
    """An int, or 5.x's [height, width] of equal sides; paddle_mm's ViT has square images and patches."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{source}: vision {key} {value!r}: only square sizes are supported")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{source}: vision {key} {value!r} is not an integer")
    return value


def vision_config_from_hf(raw: dict, source: str, base: VisionConfig | None = None) -> VisionConfig:
    """The architecture fields of a SiglipVisionConfig dict on top of `base` (feature selection kept)."""
    raw = {**_DEFAULTS, **raw}
    act = raw["hidden_act"]
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"{source}: vision hidden_act {act!r} is not one of {tuple(_ACTIVATIONS)}")
    return replace(
        base or VisionConfig(),
        image_size=_square(raw["image_size"], "image_size", source),
        patch_size=_square(raw["patch_size"], "patch_size", source),
        num_channels=int(raw["num_channels"]), hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]), num_layers=int(raw["num_hidden_layers"]),
        num_heads=int(raw["num_attention_heads"]), layer_norm_eps=float(raw["layer_norm_eps"]),
        hidden_act=_ACTIVATIONS[act], pre_norm=False, class_token=False, patch_bias=True,
    )


def tower_config(raw: dict) -> dict | None:
    """The SigLIP vision config of a SiglipVisionModel, SiglipModel or LLaVA config.json dict; None if it has none."""
    kind = raw.get("model_type")
    if kind == VISION_MODEL_TYPE:
        return raw
    vision = raw.get("vision_config")
    if kind in ("siglip", "llava") and isinstance(vision, dict):
        # a SiglipModel's vision_config may omit its model_type; a LLaVA's names its tower
        if vision.get("model_type", VISION_MODEL_TYPE if kind == "siglip" else None) == VISION_MODEL_TYPE:
            return vision
    return None


def is_siglip_folder(folder: str) -> bool:
    """Whether a folder's config.json describes a SigLIP vision tower (alone, in a SiglipModel or a LLaVA)."""
    return tower_config(read_config(folder)) is not None


def vision_config_from_folder(folder: str, base: VisionConfig | None = None) -> VisionConfig:
    """Read a SiglipVisionModel, SiglipModel or LLaVA-with-SigLIP folder's config.json into a VisionConfig."""
    raw = read_config(folder)
    source = f"{folder}/config.json"
    vision = tower_config(raw)
    if vision is None:
        raise CheckpointError(f"{source}: model_type {raw.get('model_type')!r} is not a SigLIP vision model "
                              f"(siglip, {VISION_MODEL_TYPE}, llava with a {VISION_MODEL_TYPE} tower)")
    return vision_config_from_hf(vision, source, base)


SIGLIP_TOWER = VisionTower("SigLIP", LAYOUTS, SIGLIP_VISION, SIGLIP_MODEL_EXTRAS)


def load_siglip_vision(vit, folder: str, strict: bool = True) -> list[str]:
    """Load a SigLIP vision tower from a local Hugging Face folder into paddle_mm's ViT."""
    return SIGLIP_TOWER.load(vit, folder, strict)


def hf_vision_config(v: VisionConfig, source: str) -> dict:
    """The transformers SiglipVisionConfig dict of a tower built here; refuses what SigLIP cannot express."""
    refuse_inexpressible(source, "SigLIP vision tower", (
        (v.class_token, "vision.class_token (SigLIP has none)"),
        (v.pre_norm, "vision.pre_norm (SigLIP has none)"),
        (not v.patch_bias, "vision.patch_bias false (SigLIP's patch embedding has a bias)"),
        (v.hidden_act not in _ACTIVATIONS.values(), f"vision hidden_act {v.hidden_act!r}"),
    ))
    act = next(hf for hf, ours in _ACTIVATIONS.items() if ours == v.hidden_act)
    return {
        "model_type": VISION_MODEL_TYPE, "image_size": v.image_size, "patch_size": v.patch_size,
        "num_channels": v.num_channels, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": act, "vision_use_head": False,
    }


# A converted tower keeps every patch of the last layer (LLaVA-OneVision's selection: layer -1,
# "full"); a recipe that names the folder sets its own.
SIGLIP = SIGLIP_TOWER.family("siglip", config=lambda src: asdict(vision_config_from_folder(
    src, VisionConfig(feature_layer=-1, drop_cls_token=False))))
