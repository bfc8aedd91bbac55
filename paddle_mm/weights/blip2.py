"""BLIP-2 checkpoints (Hugging Face and PaddleMIX layouts) loaded into a VisionLanguageModel.

A BLIP-2 model is our three slots with config switches: the EVA ViT is `VisionTransformer`
(no pre-norm, patch bias, gelu, post-norm on the last layer, class token kept), the Q-Former
plus `language_projection` is `QFormerProjector`, and the text model is a PaddleFormers
Qwen2/Llama. Each layout has one explicit name table below: (source name, our name, how the
array changes). Hugging Face stores Linear weights [out, in], Paddle [in, out].

    load_blip2(folder)                                   Hugging Face Blip2ForConditionalGeneration
    load_blip2(folder, layout="paddlemix", image_token_id=...)   PaddleMIX blip2 (safetensors)
    load_blip2(..., weights_format="pdparams")           model_state.pdparams, a pickle: only when asked

Feeding images: transformers (4.57 checked) expands `num_query_tokens` image tokens in the prompt
(`image_token_index`) and writes the projected queries there, as paddle_mm does. PaddleMIX prepends the queries to the
prompt embeddings instead; with its weights, start the prompt with the image tokens to match.
"""
from __future__ import annotations

import os
import re
from typing import Callable

import numpy as np

from paddle_mm.config import LMConfig, ModelConfig, ProjectorConfig, QFormerConfig, VisionConfig
from paddle_mm.errors import CheckpointError
from paddle_mm.weights.hf import read_config, read_tensors

PDPARAMS_FILE = "model_state.pdparams"

Row = tuple  # (source name or None, our name, transform); None: zeros, the source has no such tensor


# ---- array transforms --------------------------------------------------------------------------
def same(a: np.ndarray) -> np.ndarray:
    return a


def linear(a: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Paddle [in, out]."""
    return np.ascontiguousarray(a.T)


def drop_batch_dims(a: np.ndarray) -> np.ndarray:
    """Leading size-1 axes off: class token [1, 1, D] -> our [D], positions [1, 1 + P, D] -> [1 + P, D]."""
    while a.ndim > 1 and a.shape[0] == 1:
        a = a[0]
    return a


def qkv_part(index: int, axis: int, transpose: bool) -> Callable[[np.ndarray], np.ndarray]:
    """One of q, k, v (index 0, 1, 2) from a fused qkv tensor, split in thirds along `axis`."""

    def take(a: np.ndarray) -> np.ndarray:
        part = np.split(a, 3, axis=axis)[index]
        return linear(part) if transpose else np.ascontiguousarray(part)

    return take


# ---- Hugging Face layout -----------------------------------------------------------------------
def hf_vision_rows(num_layers: int, qkv_bias: bool) -> list[Row]:
    rows = [
        ("vision_model.embeddings.class_embedding", "vision_tower.class_embedding", drop_batch_dims),
        ("vision_model.embeddings.position_embedding", "vision_tower.position_embedding", drop_batch_dims),
        ("vision_model.embeddings.patch_embedding.weight", "vision_tower.patch_embedding.weight", same),
        ("vision_model.embeddings.patch_embedding.bias", "vision_tower.patch_embedding.bias", same),
        ("vision_model.post_layernorm.weight", "vision_tower.post_norm.weight", same),
        ("vision_model.post_layernorm.bias", "vision_tower.post_norm.bias", same),
    ]
    for i in range(num_layers):
        src, dst = f"vision_model.encoder.layers.{i}.", f"vision_tower.blocks.{i}."
        rows += [
            (src + "layer_norm1.weight", dst + "norm1.weight", same),
            (src + "layer_norm1.bias", dst + "norm1.bias", same),
            # qkv.weight is [3D, D]: rows q, then k, then v.
            (src + "self_attn.qkv.weight", dst + "attn.q_proj.weight", qkv_part(0, 0, True)),
            (src + "self_attn.qkv.weight", dst + "attn.k_proj.weight", qkv_part(1, 0, True)),
            (src + "self_attn.qkv.weight", dst + "attn.v_proj.weight", qkv_part(2, 0, True)),
            (src + "self_attn.projection.weight", dst + "attn.out_proj.weight", linear),
            (src + "self_attn.projection.bias", dst + "attn.out_proj.bias", same),
            (src + "layer_norm2.weight", dst + "norm2.weight", same),
            (src + "layer_norm2.bias", dst + "norm2.bias", same),
            (src + "mlp.fc1.weight", dst + "mlp.fc1.weight", linear),
            (src + "mlp.fc1.bias", dst + "mlp.fc1.bias", same),
            (src + "mlp.fc2.weight", dst + "mlp.fc2.weight", linear),
            (src + "mlp.fc2.bias", dst + "mlp.fc2.bias", same),
        ]
        # HF keeps BLIP-2's q and v biases as one [3D] tensor with the k third zero at init.
        rows += [(src + "self_attn.qkv.bias" if qkv_bias else None, dst + f"attn.{p}_proj.bias",
                  qkv_part(n, 0, False)) for n, p in enumerate("qkv")]
    return rows


def _qformer_layer_rows(src: str, dst: str, has_cross: bool, self_name: str, fix: Callable) -> list[Row]:
    """One Q-Former layer; HF and PaddleMIX differ only in the attention core's name and weight layout."""
    parts = [("attention", "attn")] + ([("crossattention", "cross_attn")] if has_cross else [])
    rows = []
    for theirs, ours in parts:
        for proj, our_proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            rows += [(f"{src}{theirs}.{self_name}.{proj}.weight", f"{dst}{ours}.{our_proj}.weight", fix),
                     (f"{src}{theirs}.{self_name}.{proj}.bias", f"{dst}{ours}.{our_proj}.bias", same)]
        rows += [(f"{src}{theirs}.output.dense.weight", f"{dst}{ours}.out_proj.weight", fix),
                 (f"{src}{theirs}.output.dense.bias", f"{dst}{ours}.out_proj.bias", same),
                 (f"{src}{theirs}.output.LayerNorm.weight", f"{dst}{ours}_norm.weight", same),
                 (f"{src}{theirs}.output.LayerNorm.bias", f"{dst}{ours}_norm.bias", same)]
    return rows + [
        (src + "intermediate_query.dense.weight", dst + "mlp.fc1.weight", fix),
        (src + "intermediate_query.dense.bias", dst + "mlp.fc1.bias", same),
        (src + "output_query.dense.weight", dst + "mlp.fc2.weight", fix),
        (src + "output_query.dense.bias", dst + "mlp.fc2.bias", same),
        (src + "output_query.LayerNorm.weight", dst + "mlp_norm.weight", same),
        (src + "output_query.LayerNorm.bias", dst + "mlp_norm.bias", same),
    ]


def hf_qformer_rows(q: QFormerConfig) -> list[Row]:
    p = "multi_modal_projector."
    rows = [
        ("query_tokens", p + "query_tokens", same),
        ("qformer.layernorm.weight", p + "query_norm.weight", same),
        ("qformer.layernorm.bias", p + "query_norm.bias", same),
        ("language_projection.weight", p + "proj.weight", linear),
        ("language_projection.bias", p + "proj.bias", same),
    ]
    for i in range(q.num_layers):
        rows += _qformer_layer_rows(f"qformer.encoder.layer.{i}.", f"{p}layers.{i}.",
                                    i % q.cross_attention_every == 0, "attention", linear)
    return rows


# ---- the language model inside BLIP-2 ----------------------------------------------------------
# Private LM mapping, to be replaced at merge by helper 3a's shared Qwen2/Llama table
# (paddle_mm/weights/mapping.py). PaddleFormers keeps HF's names ("model.layers.i...",
# "lm_head.weight") and its lm_head's [vocab, hidden] layout; only the Linear weights turn over.
_LM_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def lm_rows(lm: LMConfig, src: str, head: str, head_transform: Callable, linear_transform: Callable,
            tensors: dict) -> list[Row]:
    """Rows for a Qwen2/Llama LM whose decoder sits under `src` and whose head is named `head`."""
    dst = "language_model.model."
    rows = [(src + "embed_tokens.weight", dst + "embed_tokens.weight", same),
            (src + "norm.weight", dst + "norm.weight", same)]
    for i in range(lm.num_layers):
        s, d = f"{src}layers.{i}.", f"{dst}layers.{i}."
        rows += [(s + n + ".weight", d + n + ".weight", linear_transform) for n in _LM_LINEARS]
        rows += [(s + n + ".weight", d + n + ".weight", same) for n in ("input_layernorm", "post_attention_layernorm")]
        if lm.family == "qwen2":  # Qwen2 has q/k/v biases; Llama and Qwen3 have none
            rows += [(s + f"self_attn.{p}_proj.bias", d + f"self_attn.{p}_proj.bias", same) for p in "qkv"]
        if lm.family == "qwen3":
            rows += [(s + f"self_attn.{n}.weight", d + f"self_attn.{n}.weight", same) for n in ("q_norm", "k_norm")]
    if lm.tie_word_embeddings and head not in tensors:  # tied checkpoints usually omit the head
        rows.append((src + "embed_tokens.weight", "language_model.lm_head.weight", same))
    else:
        rows.append((head, "language_model.lm_head.weight", head_transform))
    return rows


def lm_config_from_text_config(text: dict, source: str) -> tuple[LMConfig, dict[str, int]]:
    """Our LMConfig (and bos/eos/pad ids) from a Qwen2/Llama/Qwen3 HF config dict."""
    family = text.get("model_type", "")
    if family not in ("qwen2", "llama", "qwen3"):
        raise CheckpointError(f"{source}: text model type {family!r} is not supported (qwen2, llama, qwen3)")

    def need(key):
        if key not in text:
            raise CheckpointError(f"{source}: text_config has no {key!r}")
        return text[key]

    heads = need("num_attention_heads")
    unsupported = {
        "rope_scaling": text.get("rope_scaling") not in (None, {}),
        "attention_bias": family == "llama" and bool(text.get("attention_bias")),
        "mlp_bias": bool(text.get("mlp_bias")),
        "hidden_act": text.get("hidden_act", "silu") != "silu",
        "head_dim": text.get("head_dim") not in (None, need("hidden_size") // heads),
        "use_sliding_window": bool(text.get("use_sliding_window")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(f"{source}: text_config sets {', '.join(f'{k}={text.get(k)!r}' for k in bad)}, "
                              "which the paddle_mm LM config cannot express")
    lm = LMConfig(
        family=family, vocab_size=need("vocab_size"), hidden_size=need("hidden_size"),
        intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"), num_heads=heads,
        num_kv_heads=text.get("num_key_value_heads") or heads,
        max_position_embeddings=text.get("max_position_embeddings", 2048),
        rope_theta=float(text.get("rope_theta", 10000.0)), rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
    )
    ids = {name: text[f"{name}_token_id"] for name in ("bos", "eos", "pad")
           if isinstance(text.get(f"{name}_token_id"), int)}
    return lm, ids


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
    lm, ids = lm_config_from_text_config(raw.get("text_config", {}), source)
    if image_token_id is None:
        image_token_id = raw.get("image_token_index", raw.get("image_token_id"))
    if image_token_id is None:
        raise CheckpointError(f"{source}: no image_token_index in the config (a checkpoint from before "
                              "transformers 4.47); pass image_token_id, the id of the image token in its tokenizer")
    cfg = ModelConfig(vision=vision, projector=ProjectorConfig(type="qformer", qformer=qformer), lm=lm,
                      image_token_id=int(image_token_id))
    return cfg, ids, bool(v["qkv_bias"])


def hf_table(cfg: ModelConfig, qkv_bias: bool, tensors: dict) -> list[Row]:
    return (hf_vision_rows(cfg.vision.num_layers, qkv_bias) + hf_qformer_rows(cfg.projector.qformer)
            + lm_rows(cfg.lm, "language_model.model.", "language_model.lm_head.weight", same, linear, tensors))


# ---- PaddleMIX layout --------------------------------------------------------------------------
# paddlemix/models/blip2: `visual_encoder` (eva_vit.VisionTransformer), `Qformer` (Qformer.BertLMHeadModel
# holding ln_vision, query_tokens, bert, language_projection) and `language_model` (PaddleNLP, e.g.
# LlamaForCausalLM: `llama.*`, lm_head [hidden, vocab]). Paddle Linear weights are [in, out] throughout.
def paddlemix_vision_rows(num_layers: int, qkv_bias: bool) -> list[Row]:
    rows = [
        ("visual_encoder.cls_token", "vision_tower.class_embedding", drop_batch_dims),
        ("visual_encoder.pos_embed", "vision_tower.position_embedding", drop_batch_dims),
        ("visual_encoder.patch_embed.proj.weight", "vision_tower.patch_embedding.weight", same),
        ("visual_encoder.patch_embed.proj.bias", "vision_tower.patch_embedding.bias", same),
        # EVA's ViT has no final norm; the Q-Former's ln_vision normalizes its output.
        ("Qformer.ln_vision.weight", "vision_tower.post_norm.weight", same),
        ("Qformer.ln_vision.bias", "vision_tower.post_norm.bias", same),
    ]
    for i in range(num_layers):
        src, dst = f"visual_encoder.blocks.{i}.", f"vision_tower.blocks.{i}."
        rows += [
            (src + "norm1.weight", dst + "norm1.weight", same),
            (src + "norm1.bias", dst + "norm1.bias", same),
            # qkv.weight is [D, 3D]: columns q, then k, then v.
            (src + "attn.qkv.weight", dst + "attn.q_proj.weight", qkv_part(0, 1, False)),
            (src + "attn.qkv.weight", dst + "attn.k_proj.weight", qkv_part(1, 1, False)),
            (src + "attn.qkv.weight", dst + "attn.v_proj.weight", qkv_part(2, 1, False)),
            (src + "attn.proj.weight", dst + "attn.out_proj.weight", same),
            (src + "attn.proj.bias", dst + "attn.out_proj.bias", same),
            (src + "norm2.weight", dst + "norm2.weight", same),
            (src + "norm2.bias", dst + "norm2.bias", same),
            (src + "mlp.fc1.weight", dst + "mlp.fc1.weight", same),
            (src + "mlp.fc1.bias", dst + "mlp.fc1.bias", same),
            (src + "mlp.fc2.weight", dst + "mlp.fc2.weight", same),
            (src + "mlp.fc2.bias", dst + "mlp.fc2.bias", same),
        ]
        rows += [(src + "attn.qkv.bias" if qkv_bias else None, dst + f"attn.{p}_proj.bias",
                  qkv_part(n, 0, False)) for n, p in enumerate("qkv")]
    return rows


def paddlemix_qformer_rows(q: QFormerConfig) -> list[Row]:
    p = "multi_modal_projector."
    rows = [
        ("Qformer.query_tokens", p + "query_tokens", same),
        ("Qformer.bert.embeddings.LayerNorm.weight", p + "query_norm.weight", same),
        ("Qformer.bert.embeddings.LayerNorm.bias", p + "query_norm.bias", same),
        ("Qformer.language_projection.weight", p + "proj.weight", same),
        ("Qformer.language_projection.bias", p + "proj.bias", same),
    ]
    for i in range(q.num_layers):
        rows += _qformer_layer_rows(f"Qformer.bert.encoder.layer.{i}.", f"{p}layers.{i}.",
                                    i % q.cross_attention_every == 0, "self", same)
    return rows


# Stage-1 parts (the Q-Former's text branch and the ITC/ITM heads) that a PaddleMIX checkpoint may
# still hold; the generation model has no use for them, so they are skipped by name.
PADDLEMIX_STAGE1_ONLY = re.compile(
    r"^Qformer\.(bert\.embeddings\.(word_embeddings|position_embeddings)\.weight"
    r"|bert\.embeddings\.position_ids"
    r"|bert\.encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)"
    r"|cls\..+|vision_proj\..+|text_proj\..+|itm_head\..+)$|^temp$"
)


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
    lm, ids = lm_config_from_text_config(text, source)
    if image_token_id is None:
        raise CheckpointError(f"{source}: PaddleMIX configs name no image token; pass image_token_id")
    cfg = ModelConfig(vision=vision, projector=ProjectorConfig(type="qformer", qformer=qformer), lm=lm,
                      image_token_id=int(image_token_id))
    return cfg, ids, bool(v.get("qkv_bias", True))


def paddlemix_table(cfg: ModelConfig, qkv_bias: bool, tensors: dict) -> list[Row]:
    lm_prefix = f"language_model.{cfg.lm.family}."
    return (paddlemix_vision_rows(cfg.vision.num_layers, qkv_bias) + paddlemix_qformer_rows(cfg.projector.qformer)
            + lm_rows(cfg.lm, lm_prefix, "language_model.lm_head.weight", linear, same, tensors))


# ---- applying a table --------------------------------------------------------------------------
def apply_table(table: list[Row], tensors: dict, expected: dict, source: str,
                skip: re.Pattern | None = None) -> dict[str, np.ndarray]:
    """Our tensors from a checkpoint's by the table; every problem is listed in one CheckpointError.

    `expected` maps our names to shapes. A source tensor that no row reads is an error unless
    `skip` matches its name.
    """
    missing = sorted({src for src, _, _ in table if src is not None and src not in tensors})
    used = {src for src, _, _ in table}
    unexpected = sorted(k for k in tensors if k not in used and not (skip and skip.match(k)))
    out, wrong = {}, []
    for src, dst, transform in table:
        if src is not None and src in tensors:
            try:
                value = transform(tensors[src])
            except ValueError as e:  # a fused qkv that does not split in three
                wrong.append(f"{src} {list(tensors[src].shape)} -> {dst}: {e}")
                continue
        elif src is None:
            value = np.zeros(expected[dst], dtype=np.float32)
        else:
            continue
        if dst in expected and list(value.shape) != list(expected[dst]):
            wrong.append(f"{src} {list(tensors[src].shape)} -> {dst} {list(value.shape)}, model needs {list(expected[dst])}")
        out[dst] = value
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:10])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:10])}")
    if wrong:
        problems.append(f"wrong shape: {'; '.join(wrong[:10])}")
    if problems:
        raise CheckpointError(f"{source}: does not fit the BLIP-2 model ({' | '.join(problems)})")
    return out


def read_weights(folder: str, weights_format: str = "safetensors") -> dict[str, np.ndarray]:
    """A folder's tensors as fp32 numpy; the pickle format only when `weights_format` names it."""
    pdparams = os.path.join(folder, PDPARAMS_FILE)
    if weights_format == "pdparams":
        if not os.path.isfile(pdparams):
            raise CheckpointError(f"{folder}: no {PDPARAMS_FILE}")
        import paddle

        try:
            state = paddle.load(pdparams, return_numpy=True)
        except Exception as e:  # paddle.load raises many types for a bad pickle
            raise CheckpointError(f"{pdparams}: cannot read ({type(e).__name__}: {e})") from e
        return {k: _float32(np.asarray(v), k, pdparams) for k, v in state.items()}
    if weights_format != "safetensors":
        raise CheckpointError(f"{folder}: weights_format {weights_format!r} is not 'safetensors' or 'pdparams'")
    try:
        return read_tensors(folder)
    except CheckpointError as e:
        if os.path.isfile(pdparams):  # say how to read it rather than unpickling it unasked
            raise CheckpointError(f"{e}; {PDPARAMS_FILE} is there, a pickle file read only with "
                                  "weights_format='pdparams'") from e
        raise


def _float32(a: np.ndarray, name: str, path: str) -> np.ndarray:
    if a.dtype == np.uint16:  # Paddle hands bf16 to numpy as its raw 16 bits
        return (a.astype(np.uint32) << 16).view(np.float32)
    if a.dtype.kind != "f":
        raise CheckpointError(f"{path}: tensor {name} has dtype {a.dtype}, not floating point")
    return a.astype(np.float32)


# ---- the loader --------------------------------------------------------------------------------
def load_blip2(folder: str, layout: str = "hf", weights_format: str = "safetensors",
               image_token_id: int | None = None):
    """A VisionLanguageModel (eval mode) with the weights of a local BLIP-2 checkpoint folder."""
    from paddle_mm.checkpoint import load_into
    from paddle_mm.model import VisionLanguageModel

    if layout not in ("hf", "paddlemix"):
        raise CheckpointError(f"{folder}: layout {layout!r} is not 'hf' or 'paddlemix'")
    raw = read_config(folder)
    tensors = read_weights(folder, weights_format)
    if layout == "hf":
        cfg, ids, qkv_bias = model_config_from_hf(raw, os.path.join(folder, "config.json"), image_token_id)
        table, skip = hf_table(cfg, qkv_bias, tensors), None
    else:
        cfg, ids, qkv_bias = model_config_from_paddlemix(raw, folder, tensors, image_token_id)
        table, skip = paddlemix_table(cfg, qkv_bias, tensors), PADDLEMIX_STAGE1_ONLY
    model = VisionLanguageModel(cfg, ids)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    mapped = apply_table(table, tensors, expected, folder, skip)
    load_into(model, mapped, folder)
    model.eval()
    return model
