"""explorer.quality against independent references: hand-worked numbers, nltk's BLEU, mauve-text's MAUVE and
faiss's k-means, published Student-t quantiles (and scipy's where installed), the model's own HF module."""

import math
import random

import numpy as np
import pytest
import torch

from explorer import quality
from explorer.events import QualityProbe, RunStarted, TokenStep
from explorer.trace import Trace


def make_trace(tokens: list[int], logprobs: list[float] | None = None, prompt_ids: tuple[int, ...] = (1, 5, 6),
               coherence: float | None = None) -> Trace:
    started = RunStarted(run_id="0" * 12, strategy="greedy", config={}, model_id="tiny", weights_hash="h",
                         dtype="float32", device="cpu", seed=0, versions={}, prompt="p", chat=False,
                         system_prompt=None, prompt_ids=list(prompt_ids), max_new_tokens=len(tokens),
                         stop_strings=[], created_at="")
    trace = Trace(started)
    for i, (token, logprob) in enumerate(zip(tokens, logprobs or [-1.0] * len(tokens), strict=True)):
        trace.add(TokenStep(step=i, position=len(prompt_ids) + i, token_id=token, token_text=chr(64 + token),
                            logprob=logprob, rank=0, entropy=0.0, top_ids=[token], top_logprobs=[logprob],
                            top_texts=[chr(64 + token)], kept_top_ids=[token], kept_top_logprobs=[logprob],
                            kept_count=1, kept_logprob=logprob))
    if coherence is not None:
        trace.add(QualityProbe(coherence=coherence, layer=-1))
    return trace


# ---------------------------------------------------------------------------------------------- per run
def test_distinct_rep_and_diversity_on_a_hand_worked_run():
    # 1 2 1 2 1 3: unigrams 3 unique / 6; bigrams 12 21 12 21 13: 3 / 5; trigrams 121 212 121 213: 3 / 4;
    # 4-grams 1212 2121 1213: 3 / 3. SimCTG's diversity = (1 - rep-2)(1 - rep-3)(1 - rep-4) = 0.6 · 0.75 · 1.
    q = quality.run_quality(make_trace([1, 2, 1, 2, 1, 3], logprobs=[-1.0, -2.0, -3.0, -1.0, -2.0, -3.0]))
    assert q["length"] == 6
    assert q["distinct_1"] == pytest.approx(0.5) and q["distinct_2"] == pytest.approx(0.6)
    assert q["distinct_3"] == pytest.approx(0.75) and q["distinct_4"] == pytest.approx(1.0)
    assert q["rep_2"] == pytest.approx(0.4) and q["rep_3"] == pytest.approx(0.25) and q["rep_4"] == pytest.approx(0.0)
    assert q["diversity"] == pytest.approx(0.45)
    assert q["ngram_entropy"] == pytest.approx(math.log(3))  # three 4-grams, once each
    assert q["perplexity"] == pytest.approx(math.exp(2.0))  # mean negative log-probability 2
    assert q["coherence"] is None  # no quality_probe recorded
    assert set(q) == set(quality.QUALITY_KEYS)


def test_the_prompt_is_not_counted_and_short_runs_have_no_ngrams():
    q = quality.run_quality(make_trace([7, 7], prompt_ids=(7, 7, 7, 7, 7)))
    assert q["distinct_1"] == pytest.approx(0.5) and q["distinct_2"] == pytest.approx(1.0)
    assert q["distinct_3"] is None and q["rep_4"] is None and q["diversity"] is None and q["ngram_entropy"] is None
    empty = quality.run_quality(make_trace([]))
    assert empty["length"] == 0 and empty["distinct_1"] is None and empty["perplexity"] is None


def test_ngram_entropy_on_a_hand_worked_example():
    # 1 2 3 4 1 2 3 4: 4-grams 1234 2341 3412 4123 1234, frequencies 2/5, 1/5, 1/5, 1/5
    expected = -(0.4 * math.log(0.4) + 3 * 0.2 * math.log(0.2))  # 1.33218 nats
    assert quality.ngram_entropy([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1.3321790402101223)
    assert quality.ngram_entropy([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(expected)
    assert quality.ngram_entropy([5, 5, 5, 5, 5, 5]) == 0.0  # one 4-gram three times
    assert quality.ngram_entropy([1, 2, 1, 1], n=1) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_recorded_coherence_reads_the_quality_probe():
    assert quality.recorded_coherence(make_trace([1, 2], coherence=0.25)) == 0.25
    assert quality.run_quality(make_trace([1, 2], coherence=0.25))["coherence"] == 0.25


def test_coherence_against_the_hf_module_directly(tiny):
    prompt, continuation = [1, 40, 41, 42, 43], [50, 51, 52, 50]
    with torch.no_grad():
        states = tiny.model(input_ids=torch.tensor([prompt + continuation]), output_hidden_states=True).hidden_states
    passes = tiny.forward_passes
    for layer in (-1, 0, 1):
        hidden = states[layer][0].double().numpy()  # (9, hidden)
        a, b = hidden[:len(prompt)].mean(0), hidden[len(prompt):].mean(0)
        expected = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert quality.coherence(tiny, prompt, continuation, layer=layer) == pytest.approx(expected, abs=1e-5)
    assert tiny.forward_passes == passes  # the probe's pass is not the caller's
    assert quality.coherence(tiny, prompt, []) is None and quality.coherence(tiny, [], continuation) is None
    with pytest.raises(ValueError, match="layer must be in"):
        quality.coherence(tiny, prompt, continuation, layer=7)


# -------------------------------------------------------------------------------------------- self-BLEU
def test_bleu_matches_nltk_sentence_bleu_with_method1():
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    smooth = bleu_score.SmoothingFunction().method1
    rng = random.Random(0)
    for _ in range(300):
        hypothesis = [rng.randrange(5) for _ in range(rng.randrange(0, 10))]
        references = [[rng.randrange(5) for _ in range(rng.randrange(0, 10))] for _ in range(rng.randrange(1, 4))]
        n = rng.choice([1, 2, 3, 4])
        theirs = bleu_score.sentence_bleu(references, hypothesis, (1 / n,) * n, smoothing_function=smooth)
        assert quality.bleu(hypothesis, references, n) == pytest.approx(theirs, abs=1e-12)


def test_self_bleu_matches_texygen_with_nltk():
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    smooth = bleu_score.SmoothingFunction().method1
    rng = random.Random(1)
    samples = [[rng.randrange(8) for _ in range(rng.randrange(4, 16))] for _ in range(6)]
    # Texygen's SelfBleu.get_bleu_parallel: each sample against all the others, BLEU-4, method 1, averaged
    terms = [bleu_score.sentence_bleu(samples[:i] + samples[i + 1:], s, (0.25,) * 4, smoothing_function=smooth)
             for i, s in enumerate(samples)]
    assert quality.self_bleu(samples) == pytest.approx(sum(terms) / len(terms), abs=1e-12)
    assert quality.self_bleu_scores(samples) == pytest.approx(terms, abs=1e-12)
    texts = ["the cat sat on the mat", "the cat sat on a mat", "a dog ran in the park"]
    split = [t.split() for t in texts]
    expected = sum(bleu_score.sentence_bleu(split[:i] + split[i + 1:], s, smoothing_function=smooth)
                   for i, s in enumerate(split)) / 3
    assert quality.self_bleu(texts) == pytest.approx(expected, abs=1e-12)
    assert quality.self_bleu([[1, 2, 3, 4, 5]] * 3) == pytest.approx(1.0)  # identical samples
    assert quality.self_bleu([[1, 2, 3]]) is None


# ------------------------------------------------------------------------------------------------ MAUVE
def gaussian(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_kmeans_reproduces_faiss():
    faiss = pytest.importorskip("faiss")
    for seed, (n, d, k) in enumerate([(120, 6, 12), (300, 10, 30), (90, 3, 9), (600, 4, 2)]):  # the last: subsampled
        data = gaussian(seed, n, d).astype(np.float32)
        kmeans = faiss.Kmeans(d, k, niter=500, nredo=5, update_index=True, seed=27)
        kmeans.train(data)
        theirs = kmeans.index.search(data, 1)[1].ravel()
        np.testing.assert_array_equal(quality._faiss_kmeans(data, k, niter=500, nredo=5, seed=27), theirs)


@pytest.mark.parametrize(("n", "d", "shift"), [(100, 8, 0.0), (150, 16, 0.3), (200, 12, 0.6), (120, 20, 3.0)])
def test_mauve_matches_mauve_text(n, d, shift):
    pytest.importorskip("faiss")
    pytest.importorskip("sklearn")
    compute_mauve = pytest.importorskip("mauve").compute_mauve
    p, q = gaussian(n, n, d), gaussian(n + 1, n + 13, d, shift)
    theirs = compute_mauve(p_features=p, q_features=q).mauve
    assert quality.mauve(p, q) == pytest.approx(theirs, abs=0.05)
    if shift >= 3.0:
        assert theirs < 0.1  # far apart


def test_mauve_of_identical_and_far_apart_features():
    p = gaussian(0, 80, 8)
    assert quality.mauve(p, p) == pytest.approx(1.0, abs=1e-6)
    assert quality.mauve(p, gaussian(1, 80, 8, shift=5.0)) < 0.05
    with pytest.raises(ValueError, match="same width"):
        quality.mauve(p, gaussian(2, 80, 4))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # mauve-text passes past_key_values=None
def test_features_are_mauve_texts_final_token_states(tiny):
    featurize = pytest.importorskip("mauve.utils").featurize_tokens_from_model
    sequences = [[1, 40, 41, 42], [1, 50, 51], [1, 60, 61, 62, 63, 64]]
    theirs = featurize(tiny.model, [torch.tensor([s]) for s in sequences], batch_size=1).double().numpy()
    np.testing.assert_allclose(quality.features_of(tiny, sequences), theirs, atol=1e-5)


# --------------------------------------------------------------------------------------- intervals over seeds
# t_{0.975, df} as printed in every t table
T_TABLE = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045}


def test_t_quantiles_match_the_table_and_scipy():
    for df, value in T_TABLE.items():
        assert quality.t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
    assert quality.t_quantile(0.025, 4) == pytest.approx(-2.776, abs=5e-4)
    try:
        from scipy import stats
    except ImportError:
        return
    for probability in (0.6, 0.9, 0.95, 0.975, 0.995, 0.9995):
        for df in (1, 2, 3, 4.5, 7, 10, 30, 120, 1000):
            expected = stats.t.ppf(probability, df)
            assert quality.t_quantile(probability, df) == pytest.approx(expected, rel=1e-8)


def test_mean_interval_is_the_student_t_interval():
    for df, t in T_TABLE.items():
        values = [float(v * v % 7) for v in range(df + 1)]
        mean, low, high = quality.mean_interval(values)
        assert mean == pytest.approx(sum(values) / len(values))
        spread = math.sqrt(sum((v - mean) ** 2 for v in values) / df / len(values))  # s / √n
        assert (high - mean) / spread == pytest.approx(t, abs=5e-4) and mean - low == pytest.approx(high - mean)
    assert quality.mean_interval([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((3.0, 3.0 - 1.963243, 3.0 + 1.963243))
    assert quality.mean_interval([2.5, None, float("nan")]) == (2.5, 2.5, 2.5)  # one value: no spread
    assert quality.mean_interval([None, float("nan")]) is None and quality.mean_interval([]) is None


def test_group_quality(tiny):
    traces = [make_trace([1, 2, 3, 4, 1, 2], logprobs=[-1.0] * 6), make_trace([1, 2, 3, 5, 6, 7]),
              make_trace([2, 3, 4, 1, 2, 3], coherence=0.5)]
    group = quality.group_quality(traces)
    assert group["runs"] == 3 and group["mauve"] is None
    assert group["length"] == (6.0, 6.0, 6.0) and group["coherence"] == (0.5, 0.5, 0.5)
    distinct_2 = [4 / 5, 1.0, 4 / 5]
    assert group["distinct_2"] == pytest.approx(quality.mean_interval(distinct_2))
    assert group["self_bleu_4"][0] == pytest.approx(quality.self_bleu([t.token_ids for t in traces]))
    with_mauve = quality.group_quality(traces, reference_texts=["Hello there, friend.", "Once upon a time"], model=tiny)
    assert 0.0 <= with_mauve["mauve"] <= 1.0
