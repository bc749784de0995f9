"""Utilities that compare two texts, for minimum-Bayes-risk decoding (pure Python, no torch).

chrF (Popović 2015, "chrF: character n-gram F-score for automatic MT evaluation"): character n-grams of orders
1..N taken after removing ALL whitespace (spaces, tabs, newlines, Unicode spaces: sacrebleu's default
`whitespace=False`, `''.join(line.split())` in sacrebleu/metrics/helpers.py: extract_all_char_ngrams), precision
and recall per order averaged over the orders both texts have (sacrebleu's default effective order, no epsilon
smoothing), combined as F_β = (1 + β²)·P·R / (β²·P + R) with β = 2 (recall weighted higher), times 100: sacrebleu's
sentence-level chrF with one reference.
"""

from __future__ import annotations

from collections import Counter


def char_ngrams(text: str, n: int) -> Counter:
    chars = "".join(text.split())  # every whitespace character goes, not only spaces
    return Counter(chars[i:i + n] for i in range(len(chars) - n + 1))


def chrf(hypothesis: str, reference: str, order: int = 6, beta: float = 2.0) -> float:
    """chrF of `hypothesis` against `reference`, in [0, 100]; 100 for two equal non-empty texts."""
    precisions, recalls = [], []
    for n in range(1, order + 1):
        hyp, ref = char_ngrams(hypothesis, n), char_ngrams(reference, n)
        if not hyp or not ref:
            continue
        matches = sum((hyp & ref).values())
        precisions.append(matches / sum(hyp.values()))
        recalls.append(matches / sum(ref.values()))
    if not precisions:
        return 0.0
    precision, recall = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if precision == 0 and recall == 0:
        return 0.0
    return 100 * (1 + beta ** 2) * precision * recall / (beta ** 2 * precision + recall)


def utility_matrix(texts: list[str]) -> list[list[float]]:
    """U[i][j] = chrF(texts[i] as hypothesis, texts[j] as reference)."""
    return [[chrf(a, b) for b in texts] for a in texts]


def expected_utilities(matrix: list[list[float]]) -> list[float]:
    """Each candidate's mean utility against the others (the Monte-Carlo estimate of its expected utility
    under the model, the samples standing in for references)."""
    size = len(matrix)
    if size < 2:
        return [0.0] * size
    return [sum(row[j] for j in range(size) if j != i) / (size - 1) for i, row in enumerate(matrix)]
