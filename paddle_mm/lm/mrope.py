"""The Qwen2 decoder with multimodal rotary positions (M-RoPE): Qwen2-VL's and Qwen2.5-VL's text model;
and Qwen3-VL's (family qwen3_vl: PaddleFormers' Qwen3VLTextModel, the Qwen3 decoder with the three
rows' frequencies interleaved and DeepStack inputs).

PaddleFormers 1.0.0 has it as Qwen2_5_VLTextModel (paddleformers.transformers.qwen2_5_vl; its
qwen2_vl package holds processors only, and the two text models are the same network). It
takes position ids of 3 rows (temporal, height, width) and splits each head's rotary
frequencies between them by rope_parameters["mrope_section"]. It has no causal-LM class of its
own (only the whole Qwen2_5_VLForConditionalGeneration, vision included), so the head is added
here, with the pieces lm/adapter.py's running code reads: `.model`, `.lm_head`, `.config`, and a
forward that returns logits, the last hidden state and the cache.
"""
from __future__ import annotations

from types import SimpleNamespace

import paddle
import paddle.nn as nn

from paddle_mm.config import LMConfig


class TiedOrOwnHead(nn.Layer):
    """logits = hidden @ weight^T with weight [vocab, hidden] (torch's layout, as PaddleFormers keeps
    it); tied: the embedding's own parameter."""

    def __init__(self, vocab: int, hidden: int, tied_weight=None):
        super().__init__()
        self.weight = tied_weight if tied_weight is not None else self.create_parameter([vocab, hidden])

    def forward(self, hidden):
        return paddle.matmul(hidden, self.weight, transpose_y=True)


def _text_classes(family: str):
    """(config class, text model class, rope_scaling extras) of PaddleFormers for an LM family."""
    if family == "qwen3_vl":
        from paddleformers.transformers.qwen3_vl.configuration import Qwen3VLTextConfig
        from paddleformers.transformers.qwen3_vl.modeling import Qwen3VLTextModel

        return Qwen3VLTextConfig, Qwen3VLTextModel, {"rope_type": "default", "mrope_interleaved": True}
    from paddleformers.transformers.qwen2_5_vl.configuration import Qwen2_5_VLTextConfig
    from paddleformers.transformers.qwen2_5_vl.modeling import Qwen2_5_VLTextModel

    return Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, {"type": "mrope"}


class MRopeCausalLM(nn.Layer):
    def __init__(self, cfg: LMConfig, special_ids: dict[str, int] | None = None, attn_implementation: str = ""):
        """attn_implementation: the attention function's registered name, in place of cfg's (lm/adapter.py
        registers its packed_sdpa so)."""
        super().__init__()
        config_cls, model_cls, rope = _text_classes(cfg.family)
        if sum(cfg.mrope_section) * 2 != cfg.hidden_size // cfg.num_heads:
            raise ValueError(f"lm.mrope_section {cfg.mrope_section} must sum to head_dim / 2 = "
                             f"{cfg.hidden_size // cfg.num_heads // 2}")
        ids = special_ids or {}
        extra = {"head_dim": cfg.hidden_size // cfg.num_heads} if cfg.family == "qwen3_vl" else {}
        config = config_cls(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
            rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
            rope_scaling={**rope, "mrope_section": list(cfg.mrope_section)}, **extra,
            bos_token_id=ids.get("bos", ids.get("eos", 0)), eos_token_id=ids.get("eos", 0),
            pad_token_id=ids.get("pad", 0),
        )
        config._attn_implementation = attn_implementation or cfg.attn_implementation
        self.config = config
        self.model = model_cls(config)
        embed = self.model.embed_tokens.weight
        self.lm_head = TiedOrOwnHead(cfg.vocab_size, cfg.hidden_size, embed if cfg.tie_word_embeddings else None)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=False, return_dict=True, **kwargs):
        """position_ids: [3, B, L] (a [B, L] one is taken as text: the same in all three rows). Qwen3-VL's
        kwargs visual_pos_masks [B, L] and deepstack_visual_embeds (one [visual tokens, D] per layer)
        add the DeepStack features to the hidden states after the first layers."""
        if position_ids is not None and position_ids.ndim == 2:
            position_ids = position_ids.unsqueeze(0).expand([3, -1, -1])
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                         return_dict=True, **kwargs)
        return SimpleNamespace(logits=self.lm_head(out.last_hidden_state), last_hidden_state=out.last_hidden_state,
                               past_key_values=out.past_key_values)


def build_mrope_lm(cfg: LMConfig, special_ids: dict[str, int] | None = None,
                   attn_implementation: str = "") -> MRopeCausalLM:
    import paddleformers.transformers  # noqa: F401  (PaddleFormers' own imports, in their order)
    from paddleformers.utils.log import logger

    logger.set_level("WARNING")
    return MRopeCausalLM(cfg, special_ids, attn_implementation)
