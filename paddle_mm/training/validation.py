"""Validation during training: the held-out loss over data.eval, and the exact-match accuracy
of greedy answers.

The loop (training/loop.py) evaluates every train.eval_every steps and after the last step;
an evaluating step is always a log step, and its figures join that step's metrics.jsonl record:

    eval_loss      the held-out loss over the first train.eval_samples samples of data.eval
                   (0: all of them). Next-token stages: the mean over every labelled token, the
                   same measure as the training loss. align / clip: the mean of the batch-level
                   loss over consecutive batches of train.batch_size samples.
    eval_samples   how many samples the loss covers
    eval_accuracy  train.eval_answers > 0: the share of the first eval_answers conversations
                   (llava, chatml or vqav2 data) whose greedy answer to the last turn, the turns
                   before it given, equals the reference (whitespace collapsed, case folded)
    eval_answers   how many were answered
    eval_s         the wall time the evaluation took

Validation must not change the run: it takes no gradient, puts the model back in train mode
and puts the Python, NumPy and Paddle random states back as they were (the Q-Former's hard
negatives come from a fixed stream in eval mode, alignment/qformer.py), so a run with
validation takes exactly the steps of one without, and a resumed run evaluates the same
weights an uninterrupted one does.

Under data parallelism the batches (and the conversations to answer) are dealt round-robin to
the processes; each evaluates its own on its whole copy of the model, and the sums are added
over the processes. Batches always hold train.batch_size samples, so the figures do not depend
on the number of processes.
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace

from paddle_mm import builder
from paddle_mm.config import Recipe
from paddle_mm.errors import RecipeError
from paddle_mm.training import distributed
from paddle_mm.training.batches import read_items
from paddle_mm.training.checkpoints import restore_snapshot, snapshot_rng

# Formats whose samples end in an answer worth matching exactly; a caption has many right wordings.
ANSWERED_FORMATS = ("llava", "chatml", "vqav2")


def check(recipe: Recipe) -> None:
    """Refuse validation settings that would do nothing or could not run, before anything is built."""
    cfg, specs = recipe.train, recipe.data.eval
    if not specs:
        for name, value in (("eval_every", cfg.eval_every), ("eval_samples", cfg.eval_samples),
                            ("eval_answers", cfg.eval_answers), ("keep_best", cfg.keep_best)):
            if value:
                raise RecipeError(f"train.{name} is set but data.eval lists no dataset to evaluate on")
        return
    for spec in specs:
        if spec.repeat != 1:
            raise RecipeError(f"data.eval: repeat of {spec.path} is {spec.repeat}; repeat weights a training "
                              "mix, a held-out set is read once")
    if cfg.sharding_stage == 3:
        raise RecipeError("data.eval: each process evaluates on its whole copy of the model, which "
                          "train.sharding_stage 3 splits over the processes; use stage 0, 1 or 2")
    if cfg.eval_answers:
        if cfg.stage in ("align", "clip"):
            raise RecipeError(f"train.eval_answers: the {cfg.stage} stage's model does not generate answers")
        if not any(spec.format in ANSWERED_FORMATS for spec in specs):
            raise RecipeError(f"train.eval_answers: data.eval holds no conversations to answer "
                              f"(formats {', '.join(ANSWERED_FORMATS)})")


def same_answer(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


class Validator:
    """The held-out data of a run, read once, and the evaluation of the model on it."""

    def __init__(self, recipe: Recipe, objective, model, tokenizer, model_cfg, rank: int, world: int):
        self.recipe, self.objective, self.tokenizer = recipe, objective, tokenizer
        self.rank, self.world = rank, world
        cfg = recipe.train
        samples, to_answer, skipped = [], [], []
        for spec in recipe.data.eval:
            read, bad = builder.read_samples([spec], recipe)
            samples += read
            skipped += bad
            if spec.format in ANSWERED_FORMATS:
                to_answer += read
        if cfg.eval_samples:
            samples = samples[:cfg.eval_samples]
        self.dataset = objective.build_dataset(model, samples, recipe, tokenizer, model_cfg)
        self.skipped = skipped + self.dataset.skipped
        if len(self.dataset) == 0:
            raise RecipeError("data.eval yields no usable samples")
        if self.skipped and rank == 0:
            print(f"data.eval: skipped {len(self.skipped)} bad records (data.on_error=skip); "
                  f"first: {self.skipped[0]}", file=sys.stderr)
        self.to_answer = to_answer[:cfg.eval_answers]
        self.image_processor = builder.image_processor_for(recipe) if self.to_answer else None

    def due(self, step: int) -> bool:
        every = self.recipe.train.eval_every
        return step == self.recipe.train.max_steps or (every > 0 and step % every == 0)

    def evaluate(self, model, precision) -> dict:
        """The figures of the module docstring for the model as it is now."""
        import paddle

        t0, rng = time.time(), snapshot_rng()
        model.eval()
        try:
            with paddle.no_grad():
                record = self._held_out_loss(model, precision)
                if self.to_answer:
                    record.update(self._accuracy(model))
        finally:
            model.train()
            restore_snapshot(rng)
        record["eval_s"] = time.time() - t0
        return record

    def _held_out_loss(self, model, precision) -> dict:
        size, n = self.recipe.train.batch_size, len(self.dataset)
        chunks = [range(start, min(start + size, n)) for start in range(0, n, size)]
        total = weight = 0.0
        used = 0
        for chunk in chunks[self.rank::self.world]:
            items = read_items(self.dataset, chunk, self.recipe.data.on_error, self.skipped)
            if not items:
                continue
            batch = self.objective.make_batch(items, self.tokenizer.pad_token_id, self.recipe.data)
            with precision.autocast():
                out, logits = model(**self.objective.model_inputs(batch))
            # The term is the batch's mean times its weight (a next-token term is the sum over
            # the labelled tokens; an align term, weight 1, the batch-level loss itself).
            total += float(self.objective.loss(out, logits, batch))
            weight += self.objective.held_out_weight(batch)
            used += len(items)
        total, weight, used = distributed.global_sum([total, weight, float(used)], self.world)
        return {"eval_loss": total / max(weight, 1e-12), "eval_samples": int(used)}

    def _accuracy(self, model) -> dict:
        from paddle_mm.inference.generate import generate_answers

        # Answers come back by sample id, and two data files may share ids: number them instead.
        mine = [replace(s, id=str(k)) for k, s in enumerate(self.to_answer)][self.rank::self.world]
        greedy = replace(self.recipe.infer, do_sample=False, num_beams=1)
        answers = generate_answers(model, self.tokenizer, mine, self.image_processor, greedy,
                                   system=self.recipe.data.system_prompt) if mine else {}
        right = sum(same_answer(answers[s.id], s.turns[-1][1]) for s in mine)
        right, count = distributed.global_sum([float(right), float(len(mine))], self.world)
        return {"eval_accuracy": right / max(count, 1.0), "eval_answers": int(count)}


def build_validator(recipe: Recipe, objective, model, tokenizer, model_cfg, rank: int, world: int):
    """A Validator when the recipe lists data.eval, else None."""
    if not recipe.data.eval:
        return None
    rng = snapshot_rng()  # reading the held-out data must not move training's random streams either
    try:
        return Validator(recipe, objective, model, tokenizer, model_cfg, rank, world)
    finally:
        restore_snapshot(rng)
