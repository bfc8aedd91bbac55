"""`paddle-mm convert` and `paddle-mm export`: Hugging Face folders <-> paddle_mm folders.

A paddle_mm folder holds model.safetensors (paddle_mm names, fp32), config.json (our config
dataclass), and conversion.json (the family, the source layout, the source config and each
source tensor's dtype). Tensors the source holds but paddle_mm does not use (a CLIP text
tower, position_ids buffers) go to source_extras.safetensors, and the source's other small
files (tokenizer, generation config) to source_files/, so an export reproduces the input
tensor for tensor: fp32 bit for bit, bf16 and fp16 widened exactly and narrowed back.
A converted LLaVA folder is also a run folder: `paddle-mm infer` and `train.init_from` take it.
What differs between families is each one's `Family` record (weights/families.py).
"""
from __future__ import annotations

import json
import os
import shutil

from paddle_mm.errors import CheckpointError
from paddle_mm.fileio import write_json_atomic
from paddle_mm.run_folder import CONFIG_FILE, MODEL_FILE
from paddle_mm.weights.families import family as family_record
from paddle_mm.weights.folders import CONVERSION_FILE, copy_small_files, make_run_folder, merge_lora, new_folder
from paddle_mm.weights.hf import SINGLE_FILE, read_config, read_tensors, tensor_index, write_safetensors
from paddle_mm.weights.llava import hf_llava_config
from paddle_mm.weights.mapping import from_paddle_mm, to_paddle_mm

EXTRAS_FILE = "source_extras.safetensors"
SOURCE_FILES = "source_files"
__all__ = ["CONVERSION_FILE", "EXTRAS_FILE", "SOURCE_FILES", "convert", "export"]


def convert(src: str, dst: str, family: str) -> str:
    """Convert a Hugging Face folder into a new paddle_mm folder dst; returns dst."""
    record = family_record(family)
    raw = read_config(src)
    tensors = read_tensors(src)
    layout = record.layout(tensors, src)
    table = record.table(raw, layout, src)
    mapped, ignored = to_paddle_mm(record.split(raw, layout, tensors, src), table, src)
    config = record.config(src)
    dtypes = {k: dtype for k, (_, dtype) in tensor_index(src).items()}
    tmp, final = new_folder(src, dst)
    try:
        write_safetensors(os.path.join(tmp, MODEL_FILE), mapped)
        if ignored:
            write_safetensors(os.path.join(tmp, EXTRAS_FILE), {k: tensors[k] for k in ignored},
                              {k: "F32" if dtypes[k] in ("BF16", "F16") else dtypes[k] for k in ignored})
        os.makedirs(os.path.join(tmp, SOURCE_FILES))
        copied = copy_small_files(src, os.path.join(tmp, SOURCE_FILES))
        write_json_atomic(os.path.join(tmp, CONFIG_FILE), config)
        write_json_atomic(os.path.join(tmp, CONVERSION_FILE), {
            "family": family, "from": "hf", "source": os.path.abspath(src), "layout": layout,
            "source_config": raw, "dtypes": dtypes, "ignored": ignored, "source_files": copied,
        })
        if record.makes_run_folder:
            make_run_folder(tmp, config, src)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# export -------------------------------------------------------------------------------------
def export(src: str, dst: str) -> str:
    """Write a paddle_mm folder (converted, or a trained LLaVA-style run) as a Hugging Face folder."""
    from paddle_mm.weights.tensor_files import load_tensors

    record = _conversion_record(src)
    tensors = load_tensors(os.path.join(src, MODEL_FILE))
    tensors = merge_lora(tensors, src)
    raw = record["source_config"]
    fam = family_record(record["family"])
    table = fam.table(raw, record["layout"], src)
    out = fam.join(raw, record["layout"], from_paddle_mm(tensors, table, src), src)
    dtypes = dict(record["dtypes"])
    extras = os.path.join(src, EXTRAS_FILE)
    if os.path.isfile(extras):
        out.update(load_tensors(extras))
    tmp, final = new_folder(src, dst)
    try:  # a Hugging Face folder from here on: its own file names
        write_safetensors(os.path.join(tmp, SINGLE_FILE), out, {k: dtypes.get(k, "F32") for k in out})
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
    config_file = os.path.join(src, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise CheckpointError(f"{src}: neither {CONVERSION_FILE} nor a run's config.json: not a paddle_mm folder")
    from paddle_mm.config import ModelConfig
    from paddle_mm.recipe import from_dict

    with open(config_file, encoding="utf-8") as f:
        cfg = from_dict(ModelConfig, json.load(f), source=config_file)
    return {"family": "llava", "layout": "legacy", "source_config": hf_llava_config(cfg, src), "dtypes": {},
            "source_files": []}
