"""BLIP-2 checkpoints (Hugging Face and PaddleMIX layouts) loaded into a VisionLanguageModel.

A BLIP-2 model is our three slots with config switches: the EVA ViT is `VisionTransformer`
(no pre-norm, patch bias, gelu, post-norm on the last layer, class token kept), the Q-Former
plus `language_projection` is `QFormerProjector`, and the text model is OPT (lm/opt.py: the
Salesforce blip2-opt-* checkpoints) or a PaddleFormers Qwen2/Llama/Qwen3 (weights/llm.py's
tables). The Flan-T5 BLIP-2s have an encoder-decoder text model, which paddle_mm does not
have: they are refused by name. Each layout is one explicit name table
(weights/mapping.py) plus two reshapes a rename cannot do, undone again for export:
the ViT's fused `qkv` is split into its q, k and v thirds (named `...qkv.weight[q]` etc.),
and the leading size-1 axes of the class and position embeddings are dropped.

    load_blip2(folder)                                   Hugging Face Blip2ForConditionalGeneration
    load_blip2(folder, layout="paddlemix", image_token_id=...)   PaddleMIX blip2 (safetensors)
    load_blip2(..., weights_format="pdparams")           model_state.pdparams, a pickle: only when asked

The transformers 4.57 and 5.x saves of a BLIP-2 with OPT hold the same tensor names (with
tied embeddings, no language_model.lm_head.weight); 5.x also writes the OPT defaults
tie_word_embeddings, bos/eos/pad ids into text_config and drops the Q-Former's
position_embedding_type, which reading here does not depend on.

Feeding images: transformers (4.57 checked) expands `num_query_tokens` image tokens in the prompt
(`image_token_index`) and writes the projected queries there, as paddle_mm does. PaddleMIX prepends the queries to the
prompt embeddings instead; with its weights, start the prompt with the image tokens to match.

Also here: the transformers Blip2Config of a model built here (what export writes) and the
blip2 record of `paddle-mm convert` (Hugging Face layout; PaddleMIX's is paddlemix.py's command).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from paddle_mm.config import LMConfig, ModelConfig, ProjectorConfig, QFormerConfig, VisionConfig
from paddle_mm.errors import CheckpointError
from paddle_mm.weights.clip import HF_VIT_NORMS_AND_MLP
from paddle_mm.weights.hf import read_config, tensor_index
from paddle_mm.weights.llm import causal_lm_table, hf_text_config, nested_lm_config
from paddle_mm.weights.mapping import Family, Rule, Table, load_mapped, matches, refuse_inexpressible
from paddle_mm.weights.paddlemix_files import read_paddlemix_tensors

QKV = ("q", "k", "v")


# ---- Hugging Face layout -----------------------------------------------------------------------
# Relative to Blip2VisionModel ("vision_model."); its layer norms and MLP are named as CLIP's.
HF_VISION = Table("blip2-vision", (
    Rule("embeddings.class_embedding", "class_embedding"),
    Rule("embeddings.position_embedding", "position_embedding"),
    Rule("embeddings.patch_embedding.weight", "patch_embedding.weight"),
    Rule("embeddings.patch_embedding.bias", "patch_embedding.bias"),
    Rule("encoder.layers.{i}.self_attn.qkv.weight[q]", "blocks.{i}.attn.q_proj.weight", transpose=True),
    Rule("encoder.layers.{i}.self_attn.qkv.weight[k]", "blocks.{i}.attn.k_proj.weight", transpose=True),
    Rule("encoder.layers.{i}.self_attn.qkv.weight[v]", "blocks.{i}.attn.v_proj.weight", transpose=True),
    Rule("encoder.layers.{i}.self_attn.qkv.bias[q]", "blocks.{i}.attn.q_proj.bias"),
    Rule("encoder.layers.{i}.self_attn.qkv.bias[k]", "blocks.{i}.attn.k_proj.bias"),
    Rule("encoder.layers.{i}.self_attn.qkv.bias[v]", "blocks.{i}.attn.v_proj.bias"),
    Rule("encoder.layers.{i}.self_attn.projection.weight", "blocks.{i}.attn.out_proj.weight", transpose=True),
    Rule("encoder.layers.{i}.self_attn.projection.bias", "blocks.{i}.attn.out_proj.bias"),
) + HF_VIT_NORMS_AND_MLP)


def _qformer_layer(prefix: str, core: str, transpose: bool) -> tuple[Rule, ...]:
    """One Q-Former layer's rules; HF and PaddleMIX differ only in the attention core's name
    ("attention" / "self") and the Linear layout. The cross-attention rules match the layers that have it."""
    rules = []
    for theirs, ours in (("attention", "attn"), ("crossattention", "cross_attn")):
        src, dst = f"{prefix}{{i}}.{theirs}.", f"layers.{{i}}.{ours}"
        for proj, our_proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            rules += [Rule(f"{src}{core}.{proj}.weight", f"{dst}.{our_proj}.weight", transpose),
                      Rule(f"{src}{core}.{proj}.bias", f"{dst}.{our_proj}.bias")]
        rules += [Rule(src + "output.dense.weight", dst + ".out_proj.weight", transpose),
                  Rule(src + "output.dense.bias", dst + ".out_proj.bias"),
                  Rule(src + "output.LayerNorm.weight", dst + "_norm.weight"),
                  Rule(src + "output.LayerNorm.bias", dst + "_norm.bias")]
    src, dst = prefix + "{i}.", "layers.{i}."
    return tuple(rules) + (
        Rule(src + "intermediate_query.dense.weight", dst + "mlp.fc1.weight", transpose),
        Rule(src + "intermediate_query.dense.bias", dst + "mlp.fc1.bias"),
        Rule(src + "output_query.dense.weight", dst + "mlp.fc2.weight", transpose),
        Rule(src + "output_query.dense.bias", dst + "mlp.fc2.bias"),
        Rule(src + "output_query.LayerNorm.weight", dst + "mlp_norm.weight"),
        Rule(src + "output_query.LayerNorm.bias", dst + "mlp_norm.bias"),
    )


# Relative to the checkpoint root on the source side, to QFormerProjector on ours.
HF_QFORMER = Table("blip2-qformer", (
    Rule("query_tokens", "query_tokens"),
    Rule("qformer.layernorm.weight", "query_norm.weight"),
    Rule("qformer.layernorm.bias", "query_norm.bias"),
    Rule("language_projection.weight", "proj.weight", transpose=True),
    Rule("language_projection.bias", "proj.bias"),
) + _qformer_layer("qformer.encoder.layer.", "attention", transpose=True))


# ---- PaddleMIX layout --------------------------------------------------------------------------
# paddlemix/models/blip2: `visual_encoder` (eva_vit.VisionTransformer), `Qformer` (Qformer.BertLMHeadModel
# holding ln_vision, query_tokens, bert, language_projection) and `language_model` (PaddleNLP, e.g.
# LlamaForCausalLM: `llama.*`, lm_head [hidden, vocab]). Paddle Linear weights are [in, out] throughout.
PADDLEMIX_VISION = Table("paddlemix-eva-vit", (
    Rule("visual_encoder.cls_token", "class_embedding"),
    Rule("visual_encoder.pos_embed", "position_embedding"),
    Rule("visual_encoder.patch_embed.proj.weight", "patch_embedding.weight"),
    Rule("visual_encoder.patch_embed.proj.bias", "patch_embedding.bias"),
    Rule("visual_encoder.blocks.{i}.norm1.weight", "blocks.{i}.norm1.weight"),
    Rule("visual_encoder.blocks.{i}.norm1.bias", "blocks.{i}.norm1.bias"),
    Rule("visual_encoder.blocks.{i}.attn.qkv.weight[q]", "blocks.{i}.attn.q_proj.weight"),
    Rule("visual_encoder.blocks.{i}.attn.qkv.weight[k]", "blocks.{i}.attn.k_proj.weight"),
    Rule("visual_encoder.blocks.{i}.attn.qkv.weight[v]", "blocks.{i}.attn.v_proj.weight"),
    Rule("visual_encoder.blocks.{i}.attn.qkv.bias[q]", "blocks.{i}.attn.q_proj.bias"),
    Rule("visual_encoder.blocks.{i}.attn.qkv.bias[k]", "blocks.{i}.attn.k_proj.bias"),
    Rule("visual_encoder.blocks.{i}.attn.qkv.bias[v]", "blocks.{i}.attn.v_proj.bias"),
    Rule("visual_encoder.blocks.{i}.attn.proj.weight", "blocks.{i}.attn.out_proj.weight"),
    Rule("visual_encoder.blocks.{i}.attn.proj.bias", "blocks.{i}.attn.out_proj.bias"),
    Rule("visual_encoder.blocks.{i}.norm2.weight", "blocks.{i}.norm2.weight"),
    Rule("visual_encoder.blocks.{i}.norm2.bias", "blocks.{i}.norm2.bias"),
    Rule("visual_encoder.blocks.{i}.mlp.fc1.weight", "blocks.{i}.mlp.fc1.weight"),
    Rule("visual_encoder.blocks.{i}.mlp.fc1.bias", "blocks.{i}.mlp.fc1.bias"),
    Rule("visual_encoder.blocks.{i}.mlp.fc2.weight", "blocks.{i}.mlp.fc2.weight"),
    Rule("visual_encoder.blocks.{i}.mlp.fc2.bias", "blocks.{i}.mlp.fc2.bias"),
    # EVA's ViT has no final norm; the Q-Former's ln_vision normalizes its output.
    Rule("Qformer.ln_vision.weight", "post_norm.weight"),
    Rule("Qformer.ln_vision.bias", "post_norm.bias"),
))

PADDLEMIX_QFORMER = Table("paddlemix-qformer", (
    Rule("Qformer.query_tokens", "query_tokens"),
    Rule("Qformer.bert.embeddings.LayerNorm.weight", "query_norm.weight"),
    Rule("Qformer.bert.embeddings.LayerNorm.bias", "query_norm.bias"),
    Rule("Qformer.language_projection.weight", "proj.weight"),
    Rule("Qformer.language_projection.bias", "proj.bias"),
) + _qformer_layer("Qformer.bert.encoder.layer.", "self", transpose=False), ignore=(
    # Stage-1 parts (the Q-Former's text branch, its MLM head and the ITC/ITM heads) that a
    # PaddleMIX checkpoint may still hold; the generation model has no use for them.
    "Qformer.bert.embeddings.word_embeddings.weight",
    "Qformer.bert.embeddings.position_embeddings.weight",
    "Qformer.bert.embeddings.position_ids",
    "Qformer.bert.encoder.layer.{i}.intermediate.dense.weight",
    "Qformer.bert.encoder.layer.{i}.intermediate.dense.bias",
    "Qformer.bert.encoder.layer.{i}.output.dense.weight",
    "Qformer.bert.encoder.layer.{i}.output.dense.bias",
    "Qformer.bert.encoder.layer.{i}.output.LayerNorm.weight",
    "Qformer.bert.encoder.layer.{i}.output.LayerNorm.bias",
    "Qformer.cls.predictions.transform.dense.weight",
    "Qformer.cls.predictions.transform.dense.bias",
    "Qformer.cls.predictions.transform.LayerNorm.weight",
    "Qformer.cls.predictions.transform.LayerNorm.bias",
    "Qformer.cls.predictions.decoder.weight",
    "Qformer.cls.predictions.decoder.bias",
    "Qformer.cls.predictions.bias",
    "Qformer.vision_proj.weight",
    "Qformer.vision_proj.bias",
    "Qformer.text_proj.weight",
    "Qformer.text_proj.bias",
    "Qformer.itm_head.weight",
    "Qformer.itm_head.bias",
    "temp",
))


@dataclass(frozen=True)
class Layout:
    vision: Table  # source names from the checkpoint root, ours relative to the ViT
    qformer: Table  # ours relative to the Q-Former projector
    fused_qkv: tuple[tuple[str, int], ...]  # (fused q|k|v tensor, the axis its thirds are stacked on)
    batch_dims: tuple[tuple[str, int], ...]  # (tensor, leading size-1 axes paddle_mm does not keep)
    lm_decoder: str  # source prefix of the LM decoder; {family} is the LM family
    paddle_layout: bool  # Linear weights [in, out] (PaddleNLP LM head [hidden, vocab])


LAYOUTS = {
    "hf": Layout(
        HF_VISION.prefixed("vision_model.", ""), HF_QFORMER,
        # qkv.weight is [3D, D] (rows q, then k, then v), as torch stores a Linear.
        (("vision_model.encoder.layers.{i}.self_attn.qkv.weight", 0),
         ("vision_model.encoder.layers.{i}.self_attn.qkv.bias", 0)),
        (("vision_model.embeddings.class_embedding", 2), ("vision_model.embeddings.position_embedding", 1)),
        "language_model.model.", paddle_layout=False),
    "paddlemix": Layout(
        PADDLEMIX_VISION, PADDLEMIX_QFORMER,
        # qkv.weight is [D, 3D]: columns q, then k, then v.
        (("visual_encoder.blocks.{i}.attn.qkv.weight", 1), ("visual_encoder.blocks.{i}.attn.qkv.bias", 0)),
        (("visual_encoder.cls_token", 2), ("visual_encoder.pos_embed", 1)),
        "language_model.{family}.", paddle_layout=True),
}


def _layout(layout: str, source: str) -> Layout:
    if layout not in LAYOUTS:
        raise CheckpointError(f"{source}: layout {layout!r} is not one of {sorted(LAYOUTS)}")
    return LAYOUTS[layout]


def blip2_table(layout: str, lm: LMConfig) -> Table:
    """Source names of a BLIP-2 checkpoint in `layout` -> VisionLanguageModel names."""
    spec = _layout(layout, "BLIP-2")
    if spec.paddle_layout and lm.family == "opt":
        raise CheckpointError("BLIP-2 with an OPT text model: only the Hugging Face layout is read (not PaddleMIX's)")
    return (spec.vision.prefixed("", "vision_tower.") + spec.qformer.prefixed("", "multi_modal_projector.")
            + causal_lm_table(lm.family, lm.tie_word_embeddings, spec.lm_decoder.format(family=lm.family),
                              "language_model.", "language_model.", paddle_layout=spec.paddle_layout))


# ---- the reshapes around the table -------------------------------------------------------------
def _fused_axis(spec: Layout, name: str) -> int | None:
    return next((axis for pattern, axis in spec.fused_qkv if matches(pattern, name)), None)


def split_for_mapping(tensors: dict[str, np.ndarray], layout: str, qkv_bias: bool, source: str,
                      where: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """The checkpoint's tensors with the fused qkv split in thirds and batch axes dropped.

    Without qkv biases (qkv_bias false) they are zeros, which is what the checkpoint computes.
    `where` (tensor -> file), if given, gets the names of the thirds too.
    """
    spec = _layout(layout, source)
    out = dict(tensors)
    for name, lead in spec.batch_dims:
        if name in out:
            array = out[name]
            if array.ndim <= lead or any(n != 1 for n in array.shape[:lead]):
                raise CheckpointError(f"{source}: {name} has shape {list(array.shape)}, expected {lead} leading "
                                      "axes of size 1")
            out[name] = array.reshape(array.shape[lead:])
    for name in sorted(tensors):
        axis = _fused_axis(spec, name)
        if axis is None:
            continue
        array = out.pop(name)
        if array.ndim <= axis or array.shape[axis] % 3:
            raise CheckpointError(f"{(where or {}).get(name, source)}: {name} has shape {list(array.shape)}, which does not split into "
                                  f"q, k and v along axis {axis}")
        for part, piece in zip(QKV, np.split(array, 3, axis=axis)):
            out[f"{name}[{part}]"] = np.ascontiguousarray(piece)
            if where is not None and name in where:
                where[f"{name}[{part}]"] = where[name]
        bias = name[: -len("weight")] + "bias"
        if not qkv_bias and name.endswith(".weight") and bias not in tensors and _fused_axis(spec, bias) is not None:
            for part in QKV:
                out[f"{bias}[{part}]"] = np.zeros(array.shape[axis] // 3, array.dtype)
    return out


def join_for_export(tensors: dict[str, np.ndarray], layout: str, qkv_bias: bool, source: str) -> dict[str, np.ndarray]:
    """The inverse of split_for_mapping: the thirds fused again, batch axes restored."""
    spec = _layout(layout, source)
    out = dict(tensors)
    for name in sorted(tensors):
        if not name.endswith("[q]"):
            continue
        fused = name[: -len("[q]")]
        axis = _fused_axis(spec, fused)
        parts = [out.pop(f"{fused}[{p}]") for p in QKV]
        if not qkv_bias and fused.endswith(".bias"):
            if any(np.any(p) for p in parts):
                raise CheckpointError(f"{source}: {fused} is not zero, but the checkpoint's config has qkv_bias "
                                      "false; set it true in the source config to keep the biases")
            continue
        out[fused] = np.concatenate(parts, axis=axis)
    for name, lead in spec.batch_dims:
        if name in out:
            out[name] = out[name].reshape((1,) * lead + out[name].shape)
    return out


# ---- configs -----------------------------------------------------------------------------------
# Blip2VisionConfig / Blip2QFormerConfig defaults (transformers 4.57), for keys a config.json omits.
_HF_VISION_DEFAULTS = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True)
_HF_QFORMER_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                            hidden_act="gelu", layer_norm_eps=1e-12, cross_attention_frequency=2,
                            position_embedding_type="absolute")


def blip2_vision_config(**fields) -> VisionConfig:
    """The ViT switches that make our VisionTransformer BLIP-2's EVA ViT."""
    return VisionConfig(pre_norm=False, post_norm=True, feature_layer=-1, drop_cls_token=False, patch_bias=True,
                        **fields)


def _check_gelu(act: str, where: str, source: str) -> None:
    if act != "gelu":
        raise CheckpointError(f"{source}: {where} hidden_act {act!r} is not supported (BLIP-2 uses gelu)")


def _text_model(text: dict, source: str) -> tuple[LMConfig, dict[str, int]]:
    """Our LMConfig and the bos/eos/pad ids of a BLIP-2 text_config."""
    if "model_type" not in text:
        raise CheckpointError(f"{source}: text_config has no model_type")
    if text["model_type"] == "t5":  # Salesforce/blip2-flan-t5-*
        raise CheckpointError(f"{source}: text model type 't5' (a Flan-T5 BLIP-2) is an encoder-decoder, which is not "
                              "supported: paddle_mm's language models are decoder-only (OPT, Qwen2, Llama, Qwen3)")
    lm = nested_lm_config(text, source)
    ids = {name: text[f"{name}_token_id"] for name in ("bos", "eos", "pad")
           if isinstance(text.get(f"{name}_token_id"), int)}
    return lm, ids


def model_config_from_hf(raw: dict, source: str, image_token_id: int | None = None) -> tuple[ModelConfig, dict, bool]:
    """(ModelConfig, special ids, vision qkv_bias) from a Blip2ForConditionalGeneration config.json."""
    if raw.get("model_type") != "blip-2":
        raise CheckpointError(f"{source}: model_type {raw.get('model_type')!r} is not 'blip-2'")
    v = {**_HF_VISION_DEFAULTS, **raw.get("vision_config", {})}
    q = {**_HF_QFORMER_DEFAULTS, **raw.get("qformer_config", {})}
    _check_gelu(v["hidden_act"], "vision_config", source)
    _check_gelu(q["hidden_act"], "qformer_config", source)
    if q["position_embedding_type"] != "absolute":
        raise CheckpointError(f"{source}: qformer position_embedding_type {q['position_embedding_type']!r} "
                              "is not supported (only 'absolute', which adds nothing to the queries)")
    vision = blip2_vision_config(
        image_size=v["image_size"], patch_size=v["patch_size"], hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"], layer_norm_eps=float(v["layer_norm_eps"]), hidden_act="gelu")
    qformer = QFormerConfig(
        num_queries=raw.get("num_query_tokens", 32), hidden_size=q["hidden_size"], num_layers=q["num_hidden_layers"],
        num_heads=q["num_attention_heads"], intermediate_size=q["intermediate_size"],
        cross_attention_every=q["cross_attention_frequency"], layer_norm_eps=float(q["layer_norm_eps"]))
    lm, ids = _text_model(raw.get("text_config", {}), source)
    if image_token_id is None:
        image_token_id = raw.get("image_token_index", raw.get("image_token_id"))
    if image_token_id is None:
        raise CheckpointError(f"{source}: no image_token_index in the config (a checkpoint from before "
                              "transformers 4.47); pass image_token_id, the id of the image token in its tokenizer")
    cfg = ModelConfig(vision=vision, projector=ProjectorConfig(type="qformer", qformer=qformer), lm=lm,
                      image_token_id=int(image_token_id))
    return cfg, ids, bool(v["qkv_bias"])


def model_config_from_paddlemix(raw: dict, folder: str, tensors: dict, image_token_id: int | None
                                ) -> tuple[ModelConfig, dict, bool]:
    source = os.path.join(folder, "config.json")
    v, q = raw.get("vision_config", {}), raw.get("qformer_config", {})

    def need(section: dict, key: str, name: str):
        if key not in section:
            raise CheckpointError(f"{source}: {name} has no {key!r}")
        return section[key]

    embed_dim = need(v, "embed_dim", "vision_config")
    vision = blip2_vision_config(
        image_size=v.get("img_size", 224), patch_size=v.get("patch_size", 14), hidden_size=embed_dim,
        intermediate_size=int(embed_dim * need(v, "mlp_ratio", "vision_config")), num_layers=need(v, "depth", "vision_config"),
        num_heads=need(v, "num_heads", "vision_config"), layer_norm_eps=float(v.get("epsilon", 1e-6)), hidden_act="gelu")
    if "Qformer.query_tokens" not in tensors:
        raise CheckpointError(f"{folder}: no tensor Qformer.query_tokens (not a PaddleMIX BLIP-2 checkpoint?)")
    qformer = QFormerConfig(
        num_queries=int(tensors["Qformer.query_tokens"].shape[1]), hidden_size=q.get("hidden_size", 768),
        num_layers=q.get("num_hidden_layers", 12), num_heads=q.get("num_attention_heads", 12),
        intermediate_size=q.get("intermediate_size", 3072),
        cross_attention_every=q.get("cross_attention_freq", q.get("cross_attention_frequency", 2)),
        layer_norm_eps=float(q.get("layer_norm_eps", 1e-12)))
    _check_gelu(q.get("hidden_act", "gelu"), "qformer_config", source)
    text = raw.get("text_config")
    if isinstance(text, str):  # PaddleMIX names the LM by a path: a local folder holding its config.json
        text_folder = text if os.path.isabs(text) else os.path.join(folder, text)
        text = read_config(text_folder)
    if not isinstance(text, dict):
        raise CheckpointError(f"{source}: text_config must be a dict or the path of a local LM folder")
    lm, ids = _text_model(text, source)
    if image_token_id is None:
        raise CheckpointError(f"{source}: PaddleMIX configs name no image token; pass image_token_id")
    cfg = ModelConfig(vision=vision, projector=ProjectorConfig(type="qformer", qformer=qformer), lm=lm,
                      image_token_id=int(image_token_id))
    return cfg, ids, bool(v.get("qkv_bias", True))


def read_blip2(folder: str, layout: str = "hf", weights_format: str = "safetensors",
               image_token_id: int | None = None) -> tuple[ModelConfig, dict, dict[str, np.ndarray], dict[str, str]]:
    """(config, special ids, tensors split for the table, tensor -> file) of a BLIP-2 folder."""
    _layout(layout, folder)
    if weights_format not in ("safetensors", "pdparams"):
        raise CheckpointError(f"{folder}: weights_format {weights_format!r} is not 'safetensors' or 'pdparams'")
    raw = read_config(folder)
    pickle = weights_format == "pdparams"
    tensors = read_paddlemix_tensors(folder, allow_pickle=pickle,
                                     ask="weights_format='pdparams'; paddle-mm convert --pdparams")
    where = {} if pickle else {k: path for k, (path, _) in tensor_index(folder).items()}
    if layout == "hf":
        cfg, ids, qkv_bias = model_config_from_hf(raw, os.path.join(folder, "config.json"), image_token_id)
    else:
        cfg, ids, qkv_bias = model_config_from_paddlemix(raw, folder, tensors, image_token_id)
    return cfg, ids, split_for_mapping(tensors, layout, qkv_bias, folder, where), where


def load_blip2(folder: str, layout: str = "hf", weights_format: str = "safetensors",
               image_token_id: int | None = None):
    """A VisionLanguageModel (eval mode) with the weights of a local BLIP-2 checkpoint folder."""
    from paddle_mm.model import VisionLanguageModel

    cfg, ids, tensors, where = read_blip2(folder, layout, weights_format, image_token_id)
    model = VisionLanguageModel(cfg, ids)
    load_mapped(model, tensors, blip2_table(layout, cfg.lm), folder, where)
    model.eval()
    return model


def hf_blip2_config(cfg: ModelConfig, qkv_bias: bool, source: str) -> dict:
    """A transformers Blip2Config dict for a model of ours; refuses what BLIP-2 cannot express."""
    v, q = cfg.vision, cfg.projector.qformer
    refuse_inexpressible(source, "BLIP-2", (
        (cfg.projector.type != "qformer", f"projector {cfg.projector.type!r} (BLIP-2 has a Q-Former)"),
        (v.pre_norm or not v.post_norm or not v.patch_bias or v.drop_cls_token or v.feature_layer != -1,
         "a vision tower other than BLIP-2's EVA ViT"),
        (v.hidden_act != "gelu", f"vision hidden_act {v.hidden_act!r}"),
        (q.cross_attention_locality > 0, "qformer.cross_attention_locality (BLIP-2's queries have no grid)"),
    ))
    return {
        "architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2",
        "num_query_tokens": q.num_queries, "image_token_index": cfg.image_token_id,
        "vision_config": {
            "model_type": "blip_2_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps, "hidden_act": "gelu", "qkv_bias": qkv_bias,
        },
        "qformer_config": {
            "model_type": "blip_2_qformer", "hidden_size": q.hidden_size, "num_hidden_layers": q.num_layers,
            "num_attention_heads": q.num_heads, "intermediate_size": q.intermediate_size,
            "cross_attention_frequency": q.cross_attention_every, "layer_norm_eps": q.layer_norm_eps,
            "encoder_hidden_size": v.hidden_size, "hidden_act": "gelu", "position_embedding_type": "absolute",
        },
        "text_config": hf_text_config(cfg.lm),
    }


# ---- the convert record (Hugging Face layout) --------------------------------------------------
def _convert_table(raw: dict, layout: str, source: str) -> Table:
    return blip2_table(layout, model_config_from_hf(raw, f"{source}/config.json")[0].lm)


def _convert_split(raw: dict, layout: str, tensors: dict, source: str) -> dict:
    """What a rename table cannot do, before mapping: the fused qkv split in thirds."""
    return split_for_mapping(tensors, layout, model_config_from_hf(raw, source)[2], source)


def _convert_join(raw: dict, layout: str, tensors: dict, source: str) -> dict:
    """The inverse of _convert_split, after mapping back for export."""
    return join_for_export(tensors, layout, model_config_from_hf(raw, source)[2], source)


def _convert_config(src: str) -> dict:
    return asdict(model_config_from_hf(read_config(src), f"{src}/config.json")[0])


BLIP2 = Family("blip2", layout=lambda names, source: "hf", table=_convert_table, config=_convert_config,
               split=_convert_split, join=_convert_join, makes_run_folder=True)
