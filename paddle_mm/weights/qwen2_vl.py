"""Qwen2-VL and Qwen2.5-VL (transformers' Qwen2VLForConditionalGeneration and
Qwen2_5_VLForConditionalGeneration) -> paddle_mm's Qwen2VLModel (model.py).

Layouts: what save_pretrained writes, in 4.57 and 5.x alike, and what the released
checkpoints hold (visual.*, model.* for the decoder, lm_head.*); and the names the model has in
memory in 4.5x/5.x (model.visual.*, model.language_model.*, lm_head.*), which some tools save.
config.json: 4.57 and 5.x nest the LM under text_config; released Qwen2-VL folders have it flat
at the top. mrope_section is in rope_scaling (4.57, flat) or rope_parameters (5.x). The
vision_config names the vision width embed_dim (Qwen2-VL; hidden_size is then the merger's
output) or hidden_size (Qwen2.5-VL, with out_hidden_size).
"""
from __future__ import annotations

from dataclasses import asdict, replace

from paddle_mm.config import LMConfig, Qwen2VLModelConfig, Qwen2VLVisionConfig
from paddle_mm.errors import CheckpointError
from paddle_mm.weights.hf import read_config, read_tensors, tensor_index
from paddle_mm.weights.llm import LM_HEAD, TIED_LM_HEAD, decoder_table, lm_config_from_hf
from paddle_mm.weights.mapping import Family, Rule, Table, load_mapped

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _linear(source: str, target: str) -> tuple[Rule, Rule]:
    return Rule(source + ".weight", target + ".weight", transpose=True), Rule(source + ".bias", target + ".bias")


def _norm(name: str) -> tuple[Rule, Rule]:
    return Rule(name + ".weight", name + ".weight"), Rule(name + ".bias", name + ".bias")


# Relative to the encoder (visual.*), both variants: LayerNorm biases and fc1/fc2 are Qwen2-VL's,
# gate/up/down Qwen2.5-VL's; a rule whose tensor a checkpoint lacks is simply not used.
VISION = Table("qwen2-vl-vision", (
    Rule("patch_embed.proj.weight", "patch_embed.proj.weight"),
    *_norm("blocks.{i}.norm1"), *_norm("blocks.{i}.norm2"),
    *_linear("blocks.{i}.attn.qkv", "blocks.{i}.attn.qkv"), *_linear("blocks.{i}.attn.proj", "blocks.{i}.attn.proj"),
    *_linear("blocks.{i}.mlp.fc1", "blocks.{i}.mlp.fc1"), *_linear("blocks.{i}.mlp.fc2", "blocks.{i}.mlp.fc2"),
    *_linear("blocks.{i}.mlp.gate_proj", "blocks.{i}.mlp.gate_proj"),
    *_linear("blocks.{i}.mlp.up_proj", "blocks.{i}.mlp.up_proj"),
    *_linear("blocks.{i}.mlp.down_proj", "blocks.{i}.mlp.down_proj"),
))
MERGER = Table("qwen2-vl-merger", (*_norm("ln_q"), *_linear("mlp.0", "fc1"), *_linear("mlp.2", "fc2")))
# Qwen3-VL's encoder (relative to visual.*): a patch bias, learned positions, linear_fc1/2 MLPs,
# and its mergers (the main one and the DeepStack ones) named norm / linear_fc1 / linear_fc2.
VISION3 = Table("qwen3-vl-vision", (
    Rule("patch_embed.proj.weight", "patch_embed.proj.weight"), Rule("patch_embed.proj.bias", "patch_embed.proj.bias"),
    Rule("pos_embed.weight", "pos_embed.weight"),
    *_norm("blocks.{i}.norm1"), *_norm("blocks.{i}.norm2"),
    *_linear("blocks.{i}.attn.qkv", "blocks.{i}.attn.qkv"), *_linear("blocks.{i}.attn.proj", "blocks.{i}.attn.proj"),
    *_linear("blocks.{i}.mlp.linear_fc1", "blocks.{i}.mlp.fc1"),
    *_linear("blocks.{i}.mlp.linear_fc2", "blocks.{i}.mlp.fc2"),
))

# layout -> source prefix of (vision encoder, LM decoder, LM head)
LAYOUTS = {
    "saved": ("visual.", "model.", ""),
    "in-memory": ("model.visual.", "model.language_model.", ""),
}


def _merger3(source: str, target: str) -> Table:
    """A Qwen3-VL merger under the source prefix, as a PatchMerger under the target one."""
    norm = (Rule(source + "norm.weight", target + "ln_q.weight"), Rule(source + "norm.bias", target + "ln_q.bias"))
    return Table("qwen3-vl-merger", norm + _linear(source + "linear_fc1", target + "fc1")
                 + _linear(source + "linear_fc2", target + "fc2"))


def qwen2_vl_table(layout: str, tie_word_embeddings: bool, variant: str = "qwen2_vl") -> Table:
    vision, decoder, head = LAYOUTS[layout]
    if variant == "qwen3_vl":
        parts = (VISION3.prefixed(vision, "vision_tower.")
                 + _merger3(vision + "merger.", "multi_modal_projector.")
                 + _merger3(vision + "deepstack_merger_list.{k}.", "deepstack_projectors.{k}.")
                 + decoder_table("qwen3").prefixed(decoder, "language_model.model."))
    else:
        parts = (VISION.prefixed(vision, "vision_tower.")
                 + MERGER.prefixed(vision + "merger.", "multi_modal_projector.")
                 + decoder_table("qwen2").prefixed(decoder, "language_model.model."))
    return parts + (TIED_LM_HEAD if tie_word_embeddings else LM_HEAD).prefixed(head, "language_model.")


def layout_of(names, source: str) -> str:
    names = list(names)
    for layout in ("in-memory", "saved"):  # "model." prefixes both: the longer one first
        vision, decoder, _ = LAYOUTS[layout]
        if any(n.startswith(decoder + "layers.") for n in names) and any(n.startswith(vision + "blocks.") for n in names):
            return layout
    raise CheckpointError(f"{source}: not a Qwen2-VL checkpoint (no decoder and vision blocks under "
                          f"{' or '.join(d + ' and ' + v for v, d, _ in LAYOUTS.values())})")


def _mrope_section(text: dict, source: str) -> list[int]:
    for key in ("rope_parameters", "rope_scaling"):
        value = text.get(key)
        if isinstance(value, dict) and "mrope_section" in value:
            if value.get("rope_type", "default") not in ("default", "mrope"):
                raise CheckpointError(f"{source}: {key} rope_type {value.get('rope_type')!r} is not supported "
                                      "(only the default M-RoPE)")
            return [int(v) for v in value["mrope_section"]]
    raise CheckpointError(f"{source}: no mrope_section in rope_scaling or rope_parameters")


def _lm_config(raw: dict, source: str) -> LMConfig:
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    section = _mrope_section(text, source)
    qwen3 = raw.get("model_type") == "qwen3_vl"
    if qwen3:
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if not rope.get("mrope_interleaved", False):
            raise CheckpointError(f"{source}: Qwen3-VL without mrope_interleaved is not supported")
        if text.get("head_dim", text["hidden_size"] // text["num_attention_heads"]) != \
                text["hidden_size"] // text["num_attention_heads"]:
            raise CheckpointError(f"{source}: head_dim={text['head_dim']} is not supported (only hidden_size / "
                                  "num_attention_heads)")
    plain = {k: v for k, v in text.items()
             if k not in ("rope_scaling", "rope_parameters", "model_type", "head_dim", "attention_bias")}
    params = text.get("rope_parameters") if isinstance(text.get("rope_parameters"), dict) else {}
    plain["rope_theta"] = params.get("rope_theta", text.get("rope_theta", 1000000.0))
    plain.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
    # the decoder is Qwen2's (biases on q, k, v) or Qwen3's (per-head norms): its reader checks the
    # fields, the family is ours
    lm = lm_config_from_hf({**plain, "model_type": "qwen3" if qwen3 else "qwen2"}, "", source)
    return replace(lm, family="qwen3_vl" if qwen3 else "qwen2_vl", mrope_section=section)


def _vision_config(raw: dict, variant: str, lm_hidden: int, source: str) -> Qwen2VLVisionConfig:
    v = raw.get("vision_config")
    if not isinstance(v, dict):
        raise CheckpointError(f"{source}: no vision_config")
    try:
        if variant == "qwen3_vl":
            return Qwen2VLVisionConfig(
                variant=variant, depth=int(v.get("depth", 27)), hidden_size=int(v.get("hidden_size", 1152)),
                intermediate_size=int(v.get("intermediate_size", 4304)), num_heads=int(v.get("num_heads", 16)),
                in_channels=int(v.get("in_channels", 3)), patch_size=int(v.get("patch_size", 16)),
                temporal_patch_size=int(v.get("temporal_patch_size", 2)),
                spatial_merge_size=int(v.get("spatial_merge_size", 2)),
                hidden_act=str(v.get("hidden_act", "gelu_pytorch_tanh")),
                out_hidden_size=int(v.get("out_hidden_size", lm_hidden)),
                num_position_embeddings=int(v.get("num_position_embeddings", 2304)),
                deepstack_visual_indexes=[int(i) for i in v.get("deepstack_visual_indexes", [8, 16, 24])])
        if variant == "qwen2_vl":
            width = int(v.get("embed_dim", 1280))
            return Qwen2VLVisionConfig(
                variant=variant, depth=int(v.get("depth", 32)), hidden_size=width,
                intermediate_size=int(width * v.get("mlp_ratio", 4)), num_heads=int(v.get("num_heads", 16)),
                in_channels=int(v.get("in_channels", v.get("in_chans", 3))), patch_size=int(v.get("patch_size", 14)),
                temporal_patch_size=int(v.get("temporal_patch_size", 2)),
                spatial_merge_size=int(v.get("spatial_merge_size", 2)), hidden_act=str(v.get("hidden_act", "quick_gelu")),
                out_hidden_size=int(v.get("hidden_size", lm_hidden)))
        return Qwen2VLVisionConfig(
            variant=variant, depth=int(v.get("depth", 32)), hidden_size=int(v.get("hidden_size", 1280)),
            intermediate_size=int(v.get("intermediate_size", 3420)), num_heads=int(v.get("num_heads", 16)),
            in_channels=int(v.get("in_channels", v.get("in_chans", 3))), patch_size=int(v.get("patch_size", 14)),
            temporal_patch_size=int(v.get("temporal_patch_size", 2)),
            spatial_merge_size=int(v.get("spatial_merge_size", 2)), hidden_act=str(v.get("hidden_act", "silu")),
            out_hidden_size=int(v.get("out_hidden_size", lm_hidden)), window_size=int(v.get("window_size", 112)),
            fullatt_block_indexes=[int(i) for i in v.get("fullatt_block_indexes", [7, 15, 23, 31])],
            tokens_per_second=float(v.get("tokens_per_second", 4)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot read vision_config ({e})") from None


def qwen2_vl_model_config(folder: str, mrope_advance: str = "max") -> Qwen2VLModelConfig:
    """The model config of a Qwen2-VL / Qwen2.5-VL folder's config.json."""
    raw = read_config(folder)
    source = f"{folder}/config.json"
    variant = raw.get("model_type")
    if variant not in MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {variant!r} is not one of {MODEL_TYPES}")
    lm = _lm_config(raw, source)
    vision = _vision_config(raw, variant, lm.hidden_size, source)
    if vision.out_hidden_size != lm.hidden_size:
        raise CheckpointError(f"{source}: the merger's output {vision.out_hidden_size} is not the LM's hidden size "
                              f"{lm.hidden_size}")
    ids = {k: raw.get(k, (raw.get("text_config") or {}).get(k)) for k in
           ("image_token_id", "video_token_id", "vision_start_token_id")}
    missing = [k for k, v in ids.items() if not isinstance(v, int)]
    if missing:
        raise CheckpointError(f"{source}: no {', '.join(missing)}")
    return Qwen2VLModelConfig(vision=vision, lm=lm, mrope_advance=mrope_advance, path=folder, **ids)


def load_qwen2_vl(model, folder: str) -> list[str]:
    """Load a Qwen2-VL folder (either layout) into a Qwen2VLModel built from its config."""
    tensors = read_tensors(folder)
    table = qwen2_vl_table(layout_of(tensors, folder), model.config.lm.tie_word_embeddings, model.config.vision.variant)
    where = {k: path for k, (path, _) in tensor_index(folder).items()}
    return load_mapped(model, tensors, table, folder, where)


# ---- the convert record ------------------------------------------------------------------------
def _convert_table(raw: dict, layout: str, source: str) -> Table:
    return qwen2_vl_table(layout, _lm_config(raw, f"{source}/config.json").tie_word_embeddings, raw.get("model_type"))


def _convert_config(src: str) -> dict:
    cfg = qwen2_vl_model_config(src)
    return asdict(replace(cfg, path=""))


QWEN2_VL = Family("qwen2-vl", layout=layout_of, table=_convert_table, config=_convert_config)
