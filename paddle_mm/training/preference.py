"""Preference tuning (train.stage dpo): the pair dataset, the reference log-probabilities, the losses.

A pair is one conversation with two final answers (data format llava_pairs). A batch of B
pairs is one padded batch of 2B rows, the B chosen rows then the B rejected rows, each with
its images, so the policy scores both answers in one forward.

The reference model is the policy's start (train.init_from): the dataset scores every pair
with it once, when it is built (before the first step and before a checkpoint is loaded on
resume, so a resumed run keeps the same reference), and keeps the two log-probabilities with
the pair. That costs one forward over the data up front and no second copy of the model.

The losses follow DPOConfig's docstring (paddle_mm/config.py); PaddleFormers'
dpo_criterion.py computes the same formulas (tests/training/test_preference.py compares).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from paddle_mm.config import DPOConfig
from paddle_mm.data.dataset import Encoded, collate, encode_each, encode_sample
from paddle_mm.data.readers import Sample, pair_turns
from paddle_mm.data.tokenizer import IGNORE_INDEX

# The sums over a logging interval that DPOObjective reports (see figures_of).
FIGURE_SUMS = ("pairs", "reward_margin", "reward_correct", "chosen_logp", "rejected_logp",
               "chosen_reward", "rejected_reward")


def answer_logps(token_nll, labels, average: bool = False):
    """Each row's log-probability of its labelled tokens (the answer): the sum, or with average
    the mean per token. token_nll [B, L]: the model's per-token next-token NLL (model.next_token_nll,
    zero outside the answer); labels [B, L] (IGNORE_INDEX outside the answer)."""
    import paddle

    total = -token_nll.sum(axis=1)
    if not average:
        return total
    return total / paddle.clip((labels[:, 1:] != IGNORE_INDEX).astype("float32").sum(axis=1), min=1.0)


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg: DPOConfig):
    """Per-pair loss [B] and the implicit rewards beta * (policy - reference) of both answers."""
    import paddle.nn.functional as F

    chosen_reward = cfg.beta * (policy_chosen - ref_chosen)
    rejected_reward = cfg.beta * (policy_rejected - ref_rejected)
    h = chosen_reward - rejected_reward  # beta times the margin of the log-ratios
    if cfg.loss == "sigmoid":
        loss = -(1 - cfg.label_smoothing) * F.log_sigmoid(h) - cfg.label_smoothing * F.log_sigmoid(-h)
    elif cfg.loss == "ipo":
        loss = (h / cfg.beta - 1 / (2 * cfg.beta)) ** 2
    elif cfg.loss == "hinge":
        loss = F.relu(1 - h)
    else:
        raise ValueError(f"train.dpo.loss: unknown {cfg.loss!r}")
    return loss, chosen_reward.detach(), rejected_reward.detach()


def figures_of(sums: dict) -> dict:
    """The logged means of an interval's sums: reward margin and accuracy (the share of pairs whose
    chosen answer gets the higher reward), the answers' log-probabilities and rewards."""
    n = max(sums.get("pairs", 0.0), 1.0)
    return {"reward_margin": sums.get("reward_margin", 0.0) / n,
            "reward_accuracy": sums.get("reward_correct", 0.0) / n,
            "chosen_logp": sums.get("chosen_logp", 0.0) / n, "rejected_logp": sums.get("rejected_logp", 0.0) / n,
            "chosen_reward": sums.get("chosen_reward", 0.0) / n,
            "rejected_reward": sums.get("rejected_reward", 0.0) / n}


@dataclass
class EncodedPair:
    sample: Sample  # its turns end with the chosen answer
    chosen: Encoded
    rejected: Encoded
    ref_chosen: float = 0.0  # the reference model's log-probabilities (see the module docstring)
    ref_rejected: float = 0.0

    # The loop sorts and counts items by these: both rows of the pair are stepped over.
    @property
    def input_ids(self) -> np.ndarray:
        return np.concatenate([self.chosen.input_ids, self.rejected.input_ids])

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([self.chosen.labels, self.rejected.labels])


class PairDataset:
    """Tokenized preference pairs with their images and the reference's log-probabilities."""

    def __init__(self, samples, tokenizer, image_processor, tokens_per_image: int, max_length: int,
                 on_error: str = "raise", system: str = ""):
        self.image_processor = image_processor

        def encode(sample) -> EncodedPair:
            _, rejected_turns = pair_turns(sample)
            return EncodedPair(sample, encode_sample(sample, tokenizer, tokens_per_image, max_length, system),
                               _encode_turns(sample, rejected_turns, tokenizer, tokens_per_image, max_length, system))

        self.items, self.skipped = encode_each(samples, encode, on_error)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        pixels = self.image_processor(item.sample.images) if item.sample.images else None
        row = {"id": item.sample.id, "pixel_values": pixels}
        return {"id": item.sample.id, "pixel_values": pixels, "ref": (item.ref_chosen, item.ref_rejected),
                "chosen": {**row, "input_ids": item.chosen.input_ids, "labels": item.chosen.labels},
                "rejected": {**row, "input_ids": item.rejected.input_ids, "labels": item.rejected.labels}}

    def score_reference(self, model, pad_token_id: int, batch_size: int, average: bool) -> None:
        """Store the (frozen) model's log-probabilities of both answers of every pair (per-token means
        with average, as answer_logps); no gradients."""
        import paddle

        from paddle_mm.training.batches import batch_inputs

        was_training = model.training
        model.eval()
        with paddle.no_grad():
            for start in range(0, len(self.items), batch_size):
                idx = range(start, min(start + batch_size, len(self.items)))
                batch = collate_pairs([self[i] for i in idx], pad_token_id)
                token_nll, _ = model(**batch_inputs(batch, labels=True))
                logps = answer_logps(token_nll, paddle.to_tensor(batch["labels"]), average).numpy()
                for k, i in enumerate(idx):
                    self.items[i].ref_chosen, self.items[i].ref_rejected = float(logps[k]), float(logps[len(idx) + k])
        if was_training:
            model.train()


def _encode_turns(sample, turns, tokenizer, tokens_per_image: int, max_length: int, system: str) -> Encoded:
    """The rejected answer's row, checked as every trained sequence is (its errors name the record)."""
    return encode_sample(replace(sample, turns=turns), tokenizer, tokens_per_image, max_length, system)


def collate_pairs(items: list[dict], pad_token_id: int) -> dict:
    """B pairs -> one padded batch of 2B rows (chosen rows, then rejected rows; the images twice, in
    that row order) with the reference log-probabilities as ref_chosen / ref_rejected [B]."""
    batch = collate([x["chosen"] for x in items] + [x["rejected"] for x in items], pad_token_id)
    batch["ids"] = [x["id"] for x in items]
    batch["ref_chosen"] = np.array([x["ref"][0] for x in items], dtype="float32")
    batch["ref_rejected"] = np.array([x["ref"][1] for x in items], dtype="float32")
    return batch
