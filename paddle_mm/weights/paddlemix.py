"""PaddleMIX / PaddleNLP LLaVA checkpoints -> paddle_mm (BLIP-2's PaddleMIX layout is in blip2.py).

PaddleMIX's LlavaLlamaForCausalLM keeps the decoder under `llama.` with the CLIP tower
(PaddleNLP's CLIP names: conv1, ln_pre, transformer.layers.{i}.linear1, ...) at
`llama.vision_tower.vision_tower.vision_model.` and the projector as an nn.Sequential at
`llama.mm_projector.{0,2}`. Paddle Linear weights are [in, out] already, as here; its
LlamaLMHead stores [hidden, vocab], which is transposed to PaddleFormers' [vocab, hidden].
The config is a flat LlamaConfig with mm_* fields; the vision config lives in the CLIP
folder that mm_vision_tower names. model_state.pdparams is a pickle: read only on request
(weights/paddlemix_files.py). Here: the LLaVA tables and config, and `convert_paddlemix`, the
command that writes a PaddleMIX LLaVA or BLIP-2 as a paddle_mm folder.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, replace

from paddle_mm.config import ModelConfig, ProjectorConfig
from paddle_mm.data.tokenizer import TOKENIZER_FILE
from paddle_mm.errors import CheckpointError
from paddle_mm.fileio import write_json_atomic
from paddle_mm.run_folder import CONFIG_FILE, MODEL_FILE
from paddle_mm.weights.blip2 import blip2_table, hf_blip2_config, read_blip2
from paddle_mm.weights.folders import CONVERSION_FILE, make_run_folder, new_folder
from paddle_mm.weights.hf import read_config, write_safetensors
from paddle_mm.weights.llava import hf_llava_config
from paddle_mm.weights.llm import causal_lm_table, lm_config_from_hf
from paddle_mm.weights.mapping import Rule, Table, to_paddle_mm
from paddle_mm.weights.paddlemix_files import read_paddlemix_tensors

# Relative to PaddleNLP's CLIPVisionTransformer ("vision_model.").
PADDLENLP_CLIP_VISION = Table("paddlenlp-clip-vision", (
    Rule("class_embedding", "class_embedding"),
    Rule("conv1.weight", "patch_embedding.weight"),
    Rule("positional_embedding.weight", "position_embedding"),
    Rule("ln_pre.weight", "pre_norm.weight"),
    Rule("ln_pre.bias", "pre_norm.bias"),
    Rule("transformer.layers.{i}.norm1.weight", "blocks.{i}.norm1.weight"),
    Rule("transformer.layers.{i}.norm1.bias", "blocks.{i}.norm1.bias"),
    Rule("transformer.layers.{i}.self_attn.q_proj.weight", "blocks.{i}.attn.q_proj.weight"),
    Rule("transformer.layers.{i}.self_attn.q_proj.bias", "blocks.{i}.attn.q_proj.bias"),
    Rule("transformer.layers.{i}.self_attn.k_proj.weight", "blocks.{i}.attn.k_proj.weight"),
    Rule("transformer.layers.{i}.self_attn.k_proj.bias", "blocks.{i}.attn.k_proj.bias"),
    Rule("transformer.layers.{i}.self_attn.v_proj.weight", "blocks.{i}.attn.v_proj.weight"),
    Rule("transformer.layers.{i}.self_attn.v_proj.bias", "blocks.{i}.attn.v_proj.bias"),
    Rule("transformer.layers.{i}.self_attn.out_proj.weight", "blocks.{i}.attn.out_proj.weight"),
    Rule("transformer.layers.{i}.self_attn.out_proj.bias", "blocks.{i}.attn.out_proj.bias"),
    Rule("transformer.layers.{i}.norm2.weight", "blocks.{i}.norm2.weight"),
    Rule("transformer.layers.{i}.norm2.bias", "blocks.{i}.norm2.bias"),
    Rule("transformer.layers.{i}.linear1.weight", "blocks.{i}.mlp.fc1.weight"),
    Rule("transformer.layers.{i}.linear1.bias", "blocks.{i}.mlp.fc1.bias"),
    Rule("transformer.layers.{i}.linear2.weight", "blocks.{i}.mlp.fc2.weight"),
    Rule("transformer.layers.{i}.linear2.bias", "blocks.{i}.mlp.fc2.bias"),
    Rule("ln_post.weight", "post_norm.weight"),
    Rule("ln_post.bias", "post_norm.bias"),
))

PADDLEMIX_PROJECTOR = Table("paddlemix-mm-projector", (  # nn.Sequential(Linear, GELU, Linear)
    Rule("0.weight", "linear_1.weight"),
    Rule("0.bias", "linear_1.bias"),
    Rule("2.weight", "linear_2.weight"),
    Rule("2.bias", "linear_2.bias"),
))

PADDLEMIX_LLAVA = (
    PADDLENLP_CLIP_VISION.prefixed("llama.vision_tower.vision_tower.vision_model.", "vision_tower.")
    + PADDLEMIX_PROJECTOR.prefixed("llama.mm_projector.", "multi_modal_projector.")
    + causal_lm_table("llama", False, decoder_prefix="llama.", target_prefix="language_model.", paddle_layout=True)
)


def paddlemix_model_config(folder: str, vision_folder: str = "") -> ModelConfig:
    """ModelConfig of a PaddleMIX LLaVA folder; the CLIP config comes from mm_vision_tower's folder."""
    from paddle_mm.weights.clip import vision_config_from_folder

    raw = read_config(folder)
    source = f"{folder}/config.json"
    if "mm_projector_type" not in raw:
        raise CheckpointError(f"{source}: no mm_projector_type: not a PaddleMIX LLaVA config")
    if raw["mm_projector_type"] != "mlp2x_gelu":
        raise CheckpointError(f"{source}: mm_projector_type {raw['mm_projector_type']!r}: only mlp2x_gelu is supported")
    vision_folder = vision_folder or raw.get("mm_vision_tower", "")
    if not vision_folder or not os.path.isfile(os.path.join(vision_folder, "config.json")):
        raise CheckpointError(f"{source}: the CLIP config is in the vision tower's folder ({vision_folder!r}), "
                              "which is not a local folder with config.json; name one with --vision")
    select = raw.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise CheckpointError(f"{source}: mm_vision_select_feature {select!r} is not patch or cls_patch")
    vision = vision_config_from_folder(vision_folder)
    vision = replace(vision, feature_layer=int(raw.get("mm_vision_select_layer", -2)), drop_cls_token=select == "patch",
                     post_norm=False)
    lm = lm_config_from_hf({**raw, "model_type": "llama"}, "", source)
    return ModelConfig(vision=vision, projector=ProjectorConfig(type="mlp2x_gelu"), lm=lm)


def convert_paddlemix(src: str, dst: str, family: str = "llava", allow_pickle: bool = False, vision: str = "",
                      image_token_id: int | None = None) -> str:
    """A PaddleMIX LLaVA or BLIP-2 folder -> a new paddle_mm folder (exportable to the Hugging Face layout)."""
    if family == "llava":
        cfg = paddlemix_model_config(src, vision)
        mapped, _ = to_paddle_mm(read_paddlemix_tensors(src, allow_pickle), PADDLEMIX_LLAVA, src)
        if os.path.isfile(os.path.join(src, TOKENIZER_FILE)):
            # PaddleMIX marks images with -200 in the ids; here <image> is a token of the tokenizer
            from paddle_mm.data.tokenizer import Tokenizer

            cfg = replace(cfg, image_token_id=Tokenizer.load(src).image_token_id)
        layout, source_config = "legacy", hf_llava_config(cfg, src)
    elif family == "blip2":
        cfg, _, tensors, _ = read_blip2(src, "paddlemix", "pdparams" if allow_pickle else "safetensors",
                                        image_token_id)
        mapped, _ = to_paddle_mm(tensors, blip2_table("paddlemix", cfg.lm), src)
        # the q, k, v biases are written as loaded (zeros where PaddleMIX had none): the same network
        layout, source_config = "hf", hf_blip2_config(cfg, True, src)
    else:
        raise CheckpointError(f"PaddleMIX conversion covers llava and blip2, not {family!r}")
    tmp, final = new_folder(src, dst)
    try:
        write_safetensors(os.path.join(tmp, MODEL_FILE), mapped)
        write_json_atomic(os.path.join(tmp, CONFIG_FILE), asdict(cfg))
        write_json_atomic(os.path.join(tmp, CONVERSION_FILE), {
            "family": family, "from": "paddlemix", "source": os.path.abspath(src), "layout": layout,
            "source_config": source_config, "paddlemix_config": read_config(src), "dtypes": {}, "source_files": [],
        })
        make_run_folder(tmp, asdict(cfg), src)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
