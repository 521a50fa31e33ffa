"""Text overlap metrics of the language-model recipes, written out here (no dependency):
exact match and token F1 as extractive QA scores them (after `normalize`), and ROUGE-L (the
longest common subsequence of words, as an F-measure with beta = 1)."""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = {"a", "an", "the"}
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> list[str]:
    """Lower case, punctuation removed (so "2,254" is "2254"), articles dropped: the words compared."""
    return [w for w in text.lower().translate(_PUNCT).split() if w not in _ARTICLES]


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalized words shared (as a multiset); two empty texts match (1.0)."""
    pred, ref = normalize(prediction), normalize(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def words(text: str) -> list[str]:
    """ROUGE's tokens: lower-cased runs of letters and digits."""
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence (dynamic programming, one row kept)."""
    if len(b) > len(a):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diag = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            diag, row[j] = row[j], (diag + 1 if x == y else max(row[j], row[j - 1]))
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: LCS / len(prediction) and LCS / len(reference), their harmonic mean."""
    pred, ref = words(prediction), words(reference)
    lcs = lcs_length(pred, ref)
    if not lcs:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else float("nan")
