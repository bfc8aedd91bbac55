"""What trains and how fast: freezing by `train.trainable`, LoRA, AdamW and the learning-rate schedule."""
from __future__ import annotations

import math

from paddle_mm.config import TrainConfig
from paddle_mm.errors import RecipeError

# text_tower and align_heads exist in the alignment stages' models only.
SUBMODULES = ("vision_tower", "multi_modal_projector", "language_model", "text_tower", "align_heads")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return floor + (cfg.lr - floor) * (1 - progress)
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def apply_trainable(model, cfg: TrainConfig) -> dict[str, list]:
    """Freeze everything outside cfg.trainable; returns the trainable parameters per submodule."""
    present = [name for name in SUBMODULES if getattr(model, name, None) is not None]
    for name in cfg.trainable:
        if name not in present:
            raise RecipeError(f"train.trainable: {name!r} is not one of this stage's {tuple(present)}")
    groups: dict[str, list] = {}
    for name in present:
        params = getattr(model, name).parameters()
        train_it = name in cfg.trainable
        for p in params:
            p.stop_gradient = not train_it
        if train_it:
            groups[name] = params
    if cfg.lora.enabled:
        from paddle_mm.lm.lora import add_lora

        groups["language_model"] = add_lora(model.language_model, cfg.lora)
    return groups


def build_optimizer(groups: dict[str, list], cfg: TrainConfig):
    import paddle

    # Paddle multiplies the base rate by a parameter's optimize_attr["learning_rate"]: a ratio here.
    # (train.lr 0, a run that only writes its folder, has no ratio to take)
    scale = {
        "multi_modal_projector": (cfg.projector_lr or cfg.lr) / cfg.lr if cfg.lr else 1.0,
        "vision_tower": (cfg.vision_lr or cfg.lr) / cfg.lr if cfg.lr else 1.0,
    }
    # Set on each parameter, as a parameter group would: fleet's sharded optimizer takes no groups.
    params = []
    for name, ps in groups.items():
        for p in ps:
            p.optimize_attr["learning_rate"] = scale.get(name, 1.0)
            params.append(p)
    if not params:
        raise RecipeError("train.trainable leaves no parameter to train")
    clip = paddle.nn.ClipGradByGlobalNorm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    return paddle.optimizer.AdamW(
        learning_rate=cfg.lr, parameters=params, weight_decay=cfg.weight_decay, grad_clip=clip
    )
