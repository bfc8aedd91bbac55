"""POPE and CHAIR against hand-worked cases; the POPE generator's three negative settings."""
from __future__ import annotations

import os

import pytest

from paddle_mm.eval.metrics.chair import chair, mentioned_objects
from paddle_mm.eval.metrics.pope import pope_answer, pope_questions, pope_report, pope_scores


def test_pope_scores_of_a_hand_worked_confusion_matrix():
    # 4 yes-labels: 3 said yes (tp 3, fn 1); 4 no-labels: 1 said yes (fp 1, tn 3).
    labels = ["yes"] * 4 + ["no"] * 4
    answers = ["yes", "yes", "yes", "no", "yes", "no", "no", "no"]
    s = pope_scores(labels, answers)
    assert s["accuracy"] == 6 / 8 and s["precision"] == 3 / 4 and s["recall"] == 3 / 4
    assert s["f1"] == pytest.approx(0.75) and s["yes_ratio"] == 4 / 8


def test_a_model_that_always_says_yes_has_full_recall_and_yes_ratio_one():
    s = pope_scores(["yes", "no", "no", "no"], ["yes"] * 4)
    assert (s["recall"], s["yes_ratio"], s["precision"]) == (1.0, 1.0, 0.25)
    assert s["f1"] == pytest.approx(2 * 0.25 / 1.25)
    assert pope_scores(["yes", "no"], ["no", "no"])["f1"] == 0.0  # no positive answer: no division by 0


@pytest.mark.parametrize("text, answer", [
    ("Yes, there is a red circle.", "yes"), ("No.", "no"), ("There is not a cat. Yes.", "no"),
    ("yes", "yes"), ("There isn't one", "no"), ("Noted, yes", "yes")])
def test_free_answers_read_as_pope_reads_them(text, answer):
    assert pope_answer(text) == answer


def test_pope_report_scores_each_setting_and_all_and_refuses_a_missing_answer():
    qs = [{"question_id": 0, "label": "yes", "setting": "random"}, {"question_id": 1, "label": "no", "setting": "random"},
          {"question_id": 2, "label": "no", "setting": "adversarial"}]
    report = pope_report(qs, {0: "Yes", 1: "No", 2: "Yes"})
    assert report["random"]["accuracy"] == 1.0 and report["adversarial"]["accuracy"] == 0.0
    assert report["all"]["questions"] == 3 and report["all"]["yes_ratio"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="1 POPE questions have no answer"):
        pope_report(qs, {0: "Yes", 1: "No"})


IMAGES = [("a.png", ["red circle", "blue square"]), ("b.png", ["red circle", "green triangle"]),
          ("c.png", ["red circle", "blue square"]), ("d.png", ["yellow circle"])]


def test_pope_generator_balances_yes_and_no_and_never_asks_no_of_a_present_object():
    for setting in ("random", "popular", "adversarial"):
        qs = pope_questions(IMAGES, setting, per_image=2, seed=1)
        held = dict(IMAGES)
        for q in qs:
            assert (q["object"] in held[q["image"]]) == (q["label"] == "yes")
            assert q["text"] == f"Is there a {q['object']} in the image?"
        assert sum(q["label"] == "yes" for q in qs) == sum(q["label"] == "no" for q in qs)
        assert qs == pope_questions(IMAGES, setting, per_image=2, seed=1)  # deterministic


def test_popular_negatives_are_the_most_frequent_and_adversarial_the_most_co_occurring():
    # Frequencies: red circle 3, blue square 2, green triangle 1, yellow circle 1.
    popular = [q for q in pope_questions(IMAGES, "popular", per_image=1) if q["label"] == "no"]
    assert [q["object"] for q in popular if q["image"] == "d.png"] == ["red circle"]
    # b.png holds red circle + green triangle; blue square appears beside red circle twice.
    adversarial = [q for q in pope_questions(IMAGES, "adversarial", per_image=1) if q["label"] == "no"]
    assert [q["object"] for q in adversarial if q["image"] == "b.png"] == ["blue square"]
    with pytest.raises(ValueError, match="not one of"):
        pope_questions(IMAGES, "frequent")


VOCAB = ["red circle", "blue square", "circle", "green triangle"]


def test_chair_of_hand_worked_captions():
    captions = {"a": "a red circle at the top and a blue square", "b": "a green triangle", "c": "a red circle"}
    objects = {"a": ["red circle"], "b": ["green triangle"], "c": ["red circle"]}
    report = chair(captions, objects, VOCAB)
    # Mentions: a -> red circle, blue square (hallucinated); b -> green triangle; c -> red circle.
    assert (report["mentions"], report["hallucinated"]) == (4, 1)
    assert report["chair_i"] == 1 / 4 and report["chair_s"] == 1 / 3
    assert report["hallucinated_by_caption"] == {"a": ["blue square"], "b": [], "c": []}


def test_mentions_take_the_longest_phrase_once_and_whole_words_only():
    assert mentioned_objects("a red circle and a red circle, a circle", VOCAB) == ["red circle", "circle"]
    assert mentioned_objects("circles and encircled", VOCAB) == []
    assert mentioned_objects("a ball", VOCAB, synonyms={"ball": "circle"}) == ["circle"]
    with pytest.raises(ValueError, match="no object list"):
        chair({"x": "a circle"}, {}, VOCAB)


def test_pope_file_for_the_scenes_reads_back_and_scores_through_the_cli(demo_data, tiny_recipe, tmp_path, capsys):
    """The generated file is POPE's format (read_pope reads it); `paddle-mm eval --pope --chair-scenes`
    scores a (barely trained) run on it: the figures are well-formed, whatever their values."""
    import json

    from paddle_mm.cli import main
    from paddle_mm.data.readers import read_pope
    from paddle_mm.eval.hallucination import write_pope_file
    from paddle_mm.training.loop import train

    path = write_pope_file(demo_data["data"], "test", per_image=2)
    samples = read_pope(path).samples
    assert {s.meta["setting"] for s in samples} == {"random", "popular", "adversarial"}
    assert len({s.id for s in samples}) == len(samples)
    # The held-out questions are about the test scenes' images, and nothing else.
    test_images = {os.path.join(demo_data["data"], r["image"])
                   for r in json.load(open(os.path.join(demo_data["data"], "test_scenes.json")))}
    assert {os.path.normpath(s.images[0]) for s in samples} == {os.path.normpath(p) for p in test_images}
    run = train(tiny_recipe(str(tmp_path / "run"), "train.max_steps=1", "infer.max_new_tokens=4"), quiet=True)
    main(["eval", run, "--pope", path, "--chair-scenes", demo_data["data"]])
    scores = json.loads(capsys.readouterr().out)
    assert set(scores["pope"]) == {"random", "popular", "adversarial", "all"}
    assert scores["pope"]["all"]["questions"] == len(samples)
    assert 0 <= scores["chair"]["chair_i"] <= 1 and scores["chair"]["captions"] == 10
