"""The run folder: every file a training run writes, its one writer and its readers.

    recipe.yaml              the fully resolved recipe (repeat the run from it)
    config.json              the ModelConfig the weights were built with
    tokenizer.json           the LM tokenizer (special_tokens.json beside it, for readers)
    chat_template.jinja      a checkpoint's chat template (absent for ChatML), with
                             tokenizer_config.json (its special tokens) and generation_config.json
                             (its stop ids): written by Tokenizer.save
    vocab.txt                align and clip stages only: the text tower's WordPiece vocabulary
    model.safetensors        the final weights (a hard link to the last checkpoint's)
    projector.safetensors    the projector alone, for the next stage's train.projector_from
    metrics.jsonl            one line per log step, validation's figures in it (training/runlog.py);
                             visualdl/ beside it
    skipped.json             the records data.on_error=skip dropped
    nonfinite.jsonl          batches skipped under train.on_nonfinite=skip
    nonfinite/step-N/        the state before a non-finite step (a checkpoint) and batch.json
    checkpoint/step-N/       model, projector, optimizer.safetensors and state.json:
                             what an exact resume needs (training/checkpoints.py)
    checkpoint/best/         train.keep_best: model and projector of the lowest held-out loss,
                             state.json naming its step and loss (train.init_from can name it)

A folder converted from a Hugging Face LLaVA or BLIP-2 checkpoint (weights/convert.py) has
the same recipe.yaml, config.json, tokenizer.json and model.safetensors, so it loads here too.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, replace

from paddle_mm.alignment.text import VOCAB_FILE
from paddle_mm.config import ModelConfig, Recipe
from paddle_mm.data.chat_template import TEMPLATE_FILE
from paddle_mm.data.tokenizer import (
    CHATML,
    GENERATION_CONFIG_FILE,
    PLAIN,
    SPECIAL_TOKENS_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    Tokenizer,
    dump_special_tokens,
)
from paddle_mm.errors import CheckpointError
from paddle_mm.fileio import write_json_atomic
from paddle_mm.recipe import from_dict, load_recipe, save_recipe
from paddle_mm.weights.hf import whole_model_type
from paddle_mm.weights.tensor_files import load_into, load_tensors

RECIPE_FILE = "recipe.yaml"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
PROJECTOR_FILE = "projector.safetensors"
METRICS_FILE = "metrics.jsonl"
VISUALDL_DIR = "visualdl"
SKIPPED_FILE = "skipped.json"
NONFINITE_LOG = "nonfinite.jsonl"
NONFINITE_DIR = "nonfinite"
NONFINITE_BATCH_FILE = "batch.json"  # inside nonfinite/step-N/: the step, its loss, its samples
CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "best"  # inside checkpoint/: the weights of the lowest held-out loss (train.keep_best)
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
WEIGHT_FILES = (MODEL_FILE, PROJECTOR_FILE)
__all__ = ["RECIPE_FILE", "CONFIG_FILE", "MODEL_FILE", "PROJECTOR_FILE", "METRICS_FILE", "VISUALDL_DIR",
           "SKIPPED_FILE", "NONFINITE_LOG", "NONFINITE_DIR", "NONFINITE_BATCH_FILE", "CHECKPOINT_DIR", "BEST_DIR", "OPTIMIZER_FILE", "STATE_FILE",
           "TOKENIZER_FILE", "SPECIAL_TOKENS_FILE", "TEMPLATE_FILE", "TOKENIZER_CONFIG_FILE", "GENERATION_CONFIG_FILE",
           "VOCAB_FILE", "WEIGHT_FILES"]


# ----------------------------------------------------------------------------- writing
def write_run_files(run_dir: str, recipe: Recipe, model_cfg: ModelConfig, tokenizer: Tokenizer,
                    text_vocab: str = "") -> None:
    """The files a run writes before its first step: recipe, model config, tokenizers."""
    os.makedirs(run_dir, exist_ok=True)
    save_recipe(recipe, os.path.join(run_dir, RECIPE_FILE))
    write_json_atomic(os.path.join(run_dir, CONFIG_FILE), asdict(model_cfg))
    tokenizer.save(run_dir)
    dump_special_tokens(run_dir, tokenizer)
    if text_vocab:
        copy_text_vocab(text_vocab, run_dir)


def copy_text_vocab(vocab_file: str, run_dir: str) -> None:
    """Copy the WordPiece vocabulary into the run folder, so the run is self-contained."""
    dst = os.path.join(run_dir, VOCAB_FILE)
    if os.path.abspath(vocab_file) != os.path.abspath(dst):
        tmp = f"{dst}.tmp-{os.getpid()}"
        shutil.copyfile(vocab_file, tmp)
        os.replace(tmp, dst)


def write_skipped(run_dir: str, records: list[str]) -> None:
    write_json_atomic(os.path.join(run_dir, SKIPPED_FILE), {"count": len(records), "records": records[:100]})


def step_folder(parent: str, step: int) -> str:
    """checkpoint/step-N and nonfinite/step-N: zero-padded, so the names sort by step."""
    return os.path.join(parent, f"step-{step:08d}")


def weights_file(path: str) -> str:
    """A weights file, or the model.safetensors of a run folder."""
    return os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path


# ----------------------------------------------------------------------------- reading
def _read_recipe_and_config(run_dir: str, required: tuple[str, ...], kind: str) -> tuple[Recipe, ModelConfig]:
    for name in required:
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise CheckpointError(f"{run_dir}: not {kind} ({name} is missing)")
    recipe = load_recipe(os.path.join(run_dir, RECIPE_FILE), Recipe)
    config_file = os.path.join(run_dir, CONFIG_FILE)
    with open(config_file, encoding="utf-8") as f:
        cfg = from_dict(ModelConfig, json.load(f), source=config_file)
    return recipe, cfg


def load_run(run_dir: str):
    """(recipe, model config, tokenizer, model) of a finished run folder, weights loaded, in eval mode.

    A Hugging Face LLaVA or BLIP-2 folder as downloaded (config.json, no recipe.yaml) loads too,
    with its own tokenizer, chat template and image processor settings.
    """
    from paddle_mm.builder import build_model, load_checkpoint_folder, without_paths

    kind = whole_model_type(run_dir) if not os.path.isfile(os.path.join(run_dir, RECIPE_FILE)) else None
    if kind:
        return load_checkpoint_folder(run_dir, kind)

    recipe, cfg = _read_recipe_and_config(run_dir, (RECIPE_FILE, CONFIG_FILE, MODEL_FILE), "a run folder")
    # A template file in the folder is found by itself; "chatml" and "plain" are the recipe's word.
    fixed = recipe.data.chat_template if recipe.data.chat_template in (CHATML, PLAIN) else ""
    tokenizer = Tokenizer.load(run_dir, fixed)
    # The weights file holds the LM too: build it from the saved shape, not from lm.path.
    model = build_model(without_paths(cfg), tokenizer)
    if recipe.train.lora.enabled:  # the saved weights hold the LoRA matrices beside the base ones
        from paddle_mm.lm.lora import add_lora

        add_lora(model.language_model, recipe.train.lora)
    weights = os.path.join(run_dir, MODEL_FILE)
    load_into(model, load_tensors(weights), weights)
    model.eval()
    return recipe, cfg, tokenizer, model


def load_align_run(run_dir: str):
    """(recipe, model) of a finished align or clip run, weights loaded, in eval mode."""
    from paddle_mm.alignment.stages import build_align_model

    recipe, cfg = _read_recipe_and_config(run_dir, (RECIPE_FILE, CONFIG_FILE, MODEL_FILE, VOCAB_FILE),
                                          "an align/clip run folder")
    cfg = replace(cfg, text=replace(cfg.text, tokenizer=run_dir, init_from=""))
    model = build_align_model(recipe.train.stage, cfg)
    weights = os.path.join(run_dir, MODEL_FILE)
    load_into(model, load_tensors(weights), weights)
    model.eval()
    return recipe, model
