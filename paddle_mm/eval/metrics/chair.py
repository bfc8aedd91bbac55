"""CHAIR (Rohrbach et al., 2018): object hallucination in captions, from the objects each image holds.

CHAIR-i: of the objects the captions mention, the share the image does not hold.
CHAIR-s: of the captions, the share that mention at least one such object.
Mentions are matched against an object vocabulary (whole words, longest phrase first, so
"red circle" is one mention, not also "circle"); each object counts once per caption, as in
the original. Synonyms map other words to a vocabulary name. Pure Python.
"""
from __future__ import annotations

import re


def mentioned_objects(caption: str, vocabulary: list[str], synonyms: dict | None = None) -> list[str]:
    """The vocabulary objects a caption names, each once, in order of first mention."""
    names = {name.lower(): name for name in vocabulary}
    names.update({word.lower(): target for word, target in (synonyms or {}).items()})
    # Longest first, so a phrase wins over the words inside it; whole words only.
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) + r")\b")
    found: list[str] = []
    for match in pattern.finditer(caption.lower()):
        obj = names[match.group(1)]
        if obj not in found:
            found.append(obj)
    return found


def chair(captions: dict, objects: dict, vocabulary: list[str], synonyms: dict | None = None) -> dict:
    """CHAIR-s and CHAIR-i of captions by image id, against each image's objects.

    Returns the two shares, the counts behind them and, per caption, the hallucinated objects.
    """
    missing = [key for key in captions if key not in objects]
    if missing:
        raise ValueError(f"{len(missing)} captions have no object list (first: {missing[0]!r})")
    mentions = hallucinated = bad_captions = 0
    per_caption = {}
    for key, text in captions.items():
        held = set(objects[key])
        named = mentioned_objects(text, vocabulary, synonyms)
        wrong = [o for o in named if o not in held]
        mentions += len(named)
        hallucinated += len(wrong)
        bad_captions += bool(wrong)
        per_caption[key] = wrong
    return {"chair_s": bad_captions / len(captions) if captions else 0.0,
            "chair_i": hallucinated / mentions if mentions else 0.0,
            "captions": len(captions), "mentions": mentions, "hallucinated": hallucinated,
            "hallucinated_by_caption": per_caption}
