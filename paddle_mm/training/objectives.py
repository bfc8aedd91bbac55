"""What differs between training stages: the model to build, the dataset, the loss and its weighting.

The loop (training/loop.py) is the same for every stage; it asks the objective that
`train.stage` names for these four things (and validation, training/validation.py, for the
weight of a held-out batch). A new stage (preference tuning, say) is a new
class here and a row in OBJECTIVES, not branches in the loop.

Weighting: next-token objectives sum the loss over their labelled tokens and divide by the
labelled-token count of the whole global batch (every process and micro-batch), so N
processes train exactly as one with the same global batch. The alignment objectives'
contrastive terms are batch-level: each micro-batch's term is averaged over the micro-batches
(and, through the gradient all-reduce, over the processes).
"""
from __future__ import annotations

from paddle_mm import builder
from paddle_mm.config import ModelConfig, Recipe
from paddle_mm.data.dataset import ConversationDataset
from paddle_mm.data.tokenizer import Tokenizer
from paddle_mm.errors import RecipeError
from paddle_mm.training.batches import labelled_tokens


class NextTokenObjective:
    """pretrain and instruct: next-token cross-entropy on caption or assistant tokens."""

    token_weighted = True  # the loop scales each term by world / (labelled tokens of the global batch)

    def __init__(self, stage: str):
        self.stage = stage

    def check(self, recipe: Recipe) -> None:
        pass

    def build_model(self, recipe: Recipe, model_cfg: ModelConfig, tokenizer: Tokenizer):
        return builder.build_model(model_cfg, tokenizer)

    def build_dataset(self, model, samples, recipe: Recipe, tokenizer: Tokenizer, model_cfg: ModelConfig):
        return ConversationDataset(samples, tokenizer, builder.image_processor_for(recipe),
                                   model_cfg.tokens_per_image, recipe.data.max_length, recipe.data.on_error,
                                   recipe.data.system_prompt)

    def text_vocab(self, model) -> str:
        """A second tokenizer's vocabulary file the run folder must hold ("" when none)."""
        return ""

    def loss(self, out, logits, batch: dict):
        """The micro-batch's loss term: here the sum over its labelled tokens."""
        import paddle

        from paddle_mm.model import causal_lm_loss

        return causal_lm_loss(logits, paddle.to_tensor(batch["labels"]), reduction="sum")

    def factor(self, weight: float, token_scale: float, num_batches: int) -> float:
        return weight * token_scale

    def held_out_weight(self, batch: dict) -> float:
        """What a batch's loss term weighs in the held-out mean: its labelled tokens, so the mean
        is over every held-out token, as a step's loss is over the global batch's."""
        return float(labelled_tokens(batch))


class AlignObjective:
    """align (BLIP-2's Q-Former: ITC, ITM, ITG) and clip (two towers, contrastive)."""

    token_weighted = False

    def __init__(self, stage: str):
        self.stage = stage

    def check(self, recipe: Recipe) -> None:
        if recipe.data.packing:
            raise RecipeError(f"data.packing: the {self.stage} stage compares whole image-caption pairs; "
                              "it cannot pack them")

    def build_model(self, recipe: Recipe, model_cfg: ModelConfig, tokenizer: Tokenizer):
        from paddle_mm.alignment.stages import build_align_model, init_text_weights

        model = build_align_model(self.stage, model_cfg, recipe.train.seed)
        init_text_weights(model, model_cfg)
        return model

    def build_dataset(self, model, samples, recipe: Recipe, tokenizer: Tokenizer, model_cfg: ModelConfig):
        from paddle_mm.alignment.stages import build_dataset

        return build_dataset(model, samples, recipe)

    def text_vocab(self, model) -> str:
        return model.text_tokenizer.vocab_file

    def loss(self, out, logits, batch: dict):
        """The model's forward already returns the weighted sum of the stage's batch-level terms."""
        return out

    def factor(self, weight: float, token_scale: float, num_batches: int) -> float:
        return weight / num_batches

    def held_out_weight(self, batch: dict) -> float:
        """Each batch weighs 1: the contrastive terms are batch-level (means over the batch)."""
        return 1.0


OBJECTIVES = {"pretrain": NextTokenObjective, "instruct": NextTokenObjective,
              "align": AlignObjective, "clip": AlignObjective}


def objective_for(stage: str):
    if stage not in OBJECTIVES:
        raise RecipeError(f"train.stage: {stage!r} is not one of {tuple(OBJECTIVES)}")
    return OBJECTIVES[stage](stage)
