"""What differs between training stages: the model to build, the dataset, the loss and its weighting.

The loop (training/loop.py) is the same for every stage; it asks the objective that
`train.stage` names for these four things (and validation, training/validation.py, for the
weight of a held-out batch). A new stage is a new class here and a row in OBJECTIVES, not
branches in the loop; the Objective base holds the defaults most stages keep (batching as
data.packing says, no second vocabulary, no figures beyond the loss).

Weighting: next-token objectives sum the loss over their labelled tokens and divide by the
labelled-token count of the whole global batch (every process and micro-batch), so N
processes train exactly as one with the same global batch. The alignment objectives'
contrastive terms and DPO's per-pair mean are batch-level: each micro-batch's term is averaged
over the micro-batches (and, through the gradient all-reduce, over the processes).
"""
from __future__ import annotations

from paddle_mm import builder
from paddle_mm.config import ModelConfig, Recipe
from paddle_mm.data.dataset import ConversationDataset
from paddle_mm.data.tokenizer import Tokenizer
from paddle_mm.errors import RecipeError
from paddle_mm.training import preference
from paddle_mm.training.batches import batch_inputs, labelled_tokens, make_batch


class Objective:
    """What every stage shares unless it says otherwise."""

    token_weighted = False
    figure_sums: tuple[str, ...] = ()  # sums loss() adds into its `figures` dict, logged per interval

    def check(self, recipe: Recipe) -> None:
        pass

    def make_batch(self, items: list[dict], pad_token_id: int, data_cfg) -> dict:
        return make_batch(items, pad_token_id, data_cfg)

    # With labels, VisionLanguageModel returns per-token losses and projects only the labelled
    # positions onto the vocabulary; the align models take no labels.
    model_takes_labels = False

    def model_inputs(self, batch: dict) -> dict:
        """The model's keyword arguments for a batch; loss() gets what the model returns for them."""
        return batch_inputs(batch, labels=self.model_takes_labels)

    def text_vocab(self, model) -> str:
        """A second tokenizer's vocabulary file the run folder must hold ("" when none)."""
        return ""

    def figures(self, sums: dict) -> dict:
        """The logged figures of an interval's figure_sums (summed over every process)."""
        return {}


class NextTokenObjective(Objective):
    """pretrain and instruct: next-token cross-entropy on caption or assistant tokens."""

    token_weighted = True  # the loop scales each term by world / (labelled tokens of the global batch)
    model_takes_labels = True

    def __init__(self, stage: str):
        self.stage = stage

    def build_model(self, recipe: Recipe, model_cfg: ModelConfig, tokenizer: Tokenizer):
        return builder.build_model(model_cfg, tokenizer)

    def build_dataset(self, model, samples, recipe: Recipe, tokenizer: Tokenizer, model_cfg: ModelConfig):
        rope_tokens = model.rope_tokens() if hasattr(model, "rope_tokens") else None  # M-RoPE: items' positions
        return ConversationDataset(samples, tokenizer, builder.image_processor_for(recipe),
                                   builder.fixed_image_tokens(model_cfg), recipe.data.max_length, recipe.data.on_error,
                                   recipe.data.system_prompt, rope_tokens)


    def loss(self, out, logits, batch: dict, figures: dict | None = None):
        """The micro-batch's loss term: here the sum over its labelled tokens (out: the model's
        per-token next-token NLL)."""
        return out.sum()

    def factor(self, weight: float, token_scale: float, num_batches: int) -> float:
        return weight * token_scale

    def held_out_weight(self, batch: dict) -> float:
        """What a batch's loss term weighs in the held-out mean: its labelled tokens, so the mean
        is over every held-out token, as a step's loss is over the global batch's."""
        return float(labelled_tokens(batch))


class AlignObjective(Objective):
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

    def loss(self, out, logits, batch: dict, figures: dict | None = None):
        """The model's forward already returns the weighted sum of the stage's batch-level terms."""
        return out

    def factor(self, weight: float, token_scale: float, num_batches: int) -> float:
        return weight / num_batches

    def held_out_weight(self, batch: dict) -> float:
        """Each batch weighs 1: the contrastive terms are batch-level (means over the batch)."""
        return 1.0


class DPOObjective(Objective):
    """dpo: preference pairs against the frozen start (training/preference.py); per-pair mean loss."""

    figure_sums = preference.FIGURE_SUMS
    model_takes_labels = True

    def __init__(self, stage: str):
        self.stage = stage
        self.cfg = None  # train.dpo, set by build_dataset

    def check(self, recipe: Recipe) -> None:
        if not recipe.train.init_from:
            raise RecipeError("train.stage dpo: train.init_from must name the instruct run the policy starts "
                              "from (it is also the frozen reference)")
        if recipe.data.packing:
            raise RecipeError("data.packing: the dpo stage scores whole answers per row; it cannot pack them")
        for spec in recipe.data.train + recipe.data.eval:
            if spec.format != "llava_pairs":
                raise RecipeError(f"train.stage dpo reads preference pairs: {spec.path} has format "
                                  f"{spec.format!r}, not 'llava_pairs'")
        if recipe.train.eval_answers:
            raise RecipeError("train.eval_answers: the dpo stage's held-out figure is its loss on pairs; "
                              "score answers with `paddle-mm eval` on the finished run")

    def build_model(self, recipe: Recipe, model_cfg: ModelConfig, tokenizer: Tokenizer):
        return builder.build_model(model_cfg, tokenizer)

    def build_dataset(self, model, samples, recipe: Recipe, tokenizer: Tokenizer, model_cfg: ModelConfig):
        """The pairs, scored by the model as it is now: the loop builds datasets right after loading
        train.init_from, so this is the reference."""
        self.cfg = recipe.train.dpo
        dataset = preference.PairDataset(samples, tokenizer, builder.image_processor_for(recipe),
                                         model_cfg.tokens_per_image, recipe.data.max_length, recipe.data.on_error,
                                         recipe.data.system_prompt)
        dataset.score_reference(model, tokenizer.pad_token_id, recipe.train.batch_size, self._average)
        return dataset

    @property
    def _average(self) -> bool:
        return self.cfg.loss == "ipo"

    def make_batch(self, items: list[dict], pad_token_id: int, data_cfg) -> dict:
        return preference.collate_pairs(items, pad_token_id)

    def loss(self, out, logits, batch: dict, figures: dict | None = None):
        """The mean over the micro-batch's pairs (+ sft_weight times the chosen rows' next-token mean);
        out: the model's per-token next-token NLL of the 2B rows."""
        import paddle

        from paddle_mm.model import mean_nll

        labels = paddle.to_tensor(batch["labels"])
        b = len(batch["ref_chosen"])
        logps = preference.answer_logps(out, labels, self._average)
        chosen, rejected = logps[:b], logps[b:]
        losses, chosen_reward, rejected_reward = preference.preference_loss(
            chosen, rejected, paddle.to_tensor(batch["ref_chosen"]), paddle.to_tensor(batch["ref_rejected"]), self.cfg)
        term = losses.mean()
        if self.cfg.sft_weight:
            term = term + self.cfg.sft_weight * mean_nll(out[:b], labels[:b])
        if figures is not None:
            margin = (chosen_reward - rejected_reward).numpy()
            for key, value in (("pairs", b), ("reward_margin", margin.sum()), ("reward_correct", (margin > 0).sum()),
                               ("chosen_logp", float(chosen.detach().sum())),
                               ("rejected_logp", float(rejected.detach().sum())),
                               ("chosen_reward", float(chosen_reward.sum())),
                               ("rejected_reward", float(rejected_reward.sum()))):
                figures[key] = figures.get(key, 0.0) + float(value)
        return term

    def factor(self, weight: float, token_scale: float, num_batches: int) -> float:
        return weight / num_batches

    def held_out_weight(self, batch: dict) -> float:
        return 1.0  # each held-out batch's term is already a mean over its pairs

    def figures(self, sums: dict) -> dict:
        return preference.figures_of(sums)


OBJECTIVES = {"pretrain": NextTokenObjective, "instruct": NextTokenObjective,
              "align": AlignObjective, "clip": AlignObjective, "dpo": DPOObjective}


def objective_for(stage: str):
    if stage not in OBJECTIVES:
        raise RecipeError(f"train.stage: {stage!r} is not one of {tuple(OBJECTIVES)}")
    return OBJECTIVES[stage](stage)
