"""Start the Q-Former from a BERT-style text encoder (BLIP-2 starts from bert-base-uncased).

A local folder with config.json, vocab.txt and safetensors weights in the transformers BERT
layout (BertModel names, or with the "bert." prefix and the "cls." MLM head of
BertForPreTraining / BertForMaskedLM; LayerNorm "gamma"/"beta" of older files accepted).

BERT's layers become the Q-Former's: self-attention (shared by queries and text), and the
feed-forward copied to both the text FFN and the query FFN (BLIP-2 initializes
``intermediate_query``/``output_query`` from ``intermediate``/``output``). Cross-attention,
the query tokens and the ITC/ITM heads have no BERT counterpart and keep their fresh
initialization. BERT adds token_type_embeddings[0] to every token; the Q-Former has no token
types, so that row is folded into the position embeddings, which keeps BERT's output exact.
[DEC] (appended after BERT's vocabulary) keeps its fresh embedding row.
"""
from __future__ import annotations

import re

import numpy as np

from paddle_mm.errors import CheckpointError
from paddle_mm.weights.blip2 import apply_table, linear, same
from paddle_mm.weights.hf import read_config, read_tensors

# Present in BERT checkpoints, with nothing to go to in the Q-Former.
_UNUSED = re.compile(r"^(bert\.)?(pooler\..*|embeddings\.position_ids|embeddings\.token_type_embeddings\.weight)$"
                     r"|^cls\.seq_relationship\..*|^cls\.predictions\.decoder\.(weight|bias)$")


def _canonical(name: str) -> str:
    name = name[len("bert."):] if name.startswith("bert.") else name
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def bert_rows(num_layers: int, has_mlm_head: bool) -> list[tuple]:
    """(BERT name, our name, transform); names relative to QFormerAligner."""
    rows = [
        ("embeddings.LayerNorm.weight", "multi_modal_projector.query_norm.weight", same),
        ("embeddings.LayerNorm.bias", "multi_modal_projector.query_norm.bias", same),
    ]
    for i in range(num_layers):
        src, q, t = f"encoder.layer.{i}.", f"multi_modal_projector.layers.{i}.", f"text_tower.layers.{i}."
        for bert, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            rows += [(f"{src}attention.self.{bert}.weight", f"{q}attn.{ours}.weight", linear),
                     (f"{src}attention.self.{bert}.bias", f"{q}attn.{ours}.bias", same)]
        rows += [(src + "attention.output.dense.weight", q + "attn.out_proj.weight", linear),
                 (src + "attention.output.dense.bias", q + "attn.out_proj.bias", same),
                 (src + "attention.output.LayerNorm.weight", q + "attn_norm.weight", same),
                 (src + "attention.output.LayerNorm.bias", q + "attn_norm.bias", same)]
        for dst in (q, t):  # one BERT feed-forward starts both the query and the text FFN
            rows += [(src + "intermediate.dense.weight", dst + "mlp.fc1.weight", linear),
                     (src + "intermediate.dense.bias", dst + "mlp.fc1.bias", same),
                     (src + "output.dense.weight", dst + "mlp.fc2.weight", linear),
                     (src + "output.dense.bias", dst + "mlp.fc2.bias", same),
                     (src + "output.LayerNorm.weight", dst + "mlp_norm.weight", same),
                     (src + "output.LayerNorm.bias", dst + "mlp_norm.bias", same)]
    if has_mlm_head:
        rows += [("cls.predictions.transform.dense.weight", "align_heads.lm_dense.weight", linear),
                 ("cls.predictions.transform.dense.bias", "align_heads.lm_dense.bias", same),
                 ("cls.predictions.transform.LayerNorm.weight", "align_heads.lm_norm.weight", same),
                 ("cls.predictions.transform.LayerNorm.bias", "align_heads.lm_norm.bias", same)]
    return rows


def check_config(raw: dict, model, source: str) -> None:
    """The Q-Former's sizes must be BERT's; say which differ."""
    q, text = model.config.projector.qformer, model.config.text
    pairs = [("hidden_size", raw.get("hidden_size"), q.hidden_size),
             ("num_hidden_layers", raw.get("num_hidden_layers"), q.num_layers),
             ("num_attention_heads", raw.get("num_attention_heads"), q.num_heads),
             ("intermediate_size", raw.get("intermediate_size"), q.intermediate_size),
             ("max_position_embeddings", raw.get("max_position_embeddings"), text.max_position_embeddings)]
    wrong = [f"{k} {b} vs {ours}" for k, b, ours in pairs if b != ours]
    if raw.get("hidden_act", "gelu") != "gelu":
        wrong.append(f"hidden_act {raw.get('hidden_act')} (the Q-Former uses exact gelu)")
    if wrong:
        raise CheckpointError(f"{source}: BERT config does not fit the Q-Former (BERT vs model: {'; '.join(wrong)})")


def load_bert_into_qformer(model, folder: str) -> None:
    """Copy a BERT folder's weights into a QFormerAligner (see the module note)."""
    source = f"{folder} (BERT)"
    check_config(read_config(folder), model, source)
    tensors = {_canonical(k): v for k, v in read_tensors(folder).items()}
    state = model.state_dict()
    q = model.config.projector.qformer
    table = bert_rows(q.num_layers, "cls.predictions.transform.dense.weight" in tensors)
    expected = {k: list(v.shape) for k, v in state.items()}
    for name in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
        if name not in tensors:
            raise CheckpointError(f"{source}: {name} is missing")
    skip = re.compile(_UNUSED.pattern + r"|^embeddings\.(word|position)_embeddings\.weight$|^cls\.predictions\.bias$")
    out = apply_table(table, tensors, expected, source, skip=skip)

    words = tensors["embeddings.word_embeddings.weight"]
    ours = state["text_tower.word_embeddings.weight"].numpy().copy()
    if words.shape[1] != ours.shape[1] or words.shape[0] > ours.shape[0]:
        raise CheckpointError(f"{source}: word embeddings {list(words.shape)} do not fit the text vocabulary "
                              f"{list(ours.shape)} (is model.text.tokenizer this folder's vocab.txt?)")
    ours[: words.shape[0]] = words
    out["text_tower.word_embeddings.weight"] = ours
    positions = tensors["embeddings.position_embeddings.weight"].copy()
    token_type = tensors.get("embeddings.token_type_embeddings.weight")
    if token_type is not None:
        positions += token_type[0]
    out["text_tower.position_embeddings.weight"] = positions
    if "cls.predictions.bias" in tensors:
        bias = state["align_heads.lm_bias"].numpy().copy()
        bias[: words.shape[0]] = tensors["cls.predictions.bias"]
        out["align_heads.lm_bias"] = bias
    for name, value in out.items():
        if list(value.shape) != expected[name]:
            raise CheckpointError(f"{source}: {name} {list(value.shape)} vs model {expected[name]}")
        state[name].set_value(np.ascontiguousarray(value, dtype=np.float32))
