"""Caption metrics: hand-worked cases plus regression against the real pycocoevalcap."""
import json
import math
import os

import pytest

from paddle_mm.eval.metrics.caption import bleu, caption_report, cider_d, rouge_l, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    # each expected list is what pycocoevalcap's PTBTokenizer printed for the same text
    assert tokenize("A Dog, running!") == ["a", "dog", "running"]
    assert tokenize("Don't the man's black-and-white dog -- 2.5 m.") == [
        "do", "n't", "the", "man", "'s", "black-and-white", "dog", "2.5", "m."]
    assert tokenize('"quoted" (text); here?') == ["quoted", "-lrb-", "text", "-rrb-", "here"]


def test_identical_caption_is_perfect():
    refs = {1: ["a man rides a brown horse"], 2: ["two cats sleep on the sofa"]}
    hyps = {1: "A man rides a brown horse.", 2: "two cats sleep on the sofa"}
    assert bleu(refs, hyps) == pytest.approx([1.0] * 4, abs=1e-8)
    assert rouge_l(refs, hyps) == pytest.approx(1.0)
    # Disjoint vocabularies: every n-gram has df=1, idf=log(2), so each cosine is 1 -> 10.
    assert cider_d(refs, hyps) == pytest.approx(10.0)


def test_no_shared_word_scores_zero():
    refs = {1: ["a man rides a horse"], 2: ["two cats sleep"]}
    hyps = {1: "green tree swaying", 2: "blue car parked"}
    assert bleu(refs, hyps) == pytest.approx([0.0] * 4, abs=1e-12)
    assert rouge_l(refs, hyps) == 0.0
    assert cider_d(refs, hyps) == 0.0


def test_short_hypothesis_length_penalties():
    # Hypothesis is the first half of the only reference: all precisions are 1.
    refs = {1: ["one two three four five six seven eight"]}
    hyps = {1: "one two three four"}
    # BLEU brevity penalty exp(1 - r/c) = exp(1 - 8/4)
    assert bleu(refs, hyps) == pytest.approx([math.exp(-1.0)] * 4, rel=1e-8)
    # ROUGE-L: precision 1, recall 0.5, F_beta with beta^2 = 1.44
    assert rouge_l(refs, hyps) == pytest.approx(2.44 * 0.5 / (0.5 + 1.44))


def test_bleu_uses_closest_reference_length():
    # Refs of length 3 and 6 for a 3-word hypothesis: the 3-word one is used -> no penalty.
    refs = {1: ["a b c", "a b c d e f"]}
    assert bleu(refs, {1: "a b c"}, n=1) == pytest.approx([1.0], abs=1e-8)


def test_cider_single_image_corpus_is_zero():
    # idf = log(#images) - log(df) = log(1) - log(1) = 0 for every n-gram.
    assert cider_d({1: ["a dog"]}, {1: "a dog"}) == 0.0


def test_mismatched_ids_raise():
    with pytest.raises(ValueError):
        bleu({1: ["a b"]}, {2: "a b"})
    with pytest.raises(ValueError):
        rouge_l({1: []}, {1: "a b"})


# ---- regression against pycocoevalcap -----------------------------------------------------
# The cases (raw text: capitals, punctuation, contractions, repeated words, a one-word and a
# long hypothesis) and the scores pycocoevalcap 1.2 gives them (its PTBTokenizer, then Bleu(4),
# Rouge(), Cider(), which is CIDEr-D) are in tests/fixtures/reference/caption_metric/;
# tools/make_caption_metric_reference.py regenerates expected.json (requirements-reference.txt).
REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "reference", "caption_metric")
with open(os.path.join(REFERENCE, "cases.json"), encoding="utf-8") as f:
    CASES = json.load(f)
with open(os.path.join(REFERENCE, "expected.json"), encoding="utf-8") as f:
    EXPECTED = json.load(f)


def test_reference_file_covers_every_case():
    assert EXPECTED["made_with"] == "pycocoevalcap 1.2" and set(EXPECTED["cases"]) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tokenizer_matches_ptb_tokenizer(name):
    case, expected = CASES[name], EXPECTED["cases"][name]
    for key, refs in case["refs"].items():
        assert [" ".join(tokenize(r)) for r in refs] == expected["tokenized_refs"][key]
    for key, hyp in case["hyps"].items():
        assert " ".join(tokenize(hyp)) == expected["tokenized_hyps"][key]


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_pycocoevalcap(name):
    case, expected = CASES[name], EXPECTED["cases"][name]["scores"]
    report = caption_report(case["refs"], case["hyps"])
    assert set(report) == set(expected)
    for metric, value in expected.items():
        assert report[metric] == pytest.approx(value, abs=1e-12), metric
