"""VQAv2 accuracy: official normalization rules and the leave-one-out 10-annotator score."""
import pytest

from paddle_mm.eval.metrics.vqa import normalize_answer, vqa_accuracy, vqa_report


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
    # otherwise a mark next to a space is deleted, a mark inside a word becomes a space
    ("red, white", "red white"),
    ("red,white", "red white"),
    ("t-shirt", "t shirt"),
    # periods go unless a digit follows (decimal point)
    ("3.5", "3.5"),
    ("mr. smith", "mr smith"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("n_match, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9),
                                               (4, 1.0), (10, 1.0)])
def test_accuracy_ten_annotators(n_match, expected):
    # Hand-worked for k matches out of 10: (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10
    gts = ["cat"] * n_match + ["dog"] * (10 - n_match)
    assert vqa_accuracy("cat", gts) == pytest.approx(expected, abs=1e-12)


def test_accuracy_normalizes_both_sides():
    gts = ["Two", "2", "two.", "2", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("2", gts) == pytest.approx(1.0)
    assert vqa_accuracy("the dog", ["dog"] * 10) == pytest.approx(1.0)


def test_accuracy_with_fewer_answers():
    # Three annotators all saying "yes": each leave-one-out subset has 2 matches -> 2/3.
    assert vqa_accuracy("yes", ["yes"] * 3) == pytest.approx(2 / 3)
    # One answer: leaving it out leaves nothing to match.
    assert vqa_accuracy("yes", ["yes"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_report_overall_and_per_type():
    annotations = {
        1: {"answers": ["yes"] * 10, "question_type": "yes/no"},
        2: {"answers": ["no"] * 10, "question_type": "yes/no"},
        3: {"answers": ["2"] * 2 + ["3"] * 8, "question_type": "number"},
        4: {"answers": ["red"] * 10},  # no type: counts in overall only
    }
    predictions = {1: "Yes", 2: "yes", 3: "two", 4: "red", 99: "ignored"}
    report = vqa_report(predictions, annotations)
    assert report["count"] == 4
    assert report["overall"] == pytest.approx((1.0 + 0.0 + 0.6 + 1.0) / 4)
    assert report["per_type"] == pytest.approx({"yes/no": 0.5, "number": 0.6})


def test_report_missing_prediction_names_qid():
    with pytest.raises(ValueError, match="12345"):
        vqa_report({1: "yes"}, {1: {"answers": ["yes"]}, 12345: {"answers": ["no"]}})
