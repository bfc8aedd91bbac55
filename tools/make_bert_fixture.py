"""Build a tiny random BERT (BertForMaskedLM) with transformers and save reference outputs.

Run by hand (needs torch, the optional extra in requirements-bench.txt):
    python tools/make_bert_fixture.py [--out tests/fixtures/reference/bert]
Writes into the folder: config.json, vocab.txt and model.safetensors (the bert-base-uncased
layout at a toy size: "bert." names, the "cls." MLM head), and reference.safetensors with
input_ids, attention_mask, last_hidden_state (BERT's encoder output) and mlm_logits.
"""
from __future__ import annotations

import argparse
import os
import sys

from make_reference_fixtures import perturb_, save_reference, transformers_module

WORDS = ("a an the red green blue yellow purple circle square triangle at in top bottom left right center "
         "and of is there what colour shape where how many shapes are").split()
TEXTS = ["a red circle at the top left and a blue square in the center", "is there a green triangle"]


def main() -> None:
    import torch
    transformers = transformers_module()  # with the torchcodec probe off (see there)
    BertConfig, BertForMaskedLM = transformers.BertConfig, transformers.BertForMaskedLM

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from paddle_mm.alignment.text import SPECIAL, TextTokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="tests/fixtures/reference/bert")
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(list(SPECIAL) + WORDS + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]) + "\n")
    tok = TextTokenizer(out)
    cfg = BertConfig(vocab_size=tok.base_vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_act="gelu",
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = BertForMaskedLM(cfg).eval()
    perturb_(model, seed=1)
    model.save_pretrained(out, safe_serialization=True)
    ids = [tok.encode(t, 32) for t in TEXTS]
    length = max(len(i) for i in ids)
    input_ids = torch.tensor([i + [tok.pad_token_id] * (length - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids])
    with torch.no_grad():
        hidden = model.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
        logits = model.cls(hidden)
    save_reference(out, {"input_ids": input_ids, "attention_mask": mask, "last_hidden_state": hidden,
                         "mlm_logits": logits})


if __name__ == "__main__":
    main()
