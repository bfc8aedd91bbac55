"""Typed configuration: one dataclass per component, nested into a model config and a recipe.

Recipes (YAML) are loaded into `Recipe` by `paddle_mm.recipe.load_recipe`, which rejects
unknown keys and wrong types; `validate()` methods below check the rules that span fields.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from paddle_mm.data.image import ImageProcessorConfig
from paddle_mm.errors import RecipeError


@dataclass
class VisionConfig:
    """ViT image encoder; field names follow CLIPVisionConfig so CLIP weights map 1:1.

    The same network is SigLIP's tower with class_token, pre_norm off, patch_bias on and
    hidden_act gelu_tanh (weights/siglip.py), and BLIP-2's EVA ViT with its own switches.
    """

    # A local CLIP or SigLIP folder (Hugging Face layout): its config.json sets the architecture
    # fields below and its weights are loaded; the feature selection fields stay the recipe's.
    path: str = ""
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-5
    # quick_gelu: CLIP's x * sigmoid(1.702 x); gelu: exact (erf); gelu_tanh: the tanh approximation
    # (SigLIP's "gelu_pytorch_tanh")
    hidden_act: Literal["quick_gelu", "gelu", "gelu_tanh"] = "quick_gelu"
    pre_norm: bool = True  # CLIP normalizes the embeddings before the first block
    class_token: bool = True  # a learned class token before the patches (CLIP, EVA); SigLIP has none
    # Index into [embeddings, block 1, ..., block N]; LLaVA-1.5 reads -2 (the penultimate block).
    feature_layer: int = -2
    # LLaVA's "default" strategy: drop the first position, the class token; False ("full") keeps
    # every position. Without a class token (SigLIP) the first patch is dropped, as transformers'
    # LLaVA does: a SigLIP tower wants False.
    drop_cls_token: bool = True
    post_norm: bool = False  # apply the final LayerNorm to the selected features (BLIP-2 does)
    patch_bias: bool = False  # a bias on the patch embedding: CLIP has none, BLIP-2's EVA ViT has one

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise RecipeError(
                f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise RecipeError(f"vision.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not -(self.num_layers + 1) <= self.feature_layer <= self.num_layers:
            raise RecipeError(f"vision.feature_layer {self.feature_layer} is outside 0..{self.num_layers}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_features(self) -> int:
        """Feature vectors per image: the patches, the class token if any, less a dropped first position."""
        return self.num_patches + int(self.class_token) - int(self.drop_cls_token)


@dataclass
class QFormerConfig:
    num_queries: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_every: int = 2
    layer_norm_eps: float = 1e-12
    # 0 (BLIP-2): queries read the image by content alone. > 0: each query keeps to its own cell
    # of a sqrt(Q) x sqrt(Q) grid over the image, through a learned per-head penalty on the
    # squared distance started at this strength (projectors/qformer.py says why).
    cross_attention_locality: float = 0.0


_MLP_TYPE = re.compile(r"^mlp(\d+)x_gelu$")


@dataclass
class ProjectorConfig:
    # "linear", "mlp{N}x_gelu" (LLaVA-1.5 uses mlp2x_gelu) or "qformer"
    type: str = "mlp2x_gelu"
    # Average-pool the patch grid k x k before projecting: k*k fewer image tokens for the LM.
    pool: int = 1
    qformer: QFormerConfig = field(default_factory=QFormerConfig)

    def validate(self) -> None:
        if self.type not in ("linear", "qformer") and not _MLP_TYPE.match(self.type):
            raise RecipeError(
                f"projector.type {self.type!r} is not one of linear, mlp<N>x_gelu (e.g. mlp2x_gelu), qformer"
            )
        if self.pool < 1:
            raise RecipeError(f"projector.pool must be >= 1, got {self.pool}")
        q = self.qformer
        if q.cross_attention_locality < 0:
            raise RecipeError(f"projector.qformer.cross_attention_locality must be >= 0, got {q.cross_attention_locality}")
        if q.cross_attention_locality > 0 and math.isqrt(q.num_queries) ** 2 != q.num_queries:
            raise RecipeError(f"projector.qformer.cross_attention_locality lays the queries on a square grid: "
                              f"num_queries must be a square number, got {q.num_queries}")

    @property
    def mlp_depth(self) -> int:
        match = _MLP_TYPE.match(self.type)
        return int(match.group(1)) if match else 1


@dataclass
class LMConfig:
    """The causal LM backbone: built from these fields, or loaded from `path` when it is set.

    family "opt" (lm/opt.py, BLIP-2's OPT): intermediate_size is OPT's ffn_dim, num_kv_heads
    equals num_heads, and rope_theta / rms_norm_eps are unused (learned positions, LayerNorm
    with eps 1e-5, a ReLU MLP: fixed by the family)."""

    # "qwen2_vl": the Qwen2 decoder with multimodal rotary positions (Qwen2-VL's and Qwen2.5-VL's text
    # model, lm/mrope.py), whose positions are 3 rows (temporal, height, width) split by mrope_section.
    # "qwen3_vl": Qwen3-VL's, the Qwen3 decoder with M-RoPE's rows interleaved and DeepStack inputs.
    family: Literal["qwen2", "llama", "qwen3", "opt", "qwen2_vl", "qwen3_vl"] = "qwen2"
    path: str = ""  # a local folder with config.json and weights; empty: build from the fields below
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # "flashmask" (GPU): PaddleFormers' variable-length kernel, so packed samples need no L x L mask.
    attn_implementation: Literal["eager", "sdpa", "flashmask"] = "sdpa"
    # family qwen2_vl: how many rotary frequency pairs take the temporal, height and width position
    # (they sum to head_dim / 2; Qwen2-VL-7B: 16, 24, 24).
    mrope_section: list[int] = field(default_factory=list)


@dataclass
class Qwen2VLVisionConfig:
    """Qwen2-VL's vision encoder (variant qwen2_vl: LayerNorm, a GELU MLP, full attention within
    each image) or Qwen2.5-VL's (qwen2_5_vl: RMSNorm, SwiGLU, attention within windows of
    window_size pixels except in the blocks fullatt_block_indexes names) or Qwen3-VL's (qwen3_vl:
    LayerNorm, a tanh-GELU MLP, learned positions interpolated to each grid, DeepStack features of
    the blocks deepstack_visual_indexes names for the LM's first layers). Patches are 3-D
    (temporal_patch_size frames x patch_size^2 pixels); the merger joins spatial_merge_size^2
    neighbours into one LM token of out_hidden_size."""

    variant: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"] = "qwen2_vl"
    depth: int = 32
    hidden_size: int = 1280  # Qwen2-VL's config calls it embed_dim
    intermediate_size: int = 5120  # Qwen2-VL: embed_dim * mlp_ratio
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "quick_gelu"
    out_hidden_size: int = 3584  # the LM's hidden size
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=list)
    tokens_per_second: float = 0.0  # qwen2_5_vl: a video's temporal positions per second
    num_position_embeddings: int = 2304  # qwen3_vl: a sqrt(n) x sqrt(n) table of learned positions
    deepstack_visual_indexes: list[int] = field(default_factory=list)  # qwen3_vl


@dataclass
class Qwen2VLModelConfig:
    """A Qwen2-VL / Qwen2.5-VL model: its vision encoder and merger, its M-RoPE LM (family
    qwen2_vl) and the token ids its prompts and positions use."""

    vision: Qwen2VLVisionConfig = field(default_factory=Qwen2VLVisionConfig)
    lm: LMConfig = field(default_factory=lambda: LMConfig(family="qwen2_vl", mrope_section=[16, 24, 24]))
    image_token_id: int = -1
    video_token_id: int = -1
    vision_start_token_id: int = -1
    # M-RoPE's position for the text after a vision block: "max" (transformers 4.57 and Qwen's own
    # code) or "extent" (transformers 5.x); data/qwen2_vl.py's RopeTokens says how they differ.
    mrope_advance: Literal["max", "extent"] = "max"
    path: str = ""  # the Hugging Face folder it was read from


@dataclass
class TextConfig:
    """The text side of the alignment stages: the Q-Former's text branch (`align`, sized by
    projector.qformer) or CLIP's text tower (`clip`, sized by the fields below)."""

    tokenizer: str = ""  # WordPiece: a vocab.txt, or a folder with one (a bert-base-uncased folder)
    init_from: str = ""  # align: a BERT-style folder whose weights start the Q-Former
    max_length: int = 32  # tokens per caption, [CLS] and [SEP] included; longer captions are cut
    max_position_embeddings: int = 512
    embed_dim: int = 256  # width of the contrastive embeddings (ITC / CLIP)
    hidden_size: int = 256  # clip text tower
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    layer_norm_eps: float = 1e-12


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # Filled from the tokenizer when a run starts; -1 means "not known yet".
    image_token_id: int = -1
    # A whole LLaVA checkpoint folder (Hugging Face layout): its config.json replaces the
    # vision, projector and lm fields and its weights are loaded into all three parts.
    path: str = ""
    # "qwen2_vl": a Qwen2-VL model built from scratch (model.Qwen2VLModel): the qwen2_vl_vision encoder
    # and patch merger instead of vision and projector, images at their own size, and the LM with
    # M-RoPE positions (lm.mrope_section; empty: Qwen's 1 : 1.5 : 1.5 split of the rotary pairs).
    family: Literal["llava", "qwen2_vl"] = "llava"
    qwen2_vl_vision: Qwen2VLVisionConfig = field(default_factory=Qwen2VLVisionConfig)

    def validate(self) -> None:
        grid = self.vision.image_size // self.vision.patch_size
        if grid % self.projector.pool:
            raise RecipeError(f"projector.pool {self.projector.pool} does not divide the {grid}x{grid} patch grid")
        if self.projector.pool > 1 and self.vision.num_features != self.vision.num_patches:
            if self.vision.class_token:
                raise RecipeError("projector.pool > 1 needs vision.drop_cls_token: the class token is not on the grid")
            raise RecipeError("projector.pool > 1 needs vision.drop_cls_token false for a tower without a class "
                              "token: dropping the first patch leaves no grid")

    @property
    def tokens_per_image(self) -> int:
        """How many LM positions one <image> placeholder expands to."""
        if self.family == "qwen2_vl":
            raise RecipeError("model.family qwen2_vl gives each image its own token count (data/qwen2_vl.py): "
                              "there is no one count (builder.fixed_image_tokens says so); the dpo stage and a "
                              "LLaVA export need one")
        if self.projector.type == "qformer":
            return self.projector.qformer.num_queries
        if self.vision.num_features != self.vision.num_patches:  # not the grid: no pooling (validate)
            return self.vision.num_features
        return self.vision.num_patches // (self.projector.pool**2)


@dataclass
class DatasetSpec:
    path: str
    format: Literal["llava", "llava_pairs", "chatml", "caption", "vqav2"] = "llava"  # llava_pairs: train.stage dpo
    image_root: str = ""  # default: the data file's folder
    annotations: str = ""  # VQAv2 only
    image_pattern: str = ""  # VQAv2 only
    repeat: int = 1  # how many times each sample is seen per epoch: weights datasets in a mix


@dataclass
class DataConfig:
    train: list[DatasetSpec] = field(default_factory=list)
    # Held-out sets, read and checked as train is, evaluated while training (train.eval_every)
    eval: list[DatasetSpec] = field(default_factory=list)
    tokenizer: str = ""  # a tokenizer.json file or a backbone folder holding one
    # "": the tokenizer folder's own chat template when it has one, ChatML otherwise; "chatml";
    # "plain" (no chat: images' tokens then the text, as BLIP-2 is prompted); or a Jinja template file
    chat_template: str = ""
    image: ImageProcessorConfig = field(default_factory=ImageProcessorConfig)
    # Take the image settings of the checkpoint folder (model.path, else model.vision.path) when it
    # ships them (preprocessor_config.json / processor_config.json) instead of `image` above.
    image_from_checkpoint: bool = True
    max_length: int = 2048
    # What to do with a bad record (missing image, malformed turn, too long): stop, or skip and count.
    on_error: Literal["raise", "skip"] = "raise"
    allow_outside_root: bool = False
    # Frames kept of each record's "video" (evenly spaced, first and last included); 0: every frame
    video_frames: int = 0
    system_prompt: str = ""
    # Pack several samples into each row (attention and positions confined to each sample)
    # instead of padding every row to the longest sample of its batch.
    packing: bool = False
    pack_length: int = 0  # tokens per packed row; 0: max_length


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class DPOConfig:
    """train.stage dpo (training/preference.py): preference pairs against the frozen start.

    With h = beta * ((logp_c - ref_c) - (logp_r - ref_r)), the implicit reward margin:
    sigmoid: -log sigmoid(h), with label_smoothing e the conservative form
             -(1 - e) log sigmoid(h) - e log sigmoid(-h) (the DPO paper's loss at e = 0);
    ipo:     (h / beta - 1 / (2 beta))^2 on the log-ratio margin, as IPO defines it;
    hinge:   max(0, 1 - h) (SLiC-style).
    The log-probabilities are summed over each answer's tokens; ipo takes their per-token means
    (as the IPO paper and PaddleFormers' criterion do: a sum's scale grows with the length).
    """
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    beta: float = 0.1  # how far the policy may move from the reference: smaller is freer
    label_smoothing: float = 0.0  # sigmoid only: the assumed share of pairs labelled the wrong way
    # Weight of an added next-token loss on the chosen answer (mean over its tokens), which keeps
    # the policy from lowering both answers' likelihoods at once; 0: pure DPO.
    sft_weight: float = 0.0

    def validate(self) -> None:
        if self.beta <= 0:
            raise RecipeError(f"train.dpo.beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise RecipeError(f"train.dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.sft_weight < 0:
            raise RecipeError(f"train.dpo.sft_weight must be >= 0, got {self.sft_weight}")


@dataclass
class TrainConfig:
    # align: Q-Former ITC/ITM/ITG on image-caption pairs; clip: two towers, contrastive;
    # dpo: preference pairs (format llava_pairs) from an instruct run (train.init_from)
    stage: Literal["align", "clip", "pretrain", "instruct", "dpo"] = "pretrain"
    output_dir: str = "runs/default"
    # Submodules whose parameters train; everything else is frozen. The recipe decides, not code.
    trainable: list[str] = field(default_factory=lambda: ["multi_modal_projector"])
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    init_from: str = ""  # a run folder (or model.safetensors) whose weights start this run
    projector_from: str = ""  # a projector.safetensors written by an earlier stage
    vision_from: str = ""  # a run folder (or model.safetensors) whose vision_tower starts this run
    max_steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-5
    projector_lr: float = 0.0  # 0: same as lr
    vision_lr: float = 0.0  # 0: same as lr
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoint/step-N folders kept; older ones are deleted
    # A non-finite loss: stop (saving the state before the step and the batch's sample ids) or
    # skip the batch without updating the weights.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    log_every: int = 10
    # Validation on data.eval (training/validation.py): every eval_every steps (0: only after
    # the last step) the held-out loss over its first eval_samples samples (0: all); with
    # eval_answers > 0 also the exact-match accuracy of greedy answers to that many conversations;
    # keep_best keeps the weights of the lowest held-out loss in checkpoint/best/.
    eval_every: int = 0
    eval_samples: int = 0
    eval_answers: int = 0
    keep_best: bool = False
    seed: int = 0
    num_threads: int = 0  # 0: all cores
    recompute: bool = False  # recompute each ViT block and LM layer in backward: less memory, more time
    # 0: plain data parallel; 1: optimizer states sharded over the processes (CPU and GPU);
    # 2: + gradients, 3: + parameters (GPU only).
    sharding_stage: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # mixed precision on GPU

    def validate(self) -> None:
        self.dpo.validate()
        if self.keep_checkpoints < 1:
            raise RecipeError(f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        for name, value in (("eval_every", self.eval_every), ("eval_samples", self.eval_samples),
                            ("eval_answers", self.eval_answers)):
            if value < 0:
                raise RecipeError(f"train.{name} must be >= 0, got {value}")


@dataclass
class InferConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    batch_size: int = 16
    caption_prompt: str = "<image>\nDescribe the image briefly."
    vqa_prompt: str = "<image>\n{question}"


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
