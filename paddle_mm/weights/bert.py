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
from paddle_mm.weights.hf import read_config, read_tensors
from paddle_mm.weights.mapping import Rule, Table, listed_names, to_paddle_mm

_LAYER = "encoder.layer.{i}."
_QUERY_LAYER = "multi_modal_projector.layers.{i}."

# Names after _canonical(); targets relative to QFormerAligner. The feed-forward maps to the
# query FFN here and is copied to the text FFN afterwards (one source, two parameters).
BERT_ENCODER = Table("bert", (
    Rule("embeddings.LayerNorm.weight", "multi_modal_projector.query_norm.weight"),
    Rule("embeddings.LayerNorm.bias", "multi_modal_projector.query_norm.bias"),
    Rule(_LAYER + "attention.self.query.weight", _QUERY_LAYER + "attn.q_proj.weight", transpose=True),
    Rule(_LAYER + "attention.self.query.bias", _QUERY_LAYER + "attn.q_proj.bias"),
    Rule(_LAYER + "attention.self.key.weight", _QUERY_LAYER + "attn.k_proj.weight", transpose=True),
    Rule(_LAYER + "attention.self.key.bias", _QUERY_LAYER + "attn.k_proj.bias"),
    Rule(_LAYER + "attention.self.value.weight", _QUERY_LAYER + "attn.v_proj.weight", transpose=True),
    Rule(_LAYER + "attention.self.value.bias", _QUERY_LAYER + "attn.v_proj.bias"),
    Rule(_LAYER + "attention.output.dense.weight", _QUERY_LAYER + "attn.out_proj.weight", transpose=True),
    Rule(_LAYER + "attention.output.dense.bias", _QUERY_LAYER + "attn.out_proj.bias"),
    Rule(_LAYER + "attention.output.LayerNorm.weight", _QUERY_LAYER + "attn_norm.weight"),
    Rule(_LAYER + "attention.output.LayerNorm.bias", _QUERY_LAYER + "attn_norm.bias"),
    Rule(_LAYER + "intermediate.dense.weight", _QUERY_LAYER + "mlp.fc1.weight", transpose=True),
    Rule(_LAYER + "intermediate.dense.bias", _QUERY_LAYER + "mlp.fc1.bias"),
    Rule(_LAYER + "output.dense.weight", _QUERY_LAYER + "mlp.fc2.weight", transpose=True),
    Rule(_LAYER + "output.dense.bias", _QUERY_LAYER + "mlp.fc2.bias"),
    Rule(_LAYER + "output.LayerNorm.weight", _QUERY_LAYER + "mlp_norm.weight"),
    Rule(_LAYER + "output.LayerNorm.bias", _QUERY_LAYER + "mlp_norm.bias"),
), ignore=(
    # nothing to go to in the Q-Former, or handled by hand below (embeddings, the MLM bias)
    "pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids",
    "embeddings.token_type_embeddings.weight", "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight", "cls.seq_relationship.weight", "cls.seq_relationship.bias",
    "cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "cls.predictions.bias",
))

MLM_HEAD = Table("bert-mlm-head", (
    Rule("cls.predictions.transform.dense.weight", "align_heads.lm_dense.weight", transpose=True),
    Rule("cls.predictions.transform.dense.bias", "align_heads.lm_dense.bias"),
    Rule("cls.predictions.transform.LayerNorm.weight", "align_heads.lm_norm.weight"),
    Rule("cls.predictions.transform.LayerNorm.bias", "align_heads.lm_norm.bias"),
))

_QUERY_FFN = re.compile(r"^multi_modal_projector\.layers\.(\d+)\.(mlp\.|mlp_norm\.)")


def _canonical(name: str) -> str:
    name = name[len("bert."):] if name.startswith("bert.") else name
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


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
    table = BERT_ENCODER + MLM_HEAD if "cls.predictions.transform.dense.weight" in tensors else BERT_ENCODER
    for name in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
        if name not in tensors:
            raise CheckpointError(f"{source}: {name} is missing")
    # What the table needs from the file (the source of every parameter it covers), and what
    # the file has that the table neither maps nor lists as unused: both named in one error.
    needed = sorted({hit[0] for name in state if (hit := table.source_of(name))})
    missing = [n for n in needed if n not in tensors]
    unexpected = sorted(n for n in tensors if table.target_of(n) is None and not table.is_ignored(n))
    if missing or unexpected:
        found = [listed_names(kind, names) for kind, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise CheckpointError(f"{source}: does not fit the Q-Former ({' | '.join(found)})")
    expected = {k: list(v.shape) for k, v in state.items()}
    out, _ = to_paddle_mm(tensors, table, source)
    for name in [n for n in out if _QUERY_FFN.match(n)]:  # BLIP-2 starts both FFNs from BERT's one
        out[_QUERY_FFN.sub(r"text_tower.layers.\1.\2", name)] = out[name]

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
