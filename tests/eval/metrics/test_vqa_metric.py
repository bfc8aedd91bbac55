"""VQAv2 accuracy: the official normalization rules and the leave-one-out 10-annotator score.

Every "official" number below is what GT-Vision-Lab/VQA
PythonEvaluationTools/vqaEvaluation/vqaEval.py (VQAEval.evaluate) computes for the case:
the unrounded per-question accuracy (accQA) and its rounded percentage (evalQA).
"""
import pytest

from paddle_mm.eval.metrics.vqa import NORMALIZE_MODES, normalize_answer, vqa_accuracy, vqa_report


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),
    ("none", "0"),
    ("the dog.", "dog"),
    ("An apple", "apple"),
    ("dont", "don't"),
    ("yes!", "yes"),
    ("  yes\n", "yes"),
    ("tab\tseparated", "tab separated"),
    # a comma between digits makes every mark a deletion: the number stays one token
    ("1,000", "1000"),
    ("1,000 people!", "1000 people"),
    ("1,000 t-shirts", "1000 tshirts"),
    # otherwise a mark next to a space is deleted, a mark inside a word becomes a space
    ("red, white", "red white"),
    ("red,white", "red white"),
    ("t-shirt", "t shirt"),
    ("(left)", "left"),
    # the apostrophe and the colon are not in the script's list
    ("don't", "don't"),
    ("10:30", "10:30"),
    # periods go unless a digit follows (decimal point)
    ("3.5", "3.5"),
    ("mr. smith", "mr smith"),
    # the script passes re.UNICODE (32) as Pattern.sub's count: only the first 32 periods go
    ("." * 33 + "x", ".x"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


SEVEN_CATS = ["cat"] * 7

# (prediction, ground-truth answers, official accuracy, official percentage, symmetric accuracy)
CASES = {
    # number words: normalized only where the annotators disagree
    "number word, mixed": ("two", ["2"] * 3 + ["3"] * 7, 0.9, 90.0, 0.9),
    "number word both sides": ("Two", ["two", "2", "2"] + ["3"] * 7, 0.9, 90.0, 0.9),
    "none is 0": ("none", ["0"] * 2 + ["1"] * 8, 0.6, 60.0, 0.6),
    "number word, all same": ("two", ["2"] * 10, 0.0, 0.0, 1.0),
    "digit vs words, all same": ("2", ["two"] * 10, 0.0, 0.0, 1.0),
    # articles
    "article, mixed": ("a dog", ["dog"] * 4 + ["cat"] * 6, 1.0, 100.0, 1.0),
    "articles both sides": ("the dog", ["a dog", "dog", "an dog"] + SEVEN_CATS, 0.9, 90.0, 0.9),
    "article, all same": ("a dog", ["dog"] * 10, 0.0, 0.0, 1.0),
    # punctuation
    "full stop, mixed": ("dog.", ["dog"] * 2 + ["cat"] * 8, 0.6, 60.0, 0.6),
    "full stop, all same": ("dog.", ["dog"] * 10, 0.0, 0.0, 1.0),
    "comma in number, mixed": ("1,000", ["1000"] * 2 + ["100"] * 8, 0.6, 60.0, 0.6),
    "comma in number, all same": ("1,000", ["1000"] * 10, 0.0, 0.0, 1.0),
    "decimal point kept": ("3.5", ["3.5"] * 3 + ["35"] * 7, 0.9, 90.0, 0.9),
    "hyphen inside a word": ("t-shirt", ["t shirt", "t shirt", "tshirt"] + ["shirt"] * 7, 0.6, 60.0, 0.6),
    "comma next to a space": ("red, white", ["red white", "red,white"] + ["red"] * 8, 0.6, 60.0, 0.6),
    "comma in number deletes all marks": ("1,000 t-shirts", ["1000 tshirts", "1000 t shirts"] + ["many"] * 8,
                                          0.3, 30.0, 0.3),
    "exclamation, mixed": ("yes!", ["yes"] * 5 + ["no"] * 5, 1.0, 100.0, 1.0),
    "exclamation, all same": ("yes!", ["yes"] * 10, 0.0, 0.0, 1.0),
    "brackets, mixed": ("(left)", ["left"] * 3 + ["right"] * 7, 0.9, 90.0, 0.9),
    # contractions
    "contraction, mixed": ("dont", ["don't"] * 3 + ["no"] * 7, 0.9, 90.0, 0.9),
    "contraction both sides": ("cant", ["can't", "cant"] + ["no"] * 8, 0.6, 60.0, 0.6),
    "contraction, all same": ("dont", ["don't"] * 10, 0.0, 0.0, 1.0),
    # all annotators agree: no normalization at all, exact and case-sensitive after strip
    "capital prediction, all same": ("Yes", ["yes"] * 10, 0.0, 0.0, 1.0),
    "capital answers, all same": ("yes", ["Yes"] * 10, 0.0, 0.0, 1.0),
    "exact, all same": ("yes", ["yes"] * 10, 1.0, 100.0, 1.0),
    "newline stripped": ("yes\n", ["yes"] * 10, 1.0, 100.0, 1.0),
    "tabs and spaces stripped": (" yes\t", ["yes "] * 9 + ["\tyes"], 1.0, 100.0, 1.0),
    # the all-same test is on the stripped answers: " yes" is the same as "yes"
    "whitespace-only difference is no disagreement": ("Yes", ["yes"] * 9 + [" yes"], 0.0, 0.0, 1.0),
    # annotators disagree: both sides normalized, case included
    "case-only disagreement": ("YES", ["Yes"] * 9 + ["yes"], 1.0, 100.0, 1.0),
    "capital prediction, mixed": ("Yes", ["yes"] * 9 + ["no"], 1.0, 100.0, 1.0),
    # fewer than 10 answers
    "three agreeing": ("yes", ["yes"] * 3, 2 / 3, 66.67, 2 / 3),
    "three agreeing, capital prediction": ("Yes", ["yes"] * 3, 0.0, 0.0, 2 / 3),
    "two disagreeing": ("Yes", ["yes", "no"], 1 / 6, 16.67, 1 / 6),
    "one answer": ("yes", ["yes"], 0.0, 0.0, 0.0),
}


@pytest.mark.parametrize("pred, gts, official, percent, symmetric", CASES.values(), ids=CASES.keys())
def test_accuracy_matches_the_official_script(pred, gts, official, percent, symmetric):
    acc = vqa_accuracy(pred, gts)
    assert acc == official  # the script's float, bit for bit
    assert round(100 * acc, 2) == percent  # its evalQA
    assert vqa_accuracy(pred, gts, normalize="official") == acc
    assert vqa_accuracy(pred, gts, normalize="symmetric") == pytest.approx(symmetric, abs=1e-12)


@pytest.mark.parametrize("n_match, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9),
                                               (4, 1.0), (10, 1.0)])
def test_accuracy_ten_annotators(n_match, expected):
    # Hand-worked for k matches out of 10: (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10;
    # the script gives exactly these floats.
    gts = ["cat"] * n_match + ["dog"] * (10 - n_match)
    assert vqa_accuracy("cat", gts) == expected


def test_accuracy_rejects_no_answers_and_unknown_modes():
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="normalize"):
        vqa_accuracy("yes", ["yes"], normalize="lenient")
    with pytest.raises(ValueError, match="normalize"):
        vqa_report({}, {}, normalize="lenient")
    assert NORMALIZE_MODES == ("official", "symmetric")


ANNOTATIONS = {
    1: {"answers": ["yes"] * 10, "question_type": "yes/no"},
    2: {"answers": ["no"] * 10, "question_type": "yes/no"},
    3: {"answers": ["2"] * 2 + ["3"] * 8, "question_type": "number"},
    4: {"answers": ["red"] * 10},  # no type: counts in overall only
    5: {"answers": ["yes"] * 3, "question_type": "yes/no"},
    6: {"answers": ["Yes", "yes", "no"], "question_type": "yes/no"},
}
PREDICTIONS = {1: "Yes", 2: "yes", 3: "two", 4: "red", 5: "yes", 6: "YES ", 99: "ignored"}


def test_report_matches_the_official_script():
    report = vqa_report(PREDICTIONS, ANNOTATIONS)
    # per question (official accQA): 0, 0, 0.6, 1, 2/3, 4/9
    assert report["count"] == 6
    assert report["overall"] == pytest.approx((0.6 + 1.0 + 2 / 3 + 4 / 9) / 6, abs=1e-12)
    assert report["per_type"] == pytest.approx({"yes/no": (2 / 3 + 4 / 9) / 4, "number": 0.6}, abs=1e-12)
    # the script's printed figures: overall 45.19, yes/no 27.78, number 60.0
    assert report["percent"] == {"overall": 45.19, "per_type": {"yes/no": 27.78, "number": 60.0}}
    assert vqa_report(PREDICTIONS, ANNOTATIONS, normalize="official") == report


def test_report_symmetric_option_keeps_the_old_rule():
    report = vqa_report(PREDICTIONS, ANNOTATIONS, normalize="symmetric")
    # "Yes" against ten "yes" now matches: question 1 scores 1 instead of 0
    assert report["overall"] == pytest.approx((1.0 + 0.6 + 1.0 + 2 / 3 + 4 / 9) / 6, abs=1e-12)
    assert report["per_type"]["yes/no"] == pytest.approx((1.0 + 2 / 3 + 4 / 9) / 4, abs=1e-12)
    assert report["percent"]["overall"] == 61.85


def test_report_of_nothing():
    assert vqa_report({}, {}) == {"overall": 0.0, "per_type": {}, "count": 0,
                                  "percent": {"overall": 0.0, "per_type": {}}}


def test_report_missing_prediction_names_qid():
    with pytest.raises(ValueError, match="12345"):
        vqa_report({1: "yes"}, {1: {"answers": ["yes"]}, 12345: {"answers": ["no"]}})
