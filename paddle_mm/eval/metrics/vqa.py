"""VQAv2 accuracy, computed as the official VQA evaluation script computes it.

The reference is GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py
(``VQAEval.evaluate``). For every question it does, in order:

1. replaces newline and tab by a space in the prediction and in every ground-truth answer,
   and strips them;
2. only if the stripped ground-truth answers are not all the same (``len(set(gts)) > 1``),
   normalizes the prediction *and* every ground-truth answer: punctuation
   (``_strip_punctuation``), then lower case, number words to digits, articles dropped and
   contractions fixed (``normalize_answer``). When all annotators gave the same string,
   neither side is normalized and the comparison is exact and case-sensitive: "Yes", "yes."
   or "a yes" against ten "yes" all score 0;
3. for each annotator, counts the *other* annotators whose answer equals the prediction and
   scores ``min(1, count / 3)``; the question's accuracy is the mean over annotators (with 10
   answers: 1, 2, 3 matches are worth 0.3, 0.6, 0.9, four or more 1.0). Any number of
   answers works the same way (one answer always scores 0).

The script reports percentages rounded to 2 digits: ``round(100 * acc, 2)`` per question and
``round(100 * sum(accs) / len(accs), 2)`` over a split or a question type, from the unrounded
per-question values. Here ``vqa_accuracy`` returns the unrounded per-question value (the very
float the script computes, in [0, 1]); ``vqa_report`` keeps fractions in [0, 1] and also gives
the script's rounded percentages under "percent".

``normalize="symmetric"`` is the older paddle_mm rule, kept as an option: step 2 always runs,
whatever the annotators said. It differs from the script only on questions whose annotators
all agree, where it can turn a mismatch into a match (then "Yes" against ten "yes" scores 1).
"""
from __future__ import annotations

import re
from collections import defaultdict

__all__ = ["NORMALIZE_MODES", "normalize_answer", "vqa_accuracy", "vqa_report"]

# "official": normalize only when the annotators disagree, as vqaEval.py; "symmetric": always.
NORMALIZE_MODES = ("official", "symmetric")

# Punctuation handled by the official script. A period is treated separately (see _PERIOD).
# The apostrophe and the colon are not in the list: "don't" and "10:30" keep them.
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!")
# A comma between two digits ("1,000") switches every punctuation mark to plain deletion,
# so the number stays one token.
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)"; its first group is a (mistyped) lookahead that
# always succeeds, so in effect it drops every period not followed by a digit: "3.5" keeps its
# decimal point, "dog." loses its full stop.
_PERIOD = re.compile(r"\.(?!\d)")
# The script calls periodStrip.sub("", text, re.UNICODE): the third positional argument of
# Pattern.sub is the count, and re.UNICODE is 32, so at most the first 32 periods go.
_PERIOD_COUNT = int(re.UNICODE)

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
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _clean(text: str) -> str:
    """The script's first step, on both sides and always: newline/tab to space, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Normalize an answer the way the official VQAv2 evaluation does when it normalizes.

    Steps: newline/tab to space and strip; punctuation (see ``_strip_punctuation``); lower-case;
    number words "none".."ten" to digits; drop the articles a/an/the; fix contractions
    written without an apostrophe ("dont" -> "don't"); join words with single spaces.
    ``vqa_accuracy`` applies it only where the chosen ``normalize`` mode says so.
    """
    text = _strip_punctuation(_clean(text))
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _check_mode(normalize: str) -> None:
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")


def vqa_accuracy(prediction: str, gt_answers: list[str], normalize: str = "official") -> float:
    """Official VQA accuracy of one prediction against the annotators' answers, in [0, 1].

    Both sides are stripped; they are normalized (``normalize_answer``) only when the stripped
    answers are not all the same, unless ``normalize="symmetric"`` (always). Then, for every
    annotator, count how many of the *other* annotators gave the predicted answer, score
    min(count / 3, 1), and average over annotators. With 10 answers this makes 1, 2, 3 matches
    worth 0.3, 0.6, 0.9 and 4 or more worth 1.0. The value is the script's unrounded one; its
    per-question figure is ``round(100 * value, 2)``.
    """
    _check_mode(normalize)
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = _clean(prediction)
    gts = [_clean(a) for a in gt_answers]
    if normalize == "symmetric" or len(set(gts)) > 1:
        pred = normalize_answer(pred)
        gts = [normalize_answer(a) for a in gts]
    hits = [a == pred for a in gts]
    total_hits = sum(hits)
    # Leaving annotator i out removes exactly its own hit (if any) from the count (the script
    # compares answer records, which differ by answer_id, so it drops exactly one).
    scores = [min((total_hits - hit) / 3.0, 1.0) for hit in hits]
    return sum(scores) / len(scores)


def _percent(values: list[float]) -> float:
    # The script's rounding: round(100 * float(sum(accs)) / len(accs), 2).
    return round(100 * sum(values) / len(values), 2)


def vqa_report(predictions: dict, annotations: dict, normalize: str = "official") -> dict:
    """Accuracy over a split, overall and per question type.

    ``annotations`` maps question id -> {"answers": [str, ...], "question_type": str (optional)};
    ``predictions`` maps question id -> predicted answer. Every annotated question must have a
    prediction (a missing one would silently inflate the score), extra predictions are ignored.
    ``normalize`` is "official" (the script's rule) or "symmetric" (see ``vqa_accuracy``).
    Returns {"overall": float, "per_type": {type: float}, "count": int, "percent": {"overall",
    "per_type"}}: accuracies in [0, 1], and under "percent" the figures the official script
    prints (percentages rounded to 2 digits; overall 0.0 when there is no question).
    """
    _check_mode(normalize)
    accs: list[float] = []
    by_type: dict[str, list[float]] = defaultdict(list)
    for qid, ann in annotations.items():
        if qid not in predictions:
            raise ValueError(f"no prediction for annotated question id {qid!r}")
        acc = vqa_accuracy(predictions[qid], ann["answers"], normalize=normalize)
        accs.append(acc)
        qtype = ann.get("question_type")
        if qtype is not None:
            by_type[qtype].append(acc)
    count = len(accs)
    return {
        "overall": sum(accs) / count if count else 0.0,
        "per_type": {t: sum(v) / len(v) for t, v in by_type.items()},
        "count": count,
        "percent": {"overall": _percent(accs) if count else 0.0,
                    "per_type": {t: _percent(v) for t, v in by_type.items()}},
    }
