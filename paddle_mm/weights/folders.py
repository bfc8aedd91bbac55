"""The folders `paddle-mm convert` and `export` write, shared by convert.py and paddlemix.py.

A new folder is written beside its final name and renamed into place when complete; a
converted whole model (LLaVA, BLIP-2) also gets recipe.yaml (with the source's image processor
settings) and tokenizer.json (with its chat template), so it is a run folder (paddle_mm/run_folder.py); export folds LoRA matrices into their base weights.
Only the commands import this module, so it may import run_folder (which reaches builder).
"""
from __future__ import annotations

import os
import shutil

import numpy as np

from paddle_mm.errors import CheckpointError
from paddle_mm.run_folder import RECIPE_FILE, TOKENIZER_FILE
from paddle_mm.weights.hf import INDEX_FILE

CONVERSION_FILE = "conversion.json"


def new_folder(src: str, dst: str):
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


def copy_small_files(src: str, dst: str) -> list[str]:
    """Copy the files that are not weights (tokenizer, configs) from src into dst."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not name.endswith((".safetensors", ".bin", ".pdparams")) and name != INDEX_FILE:
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def make_run_folder(folder: str, config: dict, src: str) -> None:
    """recipe.yaml and tokenizer.json beside the weights, so the folder loads like a trained run."""
    from paddle_mm.config import ModelConfig, Recipe
    from paddle_mm.data.image import image_config_from_folder
    from paddle_mm.data.tokenizer import Tokenizer
    from paddle_mm.recipe import from_dict, save_recipe

    recipe = Recipe(model=from_dict(ModelConfig, config, source="converted config"))
    recipe.train.output_dir = folder
    # The source's image settings, written out: the converted folder must not need the source.
    recipe.data.image = image_config_from_folder(src) or recipe.data.image
    recipe.data.image_from_checkpoint = False
    save_recipe(recipe, os.path.join(folder, RECIPE_FILE))
    if os.path.isfile(os.path.join(src, TOKENIZER_FILE)):  # the source's own tokenizer (and chat template)
        Tokenizer.load(src).save(folder)


def merge_lora(tensors: dict[str, np.ndarray], run_dir: str) -> dict[str, np.ndarray]:
    """Fold LoRA matrices into their base weights (W + A @ B * alpha / r), as the LoRA layer computes."""
    lora = sorted(k for k in tensors if k.endswith(".lora_A"))
    if not lora:
        return tensors
    from paddle_mm.config import Recipe
    from paddle_mm.recipe import load_recipe

    cfg = load_recipe(os.path.join(run_dir, RECIPE_FILE), Recipe).train.lora
    out = {k: v for k, v in tensors.items() if not k.endswith((".lora_A", ".lora_B"))}
    for name in lora:
        base = name[: -len(".lora_A")]
        out[base + ".weight"] = tensors[base + ".weight"] + tensors[name] @ tensors[base + ".lora_B"] * (cfg.alpha / cfg.r)
    return out
