"""CLIP vision tower: Hugging Face CLIPVisionModel / CLIPModel names -> paddle_mm's ViT.

paddle_mm's ViT keeps CLIP's structure, so the table is one row per tensor kind. Linear
weights are transposed; the patch convolution has the same layout in both frameworks;
HF's position_embedding is an nn.Embedding whose [P + 1, D] weight is our parameter.
Also here: the clip record of `paddle-mm convert` (the vision tower alone, as a paddle_mm folder).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from paddle_mm.config import VisionConfig
from paddle_mm.errors import CheckpointError
from paddle_mm.weights.hf import read_config, read_tensors, tensor_index
from paddle_mm.weights.mapping import Family, Rule, Table, load_mapped

# The encoder-layer attention, named alike by transformers' CLIP and SigLIP vision models
# (relative to their "vision_model."); BLIP-2's fuses q, k and v.
HF_VIT_ATTENTION = (
    Rule("encoder.layers.{i}.self_attn.q_proj.weight", "blocks.{i}.attn.q_proj.weight", transpose=True),
    Rule("encoder.layers.{i}.self_attn.q_proj.bias", "blocks.{i}.attn.q_proj.bias"),
    Rule("encoder.layers.{i}.self_attn.k_proj.weight", "blocks.{i}.attn.k_proj.weight", transpose=True),
    Rule("encoder.layers.{i}.self_attn.k_proj.bias", "blocks.{i}.attn.k_proj.bias"),
    Rule("encoder.layers.{i}.self_attn.v_proj.weight", "blocks.{i}.attn.v_proj.weight", transpose=True),
    Rule("encoder.layers.{i}.self_attn.v_proj.bias", "blocks.{i}.attn.v_proj.bias"),
    Rule("encoder.layers.{i}.self_attn.out_proj.weight", "blocks.{i}.attn.out_proj.weight", transpose=True),
    Rule("encoder.layers.{i}.self_attn.out_proj.bias", "blocks.{i}.attn.out_proj.bias"),
)

# The encoder-layer norms and MLP and the final norm, named alike by transformers' CLIP, SigLIP
# and BLIP-2 vision models (relative to their "vision_model.").
HF_VIT_NORMS_AND_MLP = (
    Rule("encoder.layers.{i}.layer_norm1.weight", "blocks.{i}.norm1.weight"),
    Rule("encoder.layers.{i}.layer_norm1.bias", "blocks.{i}.norm1.bias"),
    Rule("encoder.layers.{i}.layer_norm2.weight", "blocks.{i}.norm2.weight"),
    Rule("encoder.layers.{i}.layer_norm2.bias", "blocks.{i}.norm2.bias"),
    Rule("encoder.layers.{i}.mlp.fc1.weight", "blocks.{i}.mlp.fc1.weight", transpose=True),
    Rule("encoder.layers.{i}.mlp.fc1.bias", "blocks.{i}.mlp.fc1.bias"),
    Rule("encoder.layers.{i}.mlp.fc2.weight", "blocks.{i}.mlp.fc2.weight", transpose=True),
    Rule("encoder.layers.{i}.mlp.fc2.bias", "blocks.{i}.mlp.fc2.bias"),
    Rule("post_layernorm.weight", "post_norm.weight"),
    Rule("post_layernorm.bias", "post_norm.bias"),
)

# Source names relative to CLIPVisionTransformer ("vision_model." in a CLIP checkpoint).
CLIP_VISION = Table("clip-vision", (
    Rule("embeddings.class_embedding", "class_embedding"),
    Rule("embeddings.patch_embedding.weight", "patch_embedding.weight"),
    Rule("embeddings.position_embedding.weight", "position_embedding"),
    Rule("pre_layrnorm.weight", "pre_norm.weight"),  # sic: HF spells it "layrnorm"
    Rule("pre_layrnorm.bias", "pre_norm.bias"),
) + HF_VIT_ATTENTION + HF_VIT_NORMS_AND_MLP, ignore=(
    "embeddings.position_ids",  # a buffer of 0..P that older checkpoints saved; recomputed here
))

# The text tower CLIPModel and SiglipModel both hold beside the vision tower, under "text_model."
# (names alike in both; each model's own head and scales are listed with it).
HF_TEXT_TOWER = (
    "text_model.embeddings.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight",
    "text_model.embeddings.position_ids",
    "text_model.encoder.layers.{i}.self_attn.q_proj.weight",
    "text_model.encoder.layers.{i}.self_attn.q_proj.bias",
    "text_model.encoder.layers.{i}.self_attn.k_proj.weight",
    "text_model.encoder.layers.{i}.self_attn.k_proj.bias",
    "text_model.encoder.layers.{i}.self_attn.v_proj.weight",
    "text_model.encoder.layers.{i}.self_attn.v_proj.bias",
    "text_model.encoder.layers.{i}.self_attn.out_proj.weight",
    "text_model.encoder.layers.{i}.self_attn.out_proj.bias",
    "text_model.encoder.layers.{i}.layer_norm1.weight",
    "text_model.encoder.layers.{i}.layer_norm1.bias",
    "text_model.encoder.layers.{i}.layer_norm2.weight",
    "text_model.encoder.layers.{i}.layer_norm2.bias",
    "text_model.encoder.layers.{i}.mlp.fc1.weight",
    "text_model.encoder.layers.{i}.mlp.fc1.bias",
    "text_model.encoder.layers.{i}.mlp.fc2.weight",
    "text_model.encoder.layers.{i}.mlp.fc2.bias",
    "text_model.final_layer_norm.weight",
    "text_model.final_layer_norm.bias",
)

# What a whole CLIPModel holds beside its vision tower: the text tower and the contrastive head.
CLIP_MODEL_EXTRAS = Table("clip-model", (), ignore=HF_TEXT_TOWER + (
    "text_projection.weight",
    "visual_projection.weight",
    "logit_scale",
))

# The prefixes a CLIP vision tower is found under: a CLIPModel / CLIPVisionModel folder, and
# a vision tower saved out of a LLaVA model (legacy, transformers 4.57 and 5.x layouts).
LAYOUTS = ("vision_model.", "vision_tower.vision_model.", "model.vision_tower.vision_model.", "vision_tower.")

_ACTIVATIONS = ("quick_gelu", "gelu")


def vision_config_from_hf(raw: dict, source: str, base: VisionConfig | None = None) -> VisionConfig:
    """The architecture fields of a CLIPVisionConfig dict on top of `base` (feature selection kept)."""
    act = raw.get("hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"{source}: vision hidden_act {act!r} is not one of {_ACTIVATIONS}")
    try:
        return replace(
            base or VisionConfig(),
            image_size=int(raw["image_size"]), patch_size=int(raw["patch_size"]),
            num_channels=int(raw.get("num_channels", 3)), hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]), num_layers=int(raw["num_hidden_layers"]),
            num_heads=int(raw["num_attention_heads"]), layer_norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
            hidden_act=act, pre_norm=True, class_token=True, patch_bias=False,
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: vision config lacks {e.args[0]!r}") from e


def vision_config_from_folder(folder: str, base: VisionConfig | None = None) -> VisionConfig:
    """Read a CLIP, CLIP-vision or LLaVA folder's config.json into a VisionConfig."""
    raw = read_config(folder)
    source = f"{folder}/config.json"
    kind = raw.get("model_type")
    if kind == "clip_vision_model":
        return vision_config_from_hf(raw, source, base)
    if kind in ("clip", "llava") and isinstance(raw.get("vision_config"), dict):
        vision = raw["vision_config"]
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise CheckpointError(f"{source}: vision tower {vision.get('model_type')!r} is not a CLIP vision model")
        return vision_config_from_hf(vision, source, base)
    raise CheckpointError(f"{source}: model_type {kind!r} is not a CLIP vision model (clip, clip_vision_model, llava)")


@dataclass(frozen=True)
class VisionTower:
    """A ViT-family tower's name table, the prefixes checkpoints hold it under, and what a whole
    two-tower model holds beside it (under "vision_model."): CLIP's and SigLIP's records."""

    name: str
    layouts: tuple[str, ...]
    table: Table
    model_extras: Table

    def prefix_of(self, names) -> str | None:
        """Which of the layouts these tensor names hold the tower under (the first that fits)."""
        return next((p for p in self.layouts if any(n.startswith(p + "encoder.layers.") for n in names)), None)

    def table_under(self, prefix: str, target_prefix: str) -> Table:
        table = self.table.prefixed(prefix, target_prefix)
        return table + self.model_extras if prefix == "vision_model." else table

    def table_for(self, names, source: str) -> Table:
        """The table under the prefix these tensor names use; a CheckpointError naming source if none fits."""
        prefix = self.prefix_of(names)
        if prefix is None:
            sample = ", ".join(sorted(names)[:3])
            raise CheckpointError(f"{source}: no {self.name} vision tower found (expected encoder.layers.* under "
                                  f"one of {self.layouts}; found {sample}...)")
        return self.table_under(prefix, "")

    def load(self, vit, folder: str, strict: bool = True) -> list[str]:
        """Load the tower from a local Hugging Face folder into paddle_mm's ViT."""
        tensors = read_tensors(folder)
        where = {k: path for k, (path, _) in tensor_index(folder).items()}
        return load_mapped(vit, tensors, self.table_for(tensors, folder), folder, where, strict)

    def family(self, name: str, config) -> Family:
        """The convert record: the source prefix is the layout; converted names sit under vision_tower."""
        def layout(names, source: str) -> str:
            prefix = self.prefix_of(names)
            if prefix is None:
                raise CheckpointError(f"{source}: no {self.name} vision tower found under {self.layouts}")
            return prefix

        return Family(name, layout=layout, table=lambda raw, lay, source: self.table_under(lay, "vision_tower."),
                      config=config)


CLIP_TOWER = VisionTower("CLIP", LAYOUTS, CLIP_VISION, CLIP_MODEL_EXTRAS)


def load_clip_vision(vit, folder: str, strict: bool = True) -> list[str]:
    """Load a CLIP vision tower from a local Hugging Face folder into paddle_mm's ViT."""
    return CLIP_TOWER.load(vit, folder, strict)


CLIP = CLIP_TOWER.family("clip", config=lambda src: asdict(vision_config_from_folder(src)))
