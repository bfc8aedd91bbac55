"""VQAv2 accuracy, matching the official VQA evaluation script (vqaEval.py).

Answers are compared only after the official normalization, so numbers produced here can be
put next to published VQAv2 results. Two deliberate differences from the script:

* the script normalizes answers only when the annotators disagree (``len(set(gts)) > 1``);
  we always normalize both sides. That can only turn a mismatch into a match, so a score is
  equal to or above the script's (e.g. "Yes" against ten "yes" scores 1.0 here, 0.0 there);
* the leave-one-out average also works with fewer (or more) than 10 ground-truth answers.
"""
from __future__ import annotations

import re
from collections import defaultdict

__all__ = ["normalize_answer", "vqa_accuracy", "vqa_report"]

# Punctuation handled by the official script. A period is treated separately (see _PERIOD).
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!")
# A comma between two digits ("1,000") switches every punctuation mark to plain deletion,
# so the number stays one token.
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)"; its first group is a (mistyped) lookahead that
# always succeeds, so in effect it drops every period not followed by a digit: "3.5" keeps its
# decimal point, "dog." loses its full stop.
_PERIOD = re.compile(r"\.(?!\d)")

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))

# The official contractions table as "written:fixed" pairs. The upper-case keys ("Im", ...)
# never match because words are lower-cased first; they are kept so the table stays the same.
_CONTRACTION_PAIRS = """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll
somebodys:somebody's someoned:someone'd someoned've:someone'd've someone'dve:someone'd've
someonell:someone'll someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd
thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd
theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll
whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's
whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've
wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll
y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd
youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've
"""
_CONTRACTIONS = dict(pair.split(":", 1) for pair in _CONTRACTION_PAIRS.split())


def _strip_punctuation(text: str) -> str:
    # Whether a mark is deleted or turned into a space is decided on the whole input string:
    # a mark touching a space somewhere (or a digit-comma-digit anywhere) means deletion.
    delete_all = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for p in _PUNCT:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def normalize_answer(text: str) -> str:
    """Normalize an answer the way the official VQAv2 evaluation does.

    Steps: newline/tab to space and strip; punctuation (see ``_strip_punctuation``); lower-case;
    number words "none".."ten" to digits; drop the articles a/an/the; fix contractions
    written without an apostrophe ("dont" -> "don't"); join words with single spaces.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """Official VQA accuracy of one prediction against the annotators' answers.

    For every annotator, count how many of the *other* annotators gave the predicted answer,
    score min(count / 3, 1), and average over annotators. With 10 answers this makes
    1, 2, 3 matches worth 0.3, 0.6, 0.9 and 4 or more worth 1.0.
    """
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in gt_answers]
    total_hits = sum(hits)
    # Leaving annotator i out removes exactly its own hit (if any) from the count.
    scores = [min((total_hits - hit) / 3.0, 1.0) for hit in hits]
    return sum(scores) / len(scores)


def vqa_report(predictions: dict, annotations: dict) -> dict:
    """Accuracy over a split, overall and per question type.

    ``annotations`` maps question id -> {"answers": [str, ...], "question_type": str (optional)};
    ``predictions`` maps question id -> predicted answer. Every annotated question must have a
    prediction (a missing one would silently inflate the score), extra predictions are ignored.
    Returns {"overall": float, "per_type": {type: float}, "count": int}; accuracies are in [0, 1].
    """
    total = 0.0
    by_type: dict[str, list[float]] = defaultdict(list)
    for qid, ann in annotations.items():
        if qid not in predictions:
            raise ValueError(f"no prediction for annotated question id {qid!r}")
        acc = vqa_accuracy(predictions[qid], ann["answers"])
        total += acc
        qtype = ann.get("question_type")
        if qtype is not None:
            by_type[qtype].append(acc)
    count = len(annotations)
    return {
        "overall": total / count if count else 0.0,
        "per_type": {t: sum(v) / len(v) for t, v in by_type.items()},
        "count": count,
    }
