"""Build the pieces of a run from a recipe: tokenizer, model config, model, samples, image processor.

A finished run is read back by paddle_mm/run_folder.py, which builds through here."""
from __future__ import annotations

from dataclasses import replace

from paddle_mm.config import DatasetSpec, ModelConfig, Recipe
from paddle_mm.data.image import ImageProcessor, ImageProcessorConfig, image_config_from_folder
from paddle_mm.data.readers import Sample, read_dataset
from paddle_mm.data.tokenizer import PLAIN, Tokenizer
from paddle_mm.errors import DataError, RecipeError


def load_tokenizer(recipe: Recipe, recipe_source: str = "recipe") -> Tokenizer:
    path = recipe.data.tokenizer or recipe.model.lm.path or recipe.model.path or _hf_init_folder(recipe)
    if not path:
        raise RecipeError(f"{recipe_source}: data.tokenizer is empty and neither model.lm.path nor model.path names a folder")
    return Tokenizer.load(path, recipe.data.chat_template)


def _hf_init_folder(recipe: Recipe) -> str:
    """train.init_from when it names a Hugging Face folder as downloaded (its tokenizer, template and
    image settings are the run's unless the recipe names others)."""
    from paddle_mm.weights.hf import whole_model_type

    init = recipe.train.init_from
    return init if init and whole_model_type(init) else ""


def model_config_for(recipe: Recipe, tokenizer: Tokenizer) -> ModelConfig:
    """The recipe's model config completed from the tokenizer and the checkpoint folders it names."""
    from paddle_mm.weights.pretrained import resolved_model_config

    model = resolved_model_config(recipe.model)
    lm = model.lm
    if not lm.path and lm.vocab_size <= 0:
        # A from-scratch LM sized to the tokenizer, rounded up to a multiple of 64 for faster matmuls.
        lm = replace(lm, vocab_size=-(-tokenizer.vocab_size // 64) * 64)
    if tokenizer.vocab_size > lm.vocab_size:
        raise RecipeError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the LM vocabulary has {lm.vocab_size}"
        )
    if model.path and model.image_token_id != tokenizer.image_token_id:
        raise RecipeError(f"{model.path}: the checkpoint's image token is {model.image_token_id}, "
                          f"the tokenizer's <image> is {tokenizer.image_token_id}")
    return replace(model, lm=lm, image_token_id=tokenizer.image_token_id)


def build_model(cfg: ModelConfig, tokenizer: Tokenizer):
    """The model, with the weights of the checkpoint folders the config names."""
    from paddle_mm.model import Qwen2VLModel, VisionLanguageModel
    from paddle_mm.weights.pretrained import load_pretrained_parts

    if cfg.family == "qwen2_vl":
        return Qwen2VLModel(qwen2_vl_config(cfg, tokenizer), tokenizer.special_ids())

    model = VisionLanguageModel(cfg, tokenizer.special_ids())
    load_pretrained_parts(model, cfg)
    return model


def qwen2_vl_config(cfg: ModelConfig, tokenizer: Tokenizer):
    """The Qwen2VLModelConfig of a recipe's model.family qwen2_vl (built from scratch): its vision
    section, the LM with M-RoPE, and the tokenizer's vision tokens (<|vision_start|> and
    <|video_pad|> where it has them; a ChatML tokenizer has neither, and its <image> runs are the
    blocks)."""
    from paddle_mm.config import Qwen2VLModelConfig

    if cfg.path or cfg.vision.path or cfg.lm.path:
        raise RecipeError("model.family qwen2_vl builds from scratch: model.path, vision.path and lm.path must "
                          "be empty (a Qwen2-VL folder is loaded as it is: paddle-mm infer FOLDER)")
    lm = cfg.lm
    section = list(lm.mrope_section)
    if not section:
        half = lm.hidden_size // lm.num_heads // 2
        t = half // 4
        section = [t, (half - t) // 2, half - t - (half - t) // 2]
    vision_id = tokenizer.token_to_id("<|vision_start|>")
    video_id = tokenizer.token_to_id("<|video_pad|>")
    return Qwen2VLModelConfig(
        vision=replace(cfg.qwen2_vl_vision, out_hidden_size=lm.hidden_size),
        lm=replace(lm, family="qwen2_vl", mrope_section=section), image_token_id=tokenizer.image_token_id,
        video_token_id=-1 if video_id is None else video_id,
        vision_start_token_id=-1 if vision_id is None else vision_id)


def load_checkpoint_folder(folder: str, model_type: str = "llava"):
    """(recipe, model config, tokenizer, model) of a Hugging Face LLaVA or BLIP-2 folder as
    downloaded, in eval mode: its weights, tokenizer, chat template and image processor settings.
    BLIP-2 has no chat template: it is prompted with its images' tokens and the text (PLAIN)."""
    if model_type in QWEN2_VL_TYPES:
        return _load_qwen2_vl_folder(folder)
    recipe = Recipe(model=ModelConfig(path=folder))
    recipe.train.output_dir = folder
    if model_type == "blip-2":
        from paddle_mm.weights.blip2 import load_blip2

        recipe.data.chat_template = PLAIN
        tokenizer = Tokenizer.load(folder, PLAIN)
        model = load_blip2(folder, image_token_id=tokenizer.image_token_id)
        recipe.model = replace(model.config, path="")
        recipe.data.image = image_config_from_folder(folder) or recipe.data.image
        recipe.data.image_from_checkpoint = False
        return recipe, model.config, tokenizer, model
    recipe.data.image = image_config_for(recipe)
    tokenizer = load_tokenizer(recipe, folder)
    cfg = model_config_for(recipe, tokenizer)
    model = build_model(cfg, tokenizer)
    model.eval()
    return recipe, cfg, tokenizer, model


QWEN2_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _load_qwen2_vl_folder(folder: str):
    """A Qwen2-VL / Qwen2.5-VL folder: (recipe naming it as train.init_from, its model config, tokenizer
    with the folder's chat template, the model). image_processor_for(recipe) gives its processor."""
    from paddle_mm.model import Qwen2VLModel
    from paddle_mm.weights.qwen2_vl import load_qwen2_vl, qwen2_vl_model_config

    recipe = Recipe()
    recipe.train.output_dir = folder
    recipe.train.init_from = folder
    recipe.data.image_from_checkpoint = False  # its settings are not an ImageProcessorConfig's
    tokenizer = Tokenizer.load(folder)
    cfg = qwen2_vl_model_config(folder)
    model = Qwen2VLModel(cfg, tokenizer.special_ids())
    load_qwen2_vl(model, folder)
    model.eval()
    return recipe, cfg, tokenizer, model


def read_samples(specs: list[DatasetSpec], recipe: Recipe) -> tuple[list[Sample], list[DataError]]:
    samples: list[Sample] = []
    skipped: list[DataError] = []
    for spec in specs:
        kw = {"on_error": recipe.data.on_error, "allow_outside_root": recipe.data.allow_outside_root}
        if spec.image_root:
            kw["image_root"] = spec.image_root
        if spec.format in ("llava", "llava_pairs", "chatml", "vqav2"):  # the formats that may hold a video
            kw["video_frames"] = recipe.data.video_frames
        if spec.format == "vqav2":
            kw["annotations_path"] = spec.annotations or None
            if spec.image_pattern:
                kw["image_pattern"] = spec.image_pattern
            kw["prompt_template"] = recipe.infer.vqa_prompt
        elif spec.format == "caption":
            kw["prompt"] = recipe.infer.caption_prompt
        result = read_dataset(spec.path, spec.format, **kw)
        if spec.repeat < 1:
            raise RecipeError(f"data: repeat of {spec.path} must be >= 1, got {spec.repeat}")
        samples.extend(result.samples * spec.repeat)
        skipped.extend(result.skipped)
    return samples, skipped


def image_config_for(recipe: Recipe) -> ImageProcessorConfig:
    """The image settings of the checkpoint folder the recipe names (model.path, a downloaded folder as
    train.init_from, model.vision.path), or the recipe's own."""
    if recipe.data.image_from_checkpoint:
        for folder in (recipe.model.path, _hf_init_folder(recipe), recipe.model.vision.path):
            if folder:
                found = image_config_from_folder(folder)
                if found is not None:
                    return found
    return recipe.data.image


def with_image_settings(recipe: Recipe) -> Recipe:
    """The recipe with the image settings in force written out, as a run folder saves it (the
    checkpoint folder it read them from may be gone when the run is loaded)."""
    return replace(recipe, data=replace(recipe.data, image=image_config_for(recipe), image_from_checkpoint=False))


def image_processor_for(recipe: Recipe):
    """The recipe's ImageProcessor, or a Qwen2-VL folder's own processor (images at their own size)."""
    from paddle_mm.data.qwen2_vl import Qwen2VLImageSettings, Qwen2VLProcessor, settings_from_folder
    from paddle_mm.weights.hf import whole_model_type

    init = recipe.train.init_from
    if init and whole_model_type(init) in QWEN2_VL_TYPES:
        return Qwen2VLProcessor(settings_from_folder(init))
    if recipe.model.family == "qwen2_vl":  # built here: the patch sizes of its encoder, data.image's colours
        v, im, default = recipe.model.qwen2_vl_vision, recipe.data.image, Qwen2VLImageSettings()
        return Qwen2VLProcessor(Qwen2VLImageSettings(
            patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size,
            min_pixels=im.min_pixels or default.min_pixels, max_pixels=im.max_pixels or default.max_pixels,
            mean=im.mean, std=im.std, resample=im.resample, rescale_factor=im.rescale_factor, normalize=im.normalize))
    return ImageProcessor(image_config_for(recipe))


def fixed_image_tokens(cfg: ModelConfig) -> int | None:
    """The one token count of every image, or None where each image has its own (model.family
    qwen2_vl: the processor sizes it, data/dataset.image_token_counts)."""
    return None if cfg.family == "qwen2_vl" else cfg.tokens_per_image


def without_paths(cfg: ModelConfig) -> ModelConfig:
    """The config with no checkpoint folder named: build the shape only."""
    return replace(cfg, path="", vision=replace(cfg.vision, path=""), lm=replace(cfg.lm, path=""))
