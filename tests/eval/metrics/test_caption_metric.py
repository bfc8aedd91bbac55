"""Caption metrics: hand-worked cases plus regression against the real pycocoevalcap."""
import math

import pytest

from paddle_mm.eval.metrics.caption import bleu, caption_report, cider_d, rouge_l, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Dog, running!") == ["a", "dog", "running"]
    assert tokenize("Don't the man's black-and-white dog -- 2.5 m.") == [
        "do", "n't", "the", "man", "'s", "black-and-white", "dog", "2.5", "m"]
    assert tokenize('"quoted" (text); here?') == ["quoted", "text", "here"]


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
# Expected numbers were produced with pycocoevalcap 1.2 (pip), using its Bleu(4) scorer,
# Rouge() and Cider() (pycocoevalcap's Cider is CIDEr-D: clipped tf-idf, sigma=6 penalty),
# fed the already-tokenized lower-case strings below (PTBTokenizer bypassed).

COCO_REFS = {
    "img1": ["a man riding a horse on a beach",
             "a person rides a brown horse along the shore",
             "a man on horseback near the ocean"],
    "img2": ["two dogs playing with a frisbee in the park",
             "a pair of dogs chase a frisbee on the grass"],
    "img3": ["a plate of food with broccoli and rice",
             "a white plate topped with rice and vegetables",
             "broccoli and rice served on a plate",
             "a healthy meal of rice and broccoli"],
    "img4": ["a red double decker bus driving down a street",
             "a bus on a city street",
             "a large red bus is parked by the curb",
             "a double decker bus in london",
             "red bus driving on the road"],
    "img5": ["a cat sleeping on a laptop keyboard",
             "a cat lying on top of a computer"],
}
COCO_HYPS = {
    "img1": "a man riding a horse on the beach",
    "img2": "a dog playing with a frisbee",
    "img3": "a plate of rice and broccoli on a table",
    "img4": "a red bus driving down the street in the city",
    "img5": "a dog sitting on a couch",
}
COCO_EXPECTED = {
    "BLEU-1": 0.7794959433530664,
    "BLEU-2": 0.6432925408769092,
    "BLEU-3": 0.5302899570150552,
    "BLEU-4": 0.4144831352068483,
    "ROUGE-L": 0.6244070946021872,
    "CIDEr-D": 1.9146719800177963,
}

# Second set: repeated words (clipping), a one-word hypothesis and a long one. Ours is fed the
# raw text (capitals, punctuation); pycocoevalcap got the tokenized form shown in comments.
RAW_REFS = {
    1: ["A girl is eating a slice of pizza.", "The little girl eats pizza!",
        "Child, eating pizza at a table."],    # ... "child eating pizza at a table"
    2: ["Snow-covered mountains under a blue sky.",  # "snow-covered mountains under a blue sky"
        "A mountain range covered in snow."],
    3: ["Two zebras standing in the grass.", "A couple of zebras grazing in a field.",
        "Zebras in a grassy field."],
}
RAW_HYPS = {
    1: "A girl girl girl eating pizza pizza.",  # "a girl girl girl eating pizza pizza"
    2: "Mountains.",                            # "mountains"
    3: "Two zebras are standing in a grassy field next to some trees and bushes.",
}
RAW_EXPECTED = {
    "BLEU-1": 0.5454545454297521,
    "BLEU-2": 0.4482822077434393,
    "BLEU-3": 0.28700845632442834,
    "BLEU-4": 0.19924994255343145,
    "ROUGE-L": 0.4518605238270048,
    "CIDEr-D": 0.7214214657743877,
}


@pytest.mark.parametrize("refs, hyps, expected", [
    (COCO_REFS, COCO_HYPS, COCO_EXPECTED),
    (RAW_REFS, RAW_HYPS, RAW_EXPECTED),
], ids=["coco-like", "raw-text"])
def test_matches_pycocoevalcap(refs, hyps, expected):
    report = caption_report(refs, hyps)
    assert set(report) == set(expected)
    for name, value in expected.items():
        assert report[name] == pytest.approx(value, abs=1e-12), name
