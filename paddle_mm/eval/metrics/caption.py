"""Caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D) with the pycocoevalcap definitions.

Every formula, constant and quirk follows pycocoevalcap (the COCO caption evaluation code), so
scores computed here can be compared with published COCO / NoCaps / Flickr30k numbers without
needing Java. Only the tokenizer differs: pycocoevalcap runs the Stanford PTB tokenizer, while
``tokenize`` below is a small pure-Python approximation of its output for ordinary captions
(brackets and abbreviations included; tests/eval/metrics checks it against PTB's own output).

All scorers take ``refs: {image_id: [reference caption, ...]}`` and
``hyps: {image_id: hypothesis caption}`` with the same image ids, and tokenize both sides.
Scores are on pycocoevalcap's scale (BLEU and ROUGE-L in [0, 1], CIDEr-D in [0, 10]).
"""
from __future__ import annotations

import math
import re
from collections import Counter

__all__ = ["tokenize", "bleu", "rouge_l", "cider_d", "caption_report"]

# PTB splits these clitics off as their own tokens ("don't" -> "do n't", "man's" -> "man 's").
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_CLITIC_RE = re.compile(r"(?<=[a-z])(n't|'s|'re|'ve|'ll|'d|'m)\b")
# Marks pycocoevalcap drops after PTB tokenization (its PUNCTUATIONS list: quotes, . ? ! , : ; -
# -- ...). PTB writes brackets as -LRB- / -RRB- (and -LSB-, -LCB-, ...); run with -lowerCase they
# become "-lrb-", which that (upper-case) list does not match, so they stay as words.
_PUNCT_RE = re.compile(r"[,!?;:\"`]")
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_BRACKET_RE = re.compile(r"[()\[\]{}]")
_KEPT_WHOLE = frozenset(_CLITICS) | {b.strip() for b in _BRACKETS.values()}
_PERIOD_RE = re.compile(r"\.(?!\d)")  # keep decimal points ("2.5"), drop full stops
# PTB keeps the periods of abbreviations made of single letters: "p.m.", "u.s.", "m."
_ABBREVIATION_RE = re.compile(r"(?:[a-z]\.)+")


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words, dropping punctuation.

    Approximates pycocoevalcap's PTBTokenizer + punctuation filter for plain captions:
    clitics become separate tokens, hyphenated words stay whole ("black-and-white"), lone
    hyphens/quotes and the marks . , ! ? ; : " ` are removed, brackets become -lrb- / -rrb-
    (-lsb-, -rsb-, -lcb-, -rcb-) and single-letter abbreviations keep their periods.
    """
    text = _CLITIC_RE.sub(r" \1", text.lower())
    text = _BRACKET_RE.sub(lambda m: _BRACKETS[m.group()], _PUNCT_RE.sub(" ", text))
    tokens = []
    for word in text.split():
        pieces = [word] if _ABBREVIATION_RE.fullmatch(word) else _PERIOD_RE.sub(" ", word).split()
        for tok in pieces:
            if tok not in _KEPT_WHOLE and not _ABBREVIATION_RE.fullmatch(tok):
                tok = tok.strip("'-")
            if tok:
                tokens.append(tok)
    return tokens


def _prepare(refs: dict, hyps: dict) -> list[tuple[list[str], list[list[str]]]]:
    """Tokenize and pair up (hypothesis, references) per image, checking the inputs."""
    if set(refs) != set(hyps):
        missing = sorted(map(str, set(refs) ^ set(hyps)))[:5]
        raise ValueError(f"refs and hyps must have the same image ids; differing: {missing}")
    pairs = []
    for image_id, ref_list in refs.items():
        if isinstance(ref_list, str) or not ref_list:
            raise ValueError(f"image {image_id!r}: references must be a non-empty list of str")
        pairs.append((tokenize(hyps[image_id]), [tokenize(r) for r in ref_list]))
    return pairs


def _ngrams(words: list[str], n: int) -> Counter:
    """Counts of all 1..n-grams of ``words`` (tuples as keys)."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1)
                   for i in range(len(words) - k + 1))


def bleu(refs: dict, hyps: dict, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as pycocoevalcap's Bleu scorer computes it.

    Clipped n-gram matches and candidate n-gram counts are summed over the corpus; the reference
    length of each image is the one closest to the hypothesis length (ties: the shorter one).
    pycocoevalcap's smoothing constants are kept: each precision is (correct + 1e-15) /
    (guess + 1e-9), so a zero precision gives ~0 instead of an error.
    """
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for hyp, ref_list in _prepare(refs, hyps):
        max_ref = Counter()
        for ref in ref_list:
            max_ref |= _ngrams(ref, n)  # elementwise max = clipping count per n-gram
        for gram, count in _ngrams(hyp, n).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(n):
            guess[k] += max(0, len(hyp) - k)
        test_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in ref_list)[1]

    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:  # brevity penalty
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs_len(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (one-row DP)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], (prev_diag + 1 if x == y else max(row[j], row[j - 1]))
    return row[-1]


def rouge_l(refs: dict, hyps: dict, beta: float = 1.2) -> float:
    """ROUGE-L as pycocoevalcap's Rouge: per image, the best LCS precision and the best LCS
    recall over the references (taken independently) give an F-score weighted by ``beta``;
    the result is the mean over images."""
    scores = []
    for hyp, ref_list in _prepare(refs, hyps):
        if not hyp:
            scores.append(0.0)
            continue
        lcs = [_lcs_len(ref, hyp) for ref in ref_list]
        prec = max(l / len(hyp) for l in lcs)
        rec = max(l / len(ref) if ref else 0.0 for l, ref in zip(lcs, ref_list))
        if prec > 0 and rec > 0:
            scores.append((1 + beta ** 2) * prec * rec / (rec + beta ** 2 * prec))
        else:
            scores.append(0.0)
    return sum(scores) / len(scores) if scores else 0.0


def cider_d(refs: dict, hyps: dict, n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D as pycocoevalcap's Cider scorer (which implements CIDEr-D) computes it.

    Each sentence becomes per-order tf-idf vectors, with document frequencies counted over the
    reference sets of *this* corpus (an n-gram counts once per image) and idf
    log(#images) - log(max(1, df)). Per reference and order: the hypothesis weights are clipped
    to the reference's (min), the dot product is divided by both norms, and a Gaussian penalty
    exp(-delta^2 / (2 sigma^2)) on the length difference is applied. Scores are averaged over
    orders and references, times 10, then averaged over images.
    """
    pairs = _prepare(refs, hyps)
    if not pairs:
        return 0.0
    ref_counts = [[_ngrams(r, n) for r in ref_list] for _, ref_list in pairs]
    doc_freq = Counter()
    for counts in ref_counts:
        doc_freq.update(set().union(*counts))
    log_images = math.log(float(len(pairs)))

    def to_vec(counts: Counter):
        vec = [{} for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            w = tf * (log_images - math.log(max(1.0, doc_freq[gram])))
            vec[len(gram) - 1][gram] = w
            norm[len(gram) - 1] += w * w
        # pycocoevalcap's "length" counts bigrams, not words; kept for identical results
        # (it only differs from the word-length difference for empty sentences).
        length = sum(c for g, c in counts.items() if len(g) == 2)
        return vec, [math.sqrt(x) for x in norm], length

    image_scores = []
    for (hyp, _), counts in zip(pairs, ref_counts):
        h_vec, h_norm, h_len = to_vec(_ngrams(hyp, n))
        total = [0.0] * n
        for rc in counts:
            r_vec, r_norm, r_len = to_vec(rc)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0)
                          for g, w in h_vec[k].items())
                if h_norm[k] != 0 and r_norm[k] != 0:
                    val /= h_norm[k] * r_norm[k]
                total[k] += val * penalty
        image_scores.append(sum(total) / n / len(counts) * 10.0)
    return sum(image_scores) / len(image_scores)


def caption_report(refs: dict, hyps: dict) -> dict:
    """All caption metrics at once: {"BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr-D"} as floats."""
    report = {f"BLEU-{k + 1}": s for k, s in enumerate(bleu(refs, hyps, 4))}
    report["ROUGE-L"] = rouge_l(refs, hyps)
    report["CIDEr-D"] = cider_d(refs, hyps)
    return report
