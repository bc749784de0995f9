"""Minimum Bayes risk decoding: chrF on hand-checked pairs, the consensus choice, and the strategy's record."""

import pytest
import torch

from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies.mbr import mbr_choice
from explorer.utility import chrf, expected_utilities

PROMPT = "the cat sat on the mat. the cat"


def test_chrf_on_hand_checked_pairs():
    assert chrf("the cat", "the cat") == pytest.approx(100.0)
    assert chrf("abc", "xyz") == 0.0 and chrf("", "abc") == 0.0
    # "ab" vs "abc": unigrams P 2/2, R 2/3; bigrams P 1/1, R 1/2; orders 3..6: the hypothesis has none
    precision, recall = (1 + 1) / 2, (2 / 3 + 1 / 2) / 2
    expected = 100 * 5 * precision * recall / (4 * precision + recall)
    assert chrf("ab", "abc") == pytest.approx(expected)
    assert chrf("a b", "ab") == pytest.approx(100.0)  # spaces are not characters to chrF


def test_chrf_removes_every_whitespace_character_as_sacrebleu_does():
    """sacrebleu (whitespace=False) joins `line.split()`: tabs, newlines and Unicode spaces go, not only spaces and
    not only the ends. Here stripping only the ends (or only " ") would leave "\n" and "\t" as characters."""
    assert chrf("the cat\nsat", "the cat sat") == pytest.approx(100.0)
    assert chrf("a\tb\u00a0c", "abc") == pytest.approx(100.0)
    # "ab\ncd" vs "abcd" with the newline kept: unigrams P 4/5, bigrams P 2/4, trigrams P 0/3, 4-grams P 0/2;
    # recalls 4/4, 2/3, 0/2, 0/1; all-whitespace removal makes the two texts equal instead
    precision, recall = (4 / 5 + 2 / 4) / 4, (1 + 2 / 3) / 4
    kept = 100 * 5 * precision * recall / (4 * precision + recall)
    assert chrf("ab\ncd", "abcd") == pytest.approx(100.0) != pytest.approx(kept)


SACREBLEU_PAIRS = [
    ("the cat sat on the mat", "the cat sat on a mat"),
    ("the cat\nsat on\tthe mat.", "The cat sat on the mat"),
    ("  a dog ran in the park  ", "a dog\n\nran in the\u2003park"),
    ("ab", "abc"),
    ("abc", "xyz"),
    ("x", "a much longer reference text"),
    ("Once upon a time, there was a tiny model.\n\nIt said hello.", "Once upon a time there was a model. Hello!"),
]


@pytest.mark.parametrize("hypothesis, reference", SACREBLEU_PAIRS)
def test_chrf_equals_sacrebleus_sentence_chrf(hypothesis, reference):
    sacrebleu = pytest.importorskip("sacrebleu")
    expected = sacrebleu.sentence_chrf(hypothesis, [reference]).score
    assert chrf(hypothesis, reference) == pytest.approx(expected, abs=1e-9)


def test_mbr_picks_the_consensus_not_the_outlier():
    texts = ["the cat sat on the mat", "the cat sat on a mat", "a dog ran in the park", "the cat sat on the mat."]
    chosen, matrix, expected = mbr_choice(texts)
    assert chosen in (0, 3) and min(range(4), key=lambda i: expected[i]) == 2
    assert expected == pytest.approx(expected_utilities(matrix))
    assert expected[0] == pytest.approx((matrix[0][1] + matrix[0][2] + matrix[0][3]) / 3)


def test_the_run_commits_the_mbr_choice_and_records_every_candidate(tiny_flat):
    request = RunRequest.build("mbr", {"samples": 5}, PROMPT, max_new_tokens=10, chat=False, seed=4)
    trace = run_to_end(tiny_flat, request)
    result = next(e for e in trace.events if e.kind == "mbr_result")
    assert len(result.candidates) == 5 and len(result.utilities) == 5 and all(len(r) == 5 for r in result.utilities)
    assert result.chosen == mbr_choice(result.texts)[0]
    assert trace.token_ids == result.candidates[result.chosen]
    assert [s.logprob for s in trace.token_steps] and sum(s.logprob for s in trace.token_steps) == pytest.approx(
        result.logprobs[result.chosen], abs=1e-3)
    assert result.best_by_logprob == max(range(5), key=lambda i: result.logprobs[i])
    assert run_to_end(tiny_flat, request).token_ids == trace.token_ids  # seeded
    greedy = run_to_end(tiny_flat, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=10, chat=False))
    assert result.greedy_ids == greedy.token_ids  # the comparison row is greedy decoding
    with pytest.raises(ValueError, match="use fewer samples or fewer new tokens"):  # refused before it runs
        RunRequest.build("mbr", {"samples": 32}, PROMPT, max_new_tokens=600, chat=False)


def test_the_mbr_view_marks_the_choice(tiny_flat):
    from viz.catalog import get_view
    from viz.theme import has_data

    trace = run_to_end(tiny_flat, RunRequest.build("mbr", {"samples": 4}, PROMPT, max_new_tokens=6, chat=False))
    figure = get_view("mbr").render([trace], 0)
    assert has_data(figure) and "★" in " ".join(figure.data[0].y)


def test_first_finish_keeps_the_first_sample_to_end(tiny_flat):
    from explorer.strategies.batch_sampling import sample_rows
    from viz.catalog import get_view
    from viz.theme import has_data

    request = RunRequest.build("first_finish", {"samples": 8, "temperature": 1.5}, "the cat sat", max_new_tokens=40,
                               chat=False, seed=2)
    trace = run_to_end(tiny_flat, request)
    race = next(e for e in trace.events if e.kind == "finish_race")
    eos = tiny_flat.eos_token_ids
    if race.finish_order:
        winner = race.finish_order[0]
        assert race.chosen == winner and race.samples[winner][-1] in eos
        assert race.lengths[winner] == min(race.lengths)  # it ended first: nobody is shorter and finished later
        assert trace.finished.target_forward_passes == race.lengths[winner]  # the race stopped with it
        assert all(sum(t in eos for t in race.samples[r]) == 0 for r in range(8) if r not in race.finish_order)
    assert trace.token_ids == race.samples[race.chosen]
    assert run_to_end(tiny_flat, request).token_ids == trace.token_ids  # seeded
    # the race stops at the first finisher; letting every sample run on can only make them longer
    everyone = sample_rows(tiny_flat, trace.started.prompt_ids, 8, 1.5, torch.Generator().manual_seed(2), 40)
    assert all(len(a) >= len(b) for a, b in zip(everyone.tokens, race.samples, strict=True))
    unfinished = run_to_end(tiny_flat, RunRequest.build("first_finish", {"samples": 3}, "the cat sat",
                                                        max_new_tokens=2, chat=False))
    record = next(e for e in unfinished.events if e.kind == "finish_race")
    assert not record.finish_order and record.reason.startswith("none finished")
    assert has_data(get_view("first-finish").render([trace], 0))
    with pytest.raises(ValueError, match="use fewer samples or fewer new tokens"):
        RunRequest.build("first_finish", {"samples": 32}, "Hi", max_new_tokens=1000)


def test_exact_extract_scores_every_span_exactly_and_commits_the_best(tiny):
    """Against a brute-force reference: each span's log P from a teacher-forced pass of prompt + span."""
    from explorer.strategies.exact_extract import best_span, span_starts
    from viz.catalog import get_view
    from viz.theme import has_data

    assert span_starts([1, 5, 6, 2, 7], {1, 2}) == [(1, 2), (2, 1), (4, 1)]
    assert best_span([[-3.0, -1.0], [-2.0, float("-inf")]]) == (0, 2)
    prompt = "cat sat mat"
    trace = run_to_end(tiny, RunRequest.build("exact_extract", {"max_span": 3}, prompt, max_new_tokens=8,
                                              chat=False))
    spans = next(e for e in trace.events if e.kind == "extract_spans")
    ids = trace.started.prompt_ids
    eos = sorted(tiny.eos_token_ids)
    for row, start in enumerate(spans.starts):
        for length in range(1, 4):
            if start + length > len(ids) or any(t in (tiny.tokenizer.all_special_ids or []) for t in
                                                ids[start:start + length]):
                assert spans.log_probs[row][length - 1] == float("-inf")
                continue
            span = ids[start:start + length]
            logits = tiny.session().forward(ids + span).logits  # (prompt + span, vocab)
            logp = torch.log_softmax(logits.float(), dim=-1)
            expected = sum(float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(span))
            expected += float(torch.logsumexp(logp[len(ids) - 1 + length, eos], dim=-1))
            assert spans.log_probs[row][length - 1] == pytest.approx(expected, abs=1e-3)
    best = max(((r, k) for r, row in enumerate(spans.log_probs) for k, v in enumerate(row) if v > float("-inf")),
               key=lambda rk: spans.log_probs[rk[0]][rk[1]])
    assert (spans.best_start, spans.best_length) == (spans.starts[best[0]], best[1] + 1)
    span = ids[spans.best_start:spans.best_start + spans.best_length]
    assert trace.token_ids[:len(span)] == span and trace.token_ids[len(span)] in tiny.eos_token_ids
    assert has_data(get_view("exact-extract").render([trace], 0))


def test_instructive_decoding_takes_the_argmax_of_the_contrast(tiny):
    from explorer.strategies.instructive import contrast, noisy_context
    from viz.catalog import get_view
    from viz.theme import has_data

    greedy = run_to_end(tiny, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=12, chat=False))
    plain = run_to_end(tiny, RunRequest.build("instructive", {"epsilon": 0}, PROMPT, max_new_tokens=12, chat=False))
    assert plain.token_ids == greedy.token_ids  # ε = 0: greedy
    trace = run_to_end(tiny, RunRequest.build("instructive", {"epsilon": 1.0}, PROMPT, max_new_tokens=12,
                                              chat=False))
    ids, noisy = trace.started.prompt_ids, noisy_context(tiny, trace.started.prompt_ids, "opposite")
    for step in trace.token_steps:  # the reference: two fresh teacher-forced passes per step
        done = trace.token_ids[:step.step]
        z = tiny.session().forward(ids + done).logits[-1]
        z_noisy = tiny.session().forward(noisy + done).logits[-1]
        assert step.token_id == int(torch.argmax(contrast(z, z_noisy, 1.0)))
        assert step.details["flipped"] == float(step.token_id != int(torch.argmax(z)))
    assert sum(s.details["flipped"] for s in trace.token_steps) > 0  # the contrast did change tokens here
    assert noisy_context(tiny, [5, 6, 7], "null") == [7]
    assert has_data(get_view("instructive").render([trace], 0))
