"""Regenerate the caption metrics' reference numbers with the official pycocoevalcap.

Run by hand, in a virtual environment of its own with the reference extras (pycocoevalcap
does not install beside the runtime set, and is never needed by the library or the tests):
    python3 -m venv /tmp/coco && /tmp/coco/bin/pip install -r requirements-reference.txt
    /tmp/coco/bin/python tools/make_caption_metric_reference.py [--check]

Reads the cases of tests/fixtures/reference/caption_metric/cases.json (references and a
hypothesis per image, as raw text) and writes their scores beside them, in expected.json:
pycocoevalcap's PTBTokenizer (Stanford CoreNLP, needs `java`) tokenizes the raw text, then
Bleu(4), Rouge() and Cider() score it (pycocoevalcap's Cider is CIDEr-D: clipped tf-idf and
a length penalty with sigma 6). The tokenized text is written too, so a test can tell a
tokenizer difference from a scorer difference. --check compares with the committed file
instead of writing it and exits 1 on a difference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "tests", "fixtures", "reference", "caption_metric")


def score_case(case: dict) -> dict:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer()
    refs = ptb.tokenize({k: [{"caption": c} for c in v] for k, v in case["refs"].items()})
    hyps = ptb.tokenize({k: [{"caption": h}] for k, h in case["hyps"].items()})
    scores = {}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    for n, value in enumerate(bleu, start=1):
        scores[f"BLEU-{n}"] = float(value)
    scores["ROUGE-L"] = float(Rouge().compute_score(refs, hyps)[0])
    scores["CIDEr-D"] = float(Cider().compute_score(refs, hyps)[0])
    return {"scores": scores, "tokenized_refs": refs, "tokenized_hyps": {k: v[0] for k, v in hyps.items()}}


def main() -> int:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with expected.json instead of writing it")
    args = parser.parse_args()
    with open(os.path.join(FOLDER, "cases.json"), encoding="utf-8") as f:
        cases = json.load(f)
    out = {"made_with": f"pycocoevalcap {version('pycocoevalcap')}", "cases": {}}
    for name, case in cases.items():
        out["cases"][name] = score_case(case)
    path = os.path.join(FOLDER, "expected.json")
    if args.check:
        with open(path, encoding="utf-8") as f:
            committed = json.load(f)
        if committed["cases"] != out["cases"]:
            print(f"{path} differs from what {out['made_with']} computes now:\n"
                  f"{json.dumps(out['cases'], indent=1)}", file=sys.stderr)
            return 1
        print(f"{path}: the same as {out['made_with']} computes")
        return 0
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
