"""Text-quality metrics of runs: per run (from the trace alone, plus a coherence the model measured once) and per
group of runs of one configuration over seeds (a mean and a 95 % Student-t interval of each per-run number,
self-BLEU among the runs, MAUVE against a reference set).

Per run, over the generated token ids (`Trace.token_ids`; the prompt is never counted):
- distinct-n (n = 1..4) = unique n-grams / total n-grams. Li et al. 2016 ("A Diversity-Promoting Objective
  Function for Neural Conversation Models", arXiv 1510.03055) divide by the number of generated *tokens*;
  departure: we divide by the number of n-grams, as the issue asks (the two differ by n - 1 in the denominator).
- rep-n = 1 - unique n-grams / total n-grams, and diversity = prod_{n=2..4} (1 - rep-n): Su et al. 2022, "A
  Contrastive Framework for Neural Text Generation" (SimCTG, arXiv 2202.06417), sec. 5, after Welleck et al.
  2020's seq-rep-n (arXiv 1908.04319). As fractions in [0, 1], not the paper's percentages.
- n-gram entropy = Ent-4 of Zhang et al. 2018, "Generating Informative and Diverse Conversational Responses via
  Adversarial Information Maximization" (arXiv 1809.05972): the entropy (natural log) of the empirical 4-gram
  distribution, -sum_w F(w)/Z log(F(w)/Z) with F(w) the count of 4-gram w and Z = sum_w F(w), as their
  evaluation code computes it; here over one run's tokens instead of a whole test set.
- perplexity: `Trace.perplexity` (exp of the mean negative log-probability of the chosen tokens, raw model).
- coherence: Su & Collier 2022, "Contrastive Search Is What You Need For Neural Text Generation" (arXiv
  2210.14140), sec. 3: cos(v_x, v_x̂), the cosine of the SimCSE embeddings of the prefix x and the continuation x̂.
  Departure (as the issue asks): v = the mean of the run's own model's hidden states (last layer by default) over
  the prefix's positions and over the continuation's, from one causal pass over both (`coherence`). A run holds
  it as a `quality_probe` event (`recorded_coherence`).

Per group: self-BLEU-4 (Zhu et al. 2018, "Texygen", arXiv 1802.01886: each sample's BLEU-4 against all the
others as references, averaged; our BLEU reproduces nltk's `sentence_bleu` with `SmoothingFunction().method1`,
which Texygen calls) and MAUVE (Pillutla et al. 2021, arXiv 2102.01454) as the `mauve-text` package (v0.4)
computes it from features, reimplemented in numpy (`mauve`). torch is imported only where the model runs.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from explorer.models import LanguageModel


class Trace(Protocol):
    """What the metrics read of a run (explorer.trace.Trace; typed structurally, so that Trace can use this
    module's n-gram statistics without an import circle)."""

    events: list[Any]
    started: Any

    @property
    def token_ids(self) -> list[int]: ...

    @property
    def perplexity(self) -> float: ...

    @property
    def text(self) -> str: ...

    @property
    def status(self) -> str: ...

Interval = tuple[float, float, float]  # (mean, low, high)
QUALITY_KEYS = ("length", "perplexity", "distinct_1", "distinct_2", "distinct_3", "distinct_4", "rep_2", "rep_3",
                "rep_4", "diversity", "ngram_entropy", "coherence")
NGRAM_ENTROPY_N = 4  # Zhang et al. 2018 report Ent-4


# ------------------------------------------------------------------------------------------- n-gram statistics
def ngrams(tokens: Sequence[Any], n: int) -> list[tuple[Any, ...]]:
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens: Sequence[Any], n: int) -> float | None:
    """Unique n-grams / total n-grams of `tokens`; None when it has fewer than n tokens."""
    grams = ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else None


def rep_n(tokens: Sequence[Any], n: int) -> float | None:
    """SimCTG's rep-n as a fraction: 1 - unique n-grams / total n-grams (0 = no n-gram repeats)."""
    distinct = distinct_n(tokens, n)
    return None if distinct is None else 1.0 - distinct


def diversity(tokens: Sequence[Any]) -> float | None:
    """SimCTG's diversity = prod_{n=2..4} (1 - rep-n); None below 4 tokens (no 4-gram)."""
    reps = [rep_n(tokens, n) for n in (2, 3, 4)]
    return None if None in reps else math.prod(1.0 - r for r in reps)


def ngram_entropy(tokens: Sequence[Any], n: int = NGRAM_ENTROPY_N) -> float | None:
    """Zhang et al. 2018's Ent-n: entropy (nats) of the empirical n-gram distribution; None without n-grams."""
    counts = Counter(ngrams(tokens, n))
    total = sum(counts.values())
    if not total:
        return None
    return -sum(c / total * math.log(c / total) for c in counts.values())


# --------------------------------------------------------------------------------------------------- per run
def recorded_coherence(trace: Trace) -> float | None:
    """The coherence the run's `quality_probe` event holds (the last one), or None where it has none."""
    for event in reversed(trace.events):
        if getattr(event, "kind", None) == "quality_probe":
            return getattr(event, "coherence", None)
    return None


def run_quality(trace: Trace) -> dict[str, float | None]:
    """The per-run numbers of `QUALITY_KEYS` (None where they do not apply), over the generated token ids."""
    ids = trace.token_ids
    perplexity = trace.perplexity
    return {
        "length": len(ids),
        "perplexity": perplexity if math.isfinite(perplexity) else None,
        **{f"distinct_{n}": distinct_n(ids, n) for n in (1, 2, 3, 4)},
        **{f"rep_{n}": rep_n(ids, n) for n in (2, 3, 4)},
        "diversity": diversity(ids),
        "ngram_entropy": ngram_entropy(ids),
        "coherence": recorded_coherence(trace),
    }


def coherence(model: LanguageModel, prompt_ids: Sequence[int], token_ids: Sequence[int], layer: int = -1
              ) -> float | None:
    """cos(mean of the prompt's hidden states, mean of the continuation's), from one forward pass over prompt +
    continuation; `layer` indexes the hidden states (0 = embeddings, -1 = the last layer, after the final norm).
    The model is causal, so the continuation's states have seen the prompt (SimCSE encodes the two apart: a
    departure). None when either part is empty. The pass does not count toward `model.forward_passes`."""
    import torch

    prompt, continuation = list(prompt_ids), list(token_ids)
    if not prompt or not continuation:
        return None
    hidden = model.for_run().session().forward(prompt + continuation, all_logits=False, hidden_states=True).hidden
    if not -len(hidden) <= layer < len(hidden):  # hidden: (layers + 1, prompt + continuation, hidden)
        raise ValueError(f"layer must be in [{-len(hidden)}, {len(hidden) - 1}] for this model "
                         "(0 = embeddings, -1 = the last layer)")
    states = hidden[layer].double()  # (prompt + continuation, hidden)
    cosine = torch.nn.functional.cosine_similarity(states[:len(prompt)].mean(0), states[len(prompt):].mean(0), dim=0)
    return float(cosine)


# ------------------------------------------------------------------------------------------------- self-BLEU
def bleu(hypothesis: Sequence[Any], references: Sequence[Sequence[Any]], n: int = 4) -> float:
    """Sentence BLEU-n with uniform weights, as nltk's `sentence_bleu(references, hypothesis,
    smoothing_function=SmoothingFunction().method1)`: modified n-gram precisions (each hypothesis n-gram count
    clipped at its largest count in any one reference), brevity penalty exp(1 - r/c) with r the reference length
    closest to c (the shorter on a tie), 0 when no unigram matches; method 1 gives a precision with no match
    epsilon = 0.1 matches (Chen & Cherry 2014)."""
    if not references:
        raise ValueError("BLEU needs at least one reference")
    log_precisions = []
    for order in range(1, n + 1):
        counts = Counter(ngrams(hypothesis, order))
        most: dict[tuple[Any, ...], int] = {}
        for reference in references:
            theirs = Counter(ngrams(reference, order))
            for gram in counts:
                most[gram] = max(most.get(gram, 0), theirs[gram])
        matches = sum(min(count, most[gram]) for gram, count in counts.items())
        if order == 1 and matches == 0:
            return 0.0
        log_precisions.append(math.log((matches or 0.1) / max(1, sum(counts.values()))))
    length = len(hypothesis)
    closest = min((len(r) for r in references), key=lambda r: (abs(r - length), r))
    brevity = 1.0 if length > closest else math.exp(1 - closest / length)
    return brevity * math.exp(math.fsum(log_precisions) / n)


def _tokens(sample: str | Sequence[Any]) -> list[Any]:
    return sample.split() if isinstance(sample, str) else list(sample)  # texts: whitespace words (Texygen: nltk's)


def self_bleu_scores(samples: Sequence[str | Sequence[Any]], n: int = 4) -> list[float]:
    """Each sample's BLEU-n against all the other samples as references (Texygen's Self-BLEU terms)."""
    tokens = [_tokens(s) for s in samples]
    return [bleu(t, tokens[:i] + tokens[i + 1:], n) for i, t in enumerate(tokens)] if len(tokens) > 1 else []


def self_bleu(samples: Sequence[str | Sequence[Any]], n: int = 4) -> float | None:
    """Self-BLEU-n (Texygen): the mean of `self_bleu_scores`; None below two samples. Token id lists by default;
    a text is split on white space (Texygen tokenises with nltk's word_tokenize: a departure)."""
    scores = self_bleu_scores(samples, n)
    return statistics.fmean(scores) if scores else None


# ----------------------------------------------------------------------------------------------------- MAUVE
def features_of(model: LanguageModel, samples: Sequence[str | Sequence[int]], max_length: int = 1024
                ) -> np.ndarray:
    """MAUVE features as mauve-text computes them with GPT-2: the last layer's hidden state (after the final norm)
    at the final token of each sample, (samples, hidden) float64. A text is tokenised as prompts are (the
    tokenizer's special tokens added); empty samples are dropped, as mauve-text drops empty texts; each is cut to
    its first `max_length` tokens (mauve-text's max_text_length)."""
    sequences = [list(model.tokenizer(s, add_special_tokens=True)["input_ids"]) if isinstance(s, str) else list(s)
                 for s in samples if len(s)]
    view = model.for_run()  # the passes are not the run's
    rows = [view.session().forward(ids[:max_length], all_logits=False, hidden_states=True).hidden[-1, -1]
            for ids in sequences if ids]
    if not rows:
        raise ValueError("no non-empty sample to featurise: give at least one text or token list")
    return np.stack([row.double().cpu().numpy() for row in rows])


def mauve(p_features: Any, q_features: Any, *, num_buckets: int | str = "auto", scaling: float = 5.0,
          seed: int = 25, explained_variance: float = 0.9, kmeans_num_redo: int = 5, kmeans_max_iter: int = 500,
          discretization: int = 25) -> float:
    """MAUVE of P (conventionally the reference texts' features) and Q (the generations'), (n, d) arrays, as
    mauve-text's `compute_mauve(p_features=..., q_features=...).mauve` (same defaults and argument meanings):

    1. quantise: stack [Q; P], L2-normalise the rows, PCA (centred, unwhitened) keeping the fewest leading
       components that explain `explained_variance` of the variance, cast to float32, then k-means with
       k = `num_buckets` ("auto": max(2, round(min(n_P, n_Q) / 10))) exactly as faiss.Kmeans runs it
       (`_faiss_kmeans`); the histograms of P's and Q's cluster labels are P and Q;
    2. divergence curve: for λ in `discretization` points linspace(1e-6, 1 - 1e-6), R_λ = λP + (1 - λ)Q and the
       point (exp(-c KL(Q‖R_λ)), exp(-c KL(P‖R_λ))), c = `scaling`, plus the end points (1, 0) and (0, 1);
    3. MAUVE = the mean of the areas under the curve read along x and along y (trapezoids, points sorted by
       np.argsort as mauve-text sorts them).

    The k-means starts from the same points, scans the same donors for empty clusters and keeps the same redo as
    faiss's; it computes in float64 on the float32 data where faiss computes in float32, so a point equidistant
    from two centroids up to rounding may fall the other way (e.g. copies of one point once faiss has split
    their cluster in two mirror-image centroids); otherwise the clusters, and the score, are mauve-text's."""
    p = _feature_matrix(p_features, "p_features")
    q = _feature_matrix(q_features, "q_features")
    if p.shape[1] != q.shape[1]:
        raise ValueError(f"p_features and q_features must have the same width, got {p.shape[1]} and {q.shape[1]}")
    if num_buckets == "auto":
        num_buckets = max(2, int(round(min(len(p), len(q)) / 10)))
    if not isinstance(num_buckets, (int, np.integer)) or isinstance(num_buckets, bool) or num_buckets < 1:
        raise ValueError('num_buckets must be "auto" or a positive integer')
    num_buckets = int(num_buckets)
    if kmeans_num_redo < 1 or kmeans_max_iter < 1 or discretization < 1:
        raise ValueError("kmeans_num_redo, kmeans_max_iter and discretization must be at least 1")
    if num_buckets > len(p) + len(q):
        raise ValueError(f"num_buckets ({num_buckets}) must be at most the number of points ({len(p) + len(q)})")
    if not 0 < explained_variance < 1:
        raise ValueError("explained_variance must be in (0, 1)")
    # 1. quantise
    data = np.vstack([q, p])
    norms = np.linalg.norm(data, axis=1, keepdims=True)
    data = data / np.where(norms > 0, norms, 1.0)  # sklearn's normalize leaves a zero row alone
    centred = data - data.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    variance = singular ** 2
    kept = int(np.argmax(np.cumsum(variance) / variance.sum() >= explained_variance)) + 1 if variance.sum() else 1
    reduced = (centred @ components[:kept].T).astype(np.float32)  # (n_Q + n_P, kept)
    labels = _faiss_kmeans(reduced, num_buckets, niter=kmeans_max_iter, nredo=kmeans_num_redo, seed=seed + 2)
    q_hist = np.bincount(labels[:len(q)], minlength=num_buckets) / len(q)
    p_hist = np.bincount(labels[len(q):], minlength=num_buckets) / len(p)
    # 2. divergence curve
    points = [[0.0, math.inf]]
    for weight in np.linspace(1e-6, 1 - 1e-6, discretization):
        mixture = weight * p_hist + (1 - weight) * q_hist
        points.append([_kl(q_hist, mixture), _kl(p_hist, mixture)])
    points.append([math.inf, 0.0])
    x, y = np.exp(-scaling * np.asarray(points)).T
    # 3. area
    by_x, by_y = np.argsort(x), np.argsort(y)
    return float(0.5 * (np.trapezoid(y[by_x], x[by_x]) + np.trapezoid(x[by_y], y[by_y])))


def _feature_matrix(features: Any, name: str) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or len(array) == 0:
        raise ValueError(f"{name} must be a non-empty (samples, features) array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values: featurise again")
    return array


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    if np.any((p != 0) & (q == 0)):
        return math.inf
    both = (p != 0) & (q != 0)
    return float(np.sum(p[both] * np.log(p[both] / q[both])))


class _MersenneTwister:
    """std::mt19937 seeded with a 32-bit integer (faiss's RandomGenerator): numpy's MT19937 with the same
    (init_genrand) seeding, read a raw 32-bit word at a time."""

    def __init__(self, seed: int):
        self.bits = np.random.MT19937()
        self.bits.state = np.random.RandomState(seed & 0xFFFFFFFF).get_state(legacy=False)

    def words(self, count: int) -> np.ndarray:
        return self.bits.random_raw(count)  # (count,) uint64 holding 32-bit words

    def rand_float(self) -> np.float32:
        return np.float32(np.float32(self.bits.random_raw()) / np.float32(4294967295.0))  # mt() / float(mt.max())


def _rand_perm(n: int, seed: int) -> np.ndarray:
    """faiss::rand_perm: a Fisher-Yates shuffle of 0..n-1 by std::mt19937(seed), i2 = i + mt() % (n - i)."""
    perm = np.arange(n)
    words = _MersenneTwister(seed).words(max(0, n - 1))
    for i in range(n - 1):
        other = i + int(words[i]) % (n - i)
        perm[i], perm[other] = perm[other], perm[i]
    return perm


_SPLIT_EPS = 1.0 / 1024  # faiss: a bit above float16's machine epsilon


def _split_clusters(centroids: np.ndarray, counts: np.ndarray, n: int) -> None:
    """faiss's empty-cluster handling, in place: an empty cluster takes a copy of a donor, picked with probability
    (size - 1) / (n - k) scanning from cluster 0 (the largest after 10 k tries), and the two are pushed apart
    by a factor 1 ± 1/1024 on alternate coordinates; the donor's count is shared out between them."""
    k = len(counts)
    rng = _MersenneTwister(1234)  # faiss seeds a fresh generator at every call
    for empty in range(k):
        if counts[empty] != 0:
            continue
        donor, found = 0, False
        for _ in range(10 * k):
            chance = np.float32((float(counts[donor]) - 1.0) / float(np.float32(n - k)))
            if rng.rand_float() < chance:
                found = True
                break
            donor = (donor + 1) % k
        if not found:
            donor = int(np.argmax(counts))
        centroids[empty] = centroids[donor]
        sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0)
        centroids[empty] *= 1 + sign * _SPLIT_EPS
        centroids[donor] *= 1 - sign * _SPLIT_EPS
        counts[empty] = counts[donor] / 2
        counts[donor] -= counts[empty]


def _nearest(points: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each point's nearest centroid (the first on a tie) and the squared distance to it."""
    # sums of squared differences, as faiss's flat index computes them below 128000 coordinates: two copies of a
    # centroid then tie exactly (|x|² - 2x·c + |c|² by BLAS may round them apart and pick the other one)
    chunk = max(1, 2_000_000 // max(1, centroids.size))
    nearest = np.empty(len(points), dtype=np.int64)
    distance = np.empty(len(points))
    for start in range(0, len(points), chunk):
        block = points[start:start + chunk]
        squared = ((block[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)  # (block, centroids)
        nearest[start:start + chunk] = squared.argmin(1)
        distance[start:start + chunk] = squared[np.arange(len(block)), nearest[start:start + chunk]]
    return nearest, distance


def _faiss_kmeans(data: np.ndarray, k: int, *, niter: int, nredo: int, seed: int,
                  max_points_per_centroid: int = 256) -> np.ndarray:
    """faiss.Kmeans(d, k, niter, nredo, seed).train(data) then the nearest final centroid of every point (faiss
    1.15 Clustering::train_encoded, random initialisation, L2): subsample to k * 256 points by rand_perm(seed)
    when there are more; for each redo r, start from the points perm[:k] with perm = rand_perm(seed + 1 + r *
    15486557), run Lloyd iterations (assign, recompute means, split empty clusters) until the objective stops
    changing or `niter` iterations; keep the redo with the lowest objective (sum of squared distances at its last
    assignment)."""
    points = data.astype(np.float64)
    n = len(points)
    if n < k:
        raise ValueError(f"k-means needs at least as many points ({n}) as clusters ({k})")
    if n == k:  # faiss: the points are the centroids
        return _nearest(points, points)[0]
    train = points
    if n > k * max_points_per_centroid:
        train = points[_rand_perm(n, seed)[:k * max_points_per_centroid]]
    best, best_objective = None, math.inf
    for redo in range(nredo):
        centroids = train[_rand_perm(len(train), seed + 1 + redo * 15486557)[:k]].copy()
        previous = None
        for _ in range(niter):
            assign, distances = _nearest(train, centroids)
            objective = float(distances.sum())
            counts = np.bincount(assign, minlength=k).astype(np.float64)
            sums = np.zeros_like(centroids)
            np.add.at(sums, assign, train)
            centroids = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 0.0)
            _split_clusters(centroids, counts, len(train))
            if previous is not None and previous != 0 and objective == previous:  # faiss: early stop at 0 change
                break
            previous = objective
        if objective < best_objective or best is None:
            best, best_objective = centroids, objective
    return _nearest(points, best)[0]


# ----------------------------------------------------------------------------------------- intervals over seeds
def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes' betacf)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1 - x) / b


def t_quantile(probability: float, df: float) -> float:
    """The `probability` quantile of Student's t with `df` degrees of freedom: for t > 0, P(T > t) =
    I_{df/(df+t²)}(df/2, 1/2) / 2, solved for x = df/(df+t²) by bisection (I rises with x)."""
    if not 0 < probability < 1 or not df > 0:
        raise ValueError("t_quantile needs a probability in (0, 1) and df > 0")
    if probability == 0.5:
        return 0.0
    if probability < 0.5:
        return -t_quantile(1 - probability, df)
    tail = 2 * (1 - probability)
    low, high = 0.0, 1.0
    while True:
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if regularized_beta(df / 2, 0.5, middle) < tail:
            low = middle
        else:
            high = middle
    return math.sqrt(df * (1 - middle) / middle)


def mean_interval(values: Iterable[float | int | None], confidence: float = 0.95) -> Interval | None:
    """(mean, low, high): the mean of the finite values and its two-sided Student-t interval, mean ± t_{(1+c)/2,
    n-1} s/√n with s the sample standard deviation. One value: its interval is the value itself (no spread to
    measure). None without a finite value (None and NaN are left out)."""
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1), e.g. 0.95")
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    mean = statistics.fmean(finite)
    if len(finite) == 1:
        return mean, mean, mean
    half = t_quantile((1 + confidence) / 2, len(finite) - 1) * statistics.stdev(finite) / math.sqrt(len(finite))
    return mean, mean - half, mean + half


# --------------------------------------------------------------------------------------------------- per group
def group_quality(traces: Sequence[Trace], reference_texts: Sequence[str] | None = None,
                  model: LanguageModel | None = None) -> dict[str, Any]:
    """The numbers of one group of runs (one configuration over seeds; the caller groups them): `runs`; every
    `QUALITY_KEYS` number as (mean, low, high) over the runs (None where no run has it); `self_bleu_4` as (mean,
    low, high) over the runs' Self-BLEU-4 terms (the interval is indicative: each term uses the other runs as
    references, so the terms are not independent; None below two runs); `mauve`, with `reference_texts` and
    `model`: MAUVE of the references (P) against the runs' prompt + output (Q), featurised by `model` (one
    number for the group; None without them)."""
    per_run = [run_quality(t) for t in traces]
    numbers: dict[str, Any] = {"runs": len(traces)}
    numbers |= {key: mean_interval(q[key] for q in per_run) for key in QUALITY_KEYS}
    numbers["self_bleu_4"] = mean_interval(self_bleu_scores([t.token_ids for t in traces], 4)) \
        if len(traces) > 1 else None
    numbers["mauve"] = None
    if reference_texts and model is not None and traces:
        generated = features_of(model, [list(t.started.prompt_ids) + t.token_ids for t in traces])
        numbers["mauve"] = mauve(features_of(model, reference_texts), generated)
    return numbers


MAX_REFERENCES = 5000


def load_reference_texts(path: str | Path) -> list[str]:
    """MAUVE's reference texts from a file: JSON lines (a string, or an object with "text"), else one text per
    line; blank lines skipped, at most MAX_REFERENCES. Bad input: one-line ValueError."""
    import json

    from explorer.paths import read_lines

    path = Path(path)
    lines = [line for line in read_lines(path, "reference file", "JSON lines or one text per line") if line.strip()]
    texts = []
    for number, line in enumerate(lines[:MAX_REFERENCES], start=1):
        if line.lstrip().startswith(("{", '"')):
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path.name}:{number}: not JSON ({error.msg})") from None
            value = value.get("text") if isinstance(value, dict) else value
            if not isinstance(value, str):
                raise ValueError(f'{path.name}:{number}: expected a string or an object with a "text" string')
            texts.append(value)
        else:
            texts.append(line)
    if len(texts) < 2:
        raise ValueError(f"{path.name}: MAUVE needs at least two reference texts")
    return texts
