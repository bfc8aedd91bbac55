"""OPT, the decoder-only LM of the Salesforce BLIP-2 checkpoints (blip2-opt-*), in Paddle.

PaddleFormers 1.0 has no OPT, so it is written here. lm/adapter.py builds it for family "opt"
and runs it exactly as it runs the PaddleFormers families: `OPTForCausalLM` answers the same
call (inputs_embeds, a [B, past + L] padding mask or a dense boolean [B, 1, L, L] mask,
position_ids, past_key_values with get_seq_length() and reorder_cache(), use_cache) and has the
same pieces (`.model` giving last_hidden_state / past_key_values, `.lm_head`, `.config` with
`_attn_implementation`, get_input_embeddings). Parameter names are transformers' OPTForCausalLM
names (model.decoder.layers.{i}.self_attn.q_proj.weight, ...), so weights/llm.py's name table
only transposes the Linear weights.

OPT, as the 125m and 1.3b-and-larger checkpoints are built (do_layer_norm_before=True):
token embedding + learned position embedding read at row position + 2 (fairseq's padding
offset; a row's positions count its real tokens, so left padding changes nothing), decoder
layers x -> x + attn(LN(x)) -> x + fc2(relu(fc1(LN(x)))), queries scaled by head_dim ** -0.5,
biases on every projection, LayerNorm eps 1e-5, a final LayerNorm, and an LM head tied to the
token embedding. No dropout is applied (paddle_mm's LMs carry none). The post-LN OPT-350m and a
word_embed_proj_dim other than hidden_size are refused where a config is read (weights/llm.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from paddle_mm.config import LMConfig

POSITION_OFFSET = 2  # OPT reads its position table at position + 2


@dataclass
class OPTConfig:
    """The architecture, and the fields the code around an LM reads from `lm.config`."""

    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 2
    eos_token_id: int = 2
    pad_token_id: int = 1
    _attn_implementation: str = "sdpa"  # "eager" or "sdpa" (Paddle's fused attention)
    # lm/adapter.enable_recompute sets these (the PaddleFormers field names); "full" recomputes each layer
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    tensor_model_parallel_size: int = 1  # PaddleFormers' LoRA reads it; OPT here is never split

    @classmethod
    def from_lm_config(cls, cfg: LMConfig, special_ids: dict[str, int] | None = None) -> OPTConfig:
        if cfg.attn_implementation not in ("eager", "sdpa"):
            raise ValueError(f"lm.attn_implementation {cfg.attn_implementation!r} is not available for family 'opt' "
                             "(use sdpa or eager)")
        if cfg.num_kv_heads != cfg.num_heads:
            raise ValueError(f"OPT has as many key/value heads as query heads: lm.num_kv_heads {cfg.num_kv_heads} "
                             f"!= lm.num_heads {cfg.num_heads}")
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"lm.hidden_size {cfg.hidden_size} is not divisible by lm.num_heads {cfg.num_heads}")
        ids = special_ids or {}
        return cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, ffn_dim=cfg.intermediate_size,
                   num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                   max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
                   bos_token_id=ids.get("bos", 2), eos_token_id=ids.get("eos", 2), pad_token_id=ids.get("pad", 1),
                   _attn_implementation=cfg.attn_implementation)


@dataclass
class OPTOutput:
    last_hidden_state: paddle.Tensor
    past_key_values: OPTCache | None = None
    logits: paddle.Tensor | None = None


class OPTCache:
    """Keys and values of the positions seen so far, per layer: [B, T, heads, head_dim]."""

    def __init__(self, num_layers: int):
        self.keys: list[paddle.Tensor | None] = [None] * num_layers
        self.values: list[paddle.Tensor | None] = [None] * num_layers

    def get_seq_length(self) -> int:
        return 0 if self.keys[0] is None else int(self.keys[0].shape[1])

    def update(self, layer: int, key, value):
        """Append this step's key and value; returns all of the layer's keys and values."""
        if self.keys[layer] is not None:
            key = paddle.concat([self.keys[layer], key], axis=1)
            value = paddle.concat([self.values[layer], value], axis=1)
        self.keys[layer], self.values[layer] = key, value
        return key, value

    def reorder_cache(self, beam_idx) -> None:
        """Keep the rows beam search chose (beam_idx: the source row of each new row)."""
        self.keys = [None if k is None else paddle.gather(k, beam_idx, axis=0) for k in self.keys]
        self.values = [None if v is None else paddle.gather(v, beam_idx, axis=0) for v in self.values]


class OPTAttention(nn.Layer):
    def __init__(self, config: OPTConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x, bias, cache: OPTCache | None):
        """x [B, L, D]; bias [B, 1, L, S] additive (0 or the dtype's lowest value) over the S keys."""
        b, length, d = x.shape
        shape = [b, length, self.num_heads, self.head_dim]
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.config._attn_implementation == "sdpa":
            if q.dtype != paddle.float32:  # the fp32 lowest value would be -inf in fp16
                bias = paddle.clip(bias, min=float(paddle.finfo(q.dtype).min)).astype(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, training=False)
        else:
            # Queries scaled before the product, as OPT does; softmax in fp32.
            q = (q * self.scaling).transpose([0, 2, 1, 3])
            scores = paddle.matmul(q, k.transpose([0, 2, 1, 3]), transpose_y=True).astype("float32") + bias
            probs = F.softmax(scores, axis=-1).astype(v.dtype)
            out = paddle.matmul(probs, v.transpose([0, 2, 1, 3])).transpose([0, 2, 1, 3])
        return self.out_proj(out.reshape([b, length, d]))


class OPTDecoderLayer(nn.Layer):
    def __init__(self, config: OPTConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.self_attn = OPTAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(d, epsilon=config.layer_norm_eps)
        self.fc1 = nn.Linear(d, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d, epsilon=config.layer_norm_eps)

    def forward(self, x, bias, cache: OPTCache | None = None):
        x = x + self.self_attn(self.self_attn_layer_norm(x), bias, cache)
        return x + self.fc2(F.relu(self.fc1(self.final_layer_norm(x))))


def _key_mask(attention_mask, batch: int, length: int, past: int):
    """A boolean [B, 1, L, past + L] mask (True: may attend) from what run_language_model passes:
    None, a [B, past + L] padding mask (causal added here) or a dense [B, 1, L, L] mask (used as given)."""
    total = past + length
    if attention_mask is not None and attention_mask.ndim == 4:
        if past:
            raise ValueError("a dense [B, 1, L, L] attention mask cannot be combined with a KV cache")
        return attention_mask.astype("bool")
    rows = paddle.arange(past, total, dtype="int64").reshape([1, 1, length, 1])
    cols = paddle.arange(total, dtype="int64").reshape([1, 1, 1, total])
    allowed = cols <= rows
    if attention_mask is not None:
        if attention_mask.shape[-1] != total:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, the cache and the input "
                             f"{past} + {length}")
        allowed = allowed & (attention_mask.reshape([batch, 1, 1, total]) != 0)
    return allowed


def positions_from_mask(attention_mask, past: int = 0):
    """OPT's own positions: the k-th real token of a row is at k (padding at -1); the last L columns."""
    mask = attention_mask.astype("int64")
    return (paddle.cumsum(mask, axis=-1) * mask - 1)[:, past:]


class OPTDecoder(nn.Layer):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size)
        self.layers = nn.LayerList([OPTDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps)

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False) -> OPTOutput:
        b, length = inputs_embeds.shape[:2]
        cache = past_key_values
        if use_cache and cache is None:
            cache = OPTCache(len(self.layers))
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                position_ids = positions_from_mask(attention_mask, past)
            else:
                position_ids = paddle.arange(past, past + length, dtype="int64").expand([b, length])
        if int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"position {int(position_ids.max())} is past OPT's max_position_embeddings "
                             f"{self.config.max_position_embeddings}: the prompt and the new tokens are too long")
        allowed = _key_mask(attention_mask, b, length, past)
        bias = paddle.where(allowed, paddle.zeros([], "float32"),
                            paddle.full([], paddle.finfo(paddle.float32).min, "float32"))
        positions = self.embed_positions(position_ids.astype("int64") + POSITION_OFFSET)
        x = inputs_embeds + positions.astype(inputs_embeds.dtype)
        full_recompute = self.config.recompute_granularity == "full" and self.training and cache is None
        for layer in self.layers:
            if full_recompute and not x.stop_gradient:
                from paddle.distributed.fleet.utils import recompute

                x = recompute(layer, x, bias)
            else:
                x = layer(x, bias, cache)
        return OPTOutput(self.final_layer_norm(x), cache if use_cache else None)


class OPTModel(nn.Layer):
    """The decoder without the LM head (what run_language_model calls `lm.model`)."""

    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.decoder = OPTDecoder(config)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=False, return_dict=True) -> OPTOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.decoder.embed_tokens(input_ids)
        return self.decoder(inputs_embeds, attention_mask, position_ids, past_key_values, use_cache)


class OPTLMHead(nn.Layer):
    """hidden [.., D] -> logits [.., V] with a [V, D] weight: the token embedding itself when tied."""

    def __init__(self, config: OPTConfig, embedding: nn.Embedding):
        super().__init__()
        if config.tie_word_embeddings:
            self.weight = embedding.weight
        else:
            self.weight = self.create_parameter([config.vocab_size, config.hidden_size],
                                                default_initializer=nn.initializer.Normal(std=0.02))

    def forward(self, hidden):
        return paddle.matmul(hidden, self.weight, transpose_y=True)


class OPTForCausalLM(nn.Layer):
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.lm_head = OPTLMHead(config, self.model.decoder.embed_tokens)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=False, return_dict=True) -> OPTOutput:
        out = self.model(input_ids, inputs_embeds, attention_mask, position_ids, past_key_values, use_cache)
        out.logits = self.lm_head(out.last_hidden_state)
        return out


def build_opt(cfg: LMConfig, special_ids: dict[str, int] | None = None) -> OPTForCausalLM:
    return OPTForCausalLM(OPTConfig.from_lm_config(cfg, special_ids))
