"""`paddle-mm convert` and `paddle-mm export`: Hugging Face folders <-> paddle_mm folders.

A paddle_mm folder holds model.safetensors (paddle_mm names, fp32), config.json (our config
dataclass), and conversion.json (the family, the source layout, the source config and each
source tensor's dtype). Tensors the source holds but paddle_mm does not use (a CLIP text
tower, position_ids buffers) go to source_extras.safetensors, and the source's other small
files (tokenizer, generation config) to source_files/, so an export reproduces the input
tensor for tensor: fp32 bit for bit, bf16 and fp16 widened exactly and narrowed back.
A converted LLaVA folder is also a run folder: `paddle-mm infer` and `train.init_from` take it.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict

import numpy as np

from paddle_mm.errors import CheckpointError
from paddle_mm.fileio import write_json_atomic
from paddle_mm.weights.hf import INDEX_FILE, read_config, read_tensors, tensor_index, write_safetensors
from paddle_mm.weights.llm import hf_text_config
from paddle_mm.weights.mapping import Table, from_paddle_mm, to_paddle_mm

FAMILIES = ("llava", "clip", "qwen2", "llama", "blip2")
MODEL_FILE = "model.safetensors"
EXTRAS_FILE = "source_extras.safetensors"
CONVERSION_FILE = "conversion.json"
SOURCE_FILES = "source_files"


# tables -------------------------------------------------------------------------------------
def _layout(family: str, names, source: str) -> str:
    """Which of the family's source layouts these tensor names use."""
    if family == "clip":
        from paddle_mm.weights.clip import LAYOUTS

        for prefix in LAYOUTS:
            if any(n.startswith(prefix + "encoder.layers.") for n in names):
                return prefix
        raise CheckpointError(f"{source}: no CLIP vision tower found under {LAYOUTS}")
    if family == "llava":
        from paddle_mm.weights.llava import layout_of

        return layout_of(names, source)
    if family == "blip2":
        return "hf"
    return "causal-lm"


def _table(family: str, raw: dict, layout: str, source: str) -> Table:
    """The table from the source layout to paddle_mm names."""
    if family == "clip":
        from paddle_mm.weights.clip import CLIP_MODEL_EXTRAS, CLIP_VISION

        table = CLIP_VISION.prefixed(layout, "vision_tower.")
        return table + CLIP_MODEL_EXTRAS if layout == "vision_model." else table
    if family in ("qwen2", "llama"):
        from paddle_mm.weights.llm import causal_lm_table, lm_family

        if lm_family(raw, f"{source}/config.json") != family:
            raise CheckpointError(f"{source}/config.json: model_type {raw.get('model_type')!r} is not {family!r}")
        return causal_lm_table(family, bool(raw.get("tie_word_embeddings", False)), target_prefix="language_model.")
    if family == "llava":
        from paddle_mm.weights.llava import llava_table

        text = raw.get("text_config") or {}
        return llava_table(layout, text.get("model_type", "llama"), bool(text.get("tie_word_embeddings", False)))
    if family == "blip2":
        from paddle_mm.weights.blip2 import blip2_table, model_config_from_hf

        return blip2_table(layout, model_config_from_hf(raw, f"{source}/config.json")[0].lm)
    raise CheckpointError(f"unknown family {family!r}: one of {FAMILIES}")


def _split_fused(family: str, raw: dict, layout: str, tensors: dict, source: str) -> dict:
    """What a rename table cannot do, before mapping: BLIP-2's fused qkv split in thirds."""
    if family != "blip2":
        return tensors
    from paddle_mm.weights.blip2 import model_config_from_hf, split_for_mapping

    return split_for_mapping(tensors, layout, model_config_from_hf(raw, source)[2], source)


def _join_fused(family: str, raw: dict, layout: str, tensors: dict, source: str) -> dict:
    """The inverse of _split_fused, after mapping back for export."""
    if family != "blip2":
        return tensors
    from paddle_mm.weights.blip2 import join_for_export, model_config_from_hf

    return join_for_export(tensors, layout, model_config_from_hf(raw, source)[2], source)


def _paddle_mm_config(family: str, src: str) -> dict:
    """Our config of the converted model, as JSON."""
    if family == "clip":
        from paddle_mm.weights.clip import vision_config_from_folder

        return asdict(vision_config_from_folder(src))
    if family == "llava":
        from paddle_mm.weights.llava import llava_model_config

        cfg = llava_model_config(src)
        cfg.path = ""  # the converted folder holds the weights itself
        return asdict(cfg)
    if family == "blip2":
        from paddle_mm.weights.blip2 import model_config_from_hf

        return asdict(model_config_from_hf(read_config(src), f"{src}/config.json")[0])
    from paddle_mm.weights.llm import lm_config_from_folder

    cfg = lm_config_from_folder(src)
    cfg.path = ""
    return asdict(cfg)


# folders ------------------------------------------------------------------------------------
def _new_folder(src: str, dst: str):
    """A temporary folder beside dst, renamed into place by the caller; never inside src."""
    src_abs, dst_abs = os.path.abspath(src), os.path.abspath(dst)
    if os.path.exists(dst_abs):
        raise CheckpointError(f"{dst}: already exists; give a new folder")
    if dst_abs == src_abs or dst_abs.startswith(src_abs + os.sep):
        raise CheckpointError(f"{dst}: inside the source folder {src}; nothing is written there")
    tmp = f"{dst_abs}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp, dst_abs


def _copy_small_files(src: str, dst: str) -> list[str]:
    """Copy the files that are not weights (tokenizer, configs) from src into dst."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not name.endswith((".safetensors", ".bin", ".pdparams")) and name != INDEX_FILE:
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def convert(src: str, dst: str, family: str) -> str:
    """Convert a Hugging Face folder into a new paddle_mm folder dst; returns dst."""
    if family not in FAMILIES:
        raise CheckpointError(f"unknown family {family!r}: one of {FAMILIES}")
    raw = read_config(src)
    tensors = read_tensors(src)
    layout = _layout(family, tensors, src)
    table = _table(family, raw, layout, src)
    mapped, ignored = to_paddle_mm(_split_fused(family, raw, layout, tensors, src), table, src)
    config = _paddle_mm_config(family, src)
    dtypes = {k: dtype for k, (_, dtype) in tensor_index(src).items()}
    tmp, final = _new_folder(src, dst)
    try:
        write_safetensors(os.path.join(tmp, MODEL_FILE), mapped)
        if ignored:
            write_safetensors(os.path.join(tmp, EXTRAS_FILE), {k: tensors[k] for k in ignored},
                              {k: "F32" if dtypes[k] in ("BF16", "F16") else dtypes[k] for k in ignored})
        os.makedirs(os.path.join(tmp, SOURCE_FILES))
        copied = _copy_small_files(src, os.path.join(tmp, SOURCE_FILES))
        write_json_atomic(os.path.join(tmp, "config.json"), config)
        write_json_atomic(os.path.join(tmp, CONVERSION_FILE), {
            "family": family, "from": "hf", "source": os.path.abspath(src), "layout": layout,
            "source_config": raw, "dtypes": dtypes, "ignored": ignored, "source_files": copied,
        })
        if family in ("llava", "blip2"):
            _make_run_folder(tmp, config, src)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _make_run_folder(folder: str, config: dict, src: str) -> None:
    """recipe.yaml and tokenizer.json beside the weights, so the folder loads like a trained run."""
    from paddle_mm.config import ModelConfig, Recipe
    from paddle_mm.data.tokenizer import Tokenizer
    from paddle_mm.recipe import from_dict, save_recipe

    recipe = Recipe(model=from_dict(ModelConfig, config, source="converted config"))
    recipe.train.output_dir = folder
    save_recipe(recipe, os.path.join(folder, "recipe.yaml"))
    if os.path.isfile(os.path.join(src, "tokenizer.json")):
        Tokenizer.load(src).save(folder)


# export -------------------------------------------------------------------------------------
def export(src: str, dst: str) -> str:
    """Write a paddle_mm folder (converted, or a trained LLaVA-style run) as a Hugging Face folder."""
    from paddle_mm.weights.tensor_files import load_tensors

    record = _conversion_record(src)
    tensors = load_tensors(os.path.join(src, MODEL_FILE))
    tensors = merge_lora(tensors, src)
    raw = record["source_config"]
    table = _table(record["family"], raw, record["layout"], src)
    out = _join_fused(record["family"], raw, record["layout"], from_paddle_mm(tensors, table, src), src)
    dtypes = dict(record["dtypes"])
    extras = os.path.join(src, EXTRAS_FILE)
    if os.path.isfile(extras):
        out.update(load_tensors(extras))
    tmp, final = _new_folder(src, dst)
    try:
        write_safetensors(os.path.join(tmp, MODEL_FILE), out, {k: dtypes.get(k, "F32") for k in out})
        files = os.path.join(src, SOURCE_FILES)
        for name in record.get("source_files", []):
            shutil.copy2(os.path.join(files, name), os.path.join(tmp, name))
        if "config.json" not in record.get("source_files", []):
            write_json_atomic(os.path.join(tmp, "config.json"), raw)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _conversion_record(src: str) -> dict:
    """conversion.json of a converted folder, or one made up for a run trained here (LLaVA layout)."""
    path = os.path.join(src, CONVERSION_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    config_file = os.path.join(src, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{src}: neither {CONVERSION_FILE} nor a run's config.json: not a paddle_mm folder")
    from paddle_mm.config import ModelConfig
    from paddle_mm.recipe import from_dict

    with open(config_file, encoding="utf-8") as f:
        cfg = from_dict(ModelConfig, json.load(f), source=config_file)
    return {"family": "llava", "layout": "legacy", "source_config": hf_llava_config(cfg, src), "dtypes": {},
            "source_files": []}


def refuse_inexpressible(source: str, target: str, checks) -> None:
    """One CheckpointError naming every (failed, reason) check the target layout cannot express."""
    problems = [reason for failed, reason in checks if failed]
    if problems:
        raise CheckpointError(f"{source}: cannot be written as a transformers {target}: {'; '.join(problems)}")


def hf_llava_config(cfg, source: str) -> dict:
    """A transformers LlavaConfig dict for a model built here; refuses what LLaVA cannot express."""
    v, lm = cfg.vision, cfg.lm
    refuse_inexpressible(source, "LLaVA", (
        (cfg.projector.type != "mlp2x_gelu", f"projector {cfg.projector.type!r} (LLaVA has mlp2x_gelu)"),
        (cfg.projector.pool != 1, "projector.pool > 1"),
        (v.post_norm, "vision.post_norm (LLaVA does not normalize the selected features)"),
        (not v.pre_norm, "vision.pre_norm false"),
        (lm.family not in ("llama", "qwen2"), f"LM family {lm.family!r}"),
    ))
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": cfg.image_token_id, "image_seq_length": cfg.tokens_per_image,
        "vision_feature_layer": v.feature_layer,
        "vision_feature_select_strategy": "default" if v.drop_cls_token else "full",
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "tie_word_embeddings": lm.tie_word_embeddings,
        "vision_config": {
            "model_type": "clip_vision_model", "image_size": v.image_size, "patch_size": v.patch_size,
            "num_channels": v.num_channels, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": v.hidden_act,
        },
        "text_config": hf_text_config(lm),
    }


def merge_lora(tensors: dict[str, np.ndarray], run_dir: str) -> dict[str, np.ndarray]:
    """Fold LoRA matrices into their base weights (W + A @ B * alpha / r), as the LoRA layer computes."""
    lora = sorted(k for k in tensors if k.endswith(".lora_A"))
    if not lora:
        return tensors
    from paddle_mm.config import Recipe
    from paddle_mm.recipe import load_recipe

    cfg = load_recipe(os.path.join(run_dir, "recipe.yaml"), Recipe).train.lora
    out = {k: v for k, v in tensors.items() if not k.endswith((".lora_A", ".lora_B"))}
    for name in lora:
        base = name[: -len(".lora_A")]
        out[base + ".weight"] = tensors[base + ".weight"] + tensors[name] @ tensors[base + ".lora_B"] * (cfg.alpha / cfg.r)
    return out
