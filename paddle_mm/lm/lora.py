"""LoRA on the language model, through PaddleFormers' peft (its LoRALinear replaces layers in place)."""
from __future__ import annotations

from paddle_mm.config import LoraConfig


def add_lora(language_model, cfg: LoraConfig) -> list:
    """Wrap the target Linear layers of the LM with LoRA; only the LoRA matrices train.

    Returns the trainable parameters. Names gain `.lora_A` / `.lora_B` beside the frozen
    `.weight`, so a run folder's model.safetensors holds both.
    """
    from paddleformers.peft import LoRAConfig, LoRAModel

    pf_cfg = LoRAConfig(
        target_modules=[f".*{name}$" for name in cfg.target_modules],
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        merge_weights=False,
    )
    wrapper = LoRAModel(language_model, pf_cfg)  # edits language_model's layers in place
    wrapper.mark_only_lora_as_trainable()
    return [p for p in language_model.parameters() if not p.stop_gradient]
