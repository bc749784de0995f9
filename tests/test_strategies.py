"""Strategies and the runner: agreement with transformers, determinism, the papers' claims, stop rules."""

import math

import pytest
import torch

from explorer.events import RunFinished, TokenStep
from explorer.recorder import Recorder
from explorer.request import RunRequest
from explorer.runner import run_strategy, run_to_end
from explorer.strategies import REGISTRY, make_config
from explorer.strategies.mirostat import mirostat_truncate, surprise_bits, zipf_exponent, zipf_top_k
from explorer.strategies.top_h import top_h_filter
from explorer.testing import tiny_model
from tests.fakes import FakeLM, fixed, zipf_logits
from tests.recipes import write_recipe

PROMPTS = ["Hello world", "The cat sat on", "1 + 1 = "]


def hf_greedy(lm, prompt_ids, n):
    ids = torch.tensor([prompt_ids])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                            pad_token_id=lm.tokenizer.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chat", [False, True])
def test_greedy_matches_transformers_generate_on_tiny_models(seed, chat):
    lm = tiny_model(seed, scale=1.0 + 10 * seed)
    for prompt in PROMPTS:
        trace = run_to_end(lm, RunRequest.build("greedy", {}, prompt, chat=chat, max_new_tokens=40))
        assert trace.token_ids == hf_greedy(lm, trace.started.prompt_ids, 40)
        assert trace.finished.target_forward_passes == len(trace.token_ids)


@pytest.mark.parametrize("name, params", [
    ("sample", {"temperature": 0.9, "top_p": 0.9}), ("mirostat", {"tau": 5.0}), ("top_h", {"alpha": 0.6}),
])
def test_same_seed_same_trace_different_seed_differs(tiny_flat, name, params):
    config = make_config(name, params)
    a = run_to_end(tiny_flat, RunRequest(name, config, "Once upon", max_new_tokens=30, seed=7))
    b = run_to_end(tiny_flat, RunRequest(name, config, "Once upon", max_new_tokens=30, seed=7))
    c = run_to_end(tiny_flat, RunRequest(name, config, "Once upon", max_new_tokens=30, seed=8))
    assert a.events == b.events
    assert a.token_ids != c.token_ids


def test_sampled_tokens_lie_in_the_kept_set(tiny_flat):
    trace = run_to_end(tiny_flat, RunRequest.build("sample", {"top_k": 5}, "abc", max_new_tokens=40, seed=3))
    for step in trace.token_steps:
        assert step.kept_count == 5
        assert step.token_id in step.kept_top_ids
        assert step.rank < 5


def test_sampling_without_filters_matches_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    lm = fixed(logits)
    trace = run_to_end(lm, RunRequest.build("sample", {}, "x", max_new_tokens=4000, seed=0))
    counts = torch.bincount(torch.tensor(trace.token_ids), minlength=5).double()
    expected = torch.softmax(logits.double(), 0)
    tv = 0.5 * (counts / counts.sum() - expected).abs().sum()
    assert tv < 0.03


@pytest.mark.parametrize("version", ["1", "2"])
def test_mirostat_surprise_approaches_tau(version):
    lm = fixed(zipf_logits(500, 1.1))
    for tau in (3.0, 5.0):
        trace = run_to_end(lm, RunRequest.build("mirostat", {"tau": tau, "eta": 0.1, "version": version}, "x",
                           max_new_tokens=1500, seed=1))
        observed = [s.details["surprise"] for s in trace.token_steps[500:]]
        assert abs(sum(observed) / len(observed) - tau) < 0.25
        first_mu = trace.token_steps[0].details["mu"]
        assert first_mu == pytest.approx(2 * tau)


@pytest.mark.parametrize("exponent", [1.05, 1.1, 1.6])
def test_mirostat_v1_estimates_the_zipf_exponent_and_sizes_k_by_the_papers_formula(exponent):
    logits = zipf_logits(5000, exponent)
    s_hat = zipf_exponent(logits)
    assert s_hat == pytest.approx(exponent, rel=1e-6)  # exact on an exact Zipf distribution
    for mu in (2.0, 6.0, 10.0):
        eps = s_hat - 1
        expected = round(((eps * 2 ** mu) / (1 - 5000 ** -eps)) ** (1 / s_hat))
        assert zipf_top_k(s_hat, mu, 5000) == min(max(expected, 1), 5000)
    assert zipf_top_k(0.8, 6.0, 5000) >= 1  # a heavier tail than Zipf(1): floored, still a valid k


def test_mirostat_v1_samples_from_the_top_k_it_records():
    lm = fixed(zipf_logits(500, 1.1))
    trace = run_to_end(lm, RunRequest.build("mirostat", {"tau": 4.0}, "x", max_new_tokens=200, seed=3))
    for step in trace.token_steps:
        assert step.kept_count == step.details["k"]
        assert step.details["zipf_s"] == pytest.approx(1.1, rel=1e-6)
        k = zipf_top_k(1.1, step.details["mu"], 500)
        assert step.details["k"] == k


def test_mirostat_truncation_keeps_tokens_under_mu():
    logits = zipf_logits(100)
    kept = mirostat_truncate(logits, 4.0)
    surprise = surprise_bits(logits)
    assert torch.equal(torch.isfinite(kept), surprise <= 4.0)
    assert torch.isfinite(mirostat_truncate(logits, 0.01)).sum() == 1  # never empty


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.9])
def test_top_h_renormalised_variant_respects_its_bound_and_is_greedy_maximal(alpha):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(300, generator=g) * 2.5
        kept, bound, kept_entropy = top_h_filter(logits, alpha, "renormalised")
        p = torch.softmax(logits.double(), 0)
        assert bound == pytest.approx(alpha * float(-(p * p.log()).sum()))
        mask = torch.isfinite(kept)
        q = p[mask] / p[mask].sum()
        assert float(-(q * q.log()).sum()) == pytest.approx(kept_entropy, abs=1e-9)
        assert kept_entropy <= bound + 1e-12
        order = torch.argsort(p, descending=True)
        k = int(mask.sum())
        assert set(order[:k].tolist()) == set(mask.nonzero().flatten().tolist())  # the top-k tokens
        if k < len(p):  # adding the next token would break the bound
            q2 = p[order[: k + 1]] / p[order[: k + 1]].sum()
            assert float(-(q2 * q2.log()).sum()) > bound


@pytest.mark.parametrize("alpha", [0.1, 0.4, 0.7, 0.95])  # at 1.0 both keep all 100, up to summation rounding
@pytest.mark.parametrize("scale", [0.5, 2.5, 6.0])
def test_top_h_default_bound_matches_transformers_top_h_warper(alpha, scale):
    from transformers.generation.logits_process import TopHLogitsWarper

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 500, generator=g, dtype=torch.float64) * scale
    expected = torch.isfinite(TopHLogitsWarper(top_h=alpha)(None, logits))
    for row, want in zip(logits, expected, strict=True):
        kept, tau, partial = top_h_filter(row, alpha)
        assert torch.equal(torch.isfinite(kept), want)
        top = torch.softmax(torch.topk(row, 100).values, 0)  # the paper's rule written out: top-100, renormalised
        terms = -(top * top.log())
        k = int(want.sum())
        assert tau == pytest.approx(alpha * float(terms.sum()))
        assert k == 1 or float(terms[:k].sum()) <= tau + 1e-12  # the top token is kept whatever its term
        assert k == 100 or float(terms[: k + 1].sum()) > tau


def test_top_h_run_records_bound(tiny_flat):
    trace = run_to_end(tiny_flat, RunRequest.build("top_h", {"alpha": 0.5}, "abc", max_new_tokens=20))
    for step in trace.token_steps:
        assert step.details["kept_entropy"] <= step.details["bound"] + 1e-9
        assert step.details["bound"] == pytest.approx(0.5 * step.entropy, rel=1e-4)


def test_stop_on_eos_and_stop_string():
    # a scripted model: emits 3, 4, 3, 4, ... and eos (9) at the 6th step
    def script(context):
        generated = len(context) - 1
        token = 9 if generated == 5 else 3 + generated % 2
        return torch.nn.functional.one_hot(torch.tensor(token), 10).float() * 10

    lm = FakeLM(script, 10, eos=9)
    trace = run_to_end(lm, RunRequest.build("greedy", {}, "x", max_new_tokens=50))
    assert trace.token_ids == [3, 4, 3, 4, 3, 9] and trace.finished.stop_reason == "eos"
    trace = run_to_end(lm, RunRequest.build("greedy", {}, "x", max_new_tokens=50, stop_strings=["<4><3>"]))
    assert trace.token_ids == [3, 4, 3] and trace.finished.stop_reason == "stop_string"
    trace = run_to_end(lm, RunRequest.build("greedy", {}, "x", max_new_tokens=2))
    assert trace.token_ids == [3, 4] and trace.finished.stop_reason == "max_new_tokens"


@pytest.fixture(scope="module")
def trained_heads(tiny_flat, tmp_path_factory):
    """The parameters of strategies that need a trained head: heads trained for a few steps on the tiny model."""
    from explorer.train_drafter import train

    params = {}
    for kind in ("eagle", "medusa"):
        directory = tmp_path_factory.mktemp(kind)
        train(tiny_flat, directory, kind=kind, corpus_tokens=1500, steps=10, vocab=32, save_every=10, progress=False)
        params[kind] = {"drafter": str(directory)}
    recipe = write_recipe(tmp_path_factory.mktemp("recipe"))  # custom_generate runs a local recipe, when trusted
    params["custom_generate"] = {"repo": str(recipe), "trust_remote_code": True}
    return params


def test_invariants_of_every_registered_strategy(tiny_flat, trained_heads):
    for name in REGISTRY:
        params = trained_heads.get(name, {})
        events = list(run_strategy(tiny_flat, RunRequest.build(name, params, "Hi", max_new_tokens=12, seed=2)))
        finishes = [e for e in events if isinstance(e, RunFinished)]
        steps = [e for e in events if isinstance(e, TokenStep)]
        assert len(finishes) == 1 and events[-1] is finishes[0]
        assert [s.step for s in steps] == list(range(len(steps)))
        assert finishes[0].new_tokens == len(steps)
        assert finishes[0].text == tiny_flat.decode([s.token_id for s in steps])
        for s in steps:
            assert s.kept_count >= 1 and s.rank >= 0 and s.entropy >= 0
            assert math.isclose(math.exp(s.top_logprobs[0]), max(math.exp(x) for x in s.top_logprobs))


@pytest.mark.parametrize("name, params, message", [
    ("nope", {}, "unknown strategy 'nope'"),
    ("sample", {"top_q": 1}, "has no parameter 'top_q'"),
    ("sample", {"top_p": "2"}, r"top_p must be in \(0, 1\]"),
    ("sample", {"temperature": "-1"}, "temperature must be > 0"),
    ("sample", {"top_k": "abc"}, "top_k must be a int"),
    ("mirostat", {"tau": 0}, "tau must be > 0"),
    ("top_h", {"alpha": 1.5}, r"alpha must be in \(0, 1\]"),
])
def test_bad_parameters_say_how_to_fix(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_config(name, params)


def test_failing_run_is_stored_as_failed(store):
    def exploding(context):
        if len(context) > 4:
            raise RuntimeError("boom at step 3")
        return torch.arange(6, dtype=torch.float32)

    lm = FakeLM(exploding, 6)
    recorder = Recorder(store, batch_size=2)
    with pytest.raises(RuntimeError, match="boom"):
        for _ in run_strategy(lm, RunRequest.build("greedy", {}, "xx", max_new_tokens=10), recorder=recorder):
            pass
    stored = store.load_trace(recorder.trace.run_id)
    assert stored.status == "failed" and "boom at step 3" in stored.finished.error
    assert len(stored.token_steps) == 3
    assert stored == recorder.trace


def test_abandoned_run_is_stored_as_cancelled(store, tiny):
    recorder = Recorder(store)
    events = run_strategy(tiny, RunRequest.build("greedy", {}, "abc", max_new_tokens=50), recorder=recorder)
    for event in events:
        if isinstance(event, TokenStep) and event.step == 4:
            break
    events.close()  # what a Stop button does
    stored = store.load_trace(recorder.trace.run_id)
    assert stored.status == "cancelled" and len(stored.token_steps) == 5


def test_interleaved_lanes_count_their_own_passes_and_time(tiny_flat, store):
    import time

    from explorer.lanes import run_lanes

    t0 = time.perf_counter()
    results = None
    lanes = [RunRequest.build("greedy", {}, "Hi", max_new_tokens=20, seed=1),
             RunRequest.build("sample", {"top_k": 5}, "Hi", max_new_tokens=20, seed=1)]
    for results in run_lanes(tiny_flat, lanes, store=store):  # noqa: B007
        pass
    elapsed = time.perf_counter() - t0
    traces = [r.trace for r in results]
    assert all(t.status == "ok" and t.finished.target_forward_passes == 20 for t in traces)
    assert sum(t.finished.wall_time_s for t in traces) <= elapsed
    assert [store.load_trace(t.run_id) for t in traces] == traces
    with pytest.raises(ValueError, match="top_p must be in"):
        RunRequest.build("sample", {"top_p": 3}, "Hi")


def test_lanes_closed_mid_run_are_stored_cancelled_with_their_prefill_time(tiny_flat, store):
    from explorer.lanes import run_lanes

    lanes = [RunRequest.build("greedy", {}, "Hi", max_new_tokens=50, seed=1),
             RunRequest.build("sample", {"top_k": 5}, "Hi", max_new_tokens=50, seed=1)]
    stream = run_lanes(tiny_flat, lanes, store=store)
    for results in stream:
        if all(r.trace is not None and len(r.trace.token_steps) >= 3 for r in results):
            break
    stream.close()  # what Stop (or a lost GPU worker) does: the lanes end without their own RunFinished
    for result in results:
        stored = store.load_trace(result.trace.run_id)
        assert stored.status == "cancelled" and len(stored.token_steps) >= 3
        assert 0 < stored.finished.prefill_time_s <= stored.finished.wall_time_s


def test_ctrl_c_stores_the_run_as_cancelled(store):
    def interrupted(context):
        if len(context) > 5:
            raise KeyboardInterrupt
        return torch.arange(6, dtype=torch.float32)

    recorder = Recorder(store, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        for _ in run_strategy(FakeLM(interrupted, 6), RunRequest.build("greedy", {}, "xx", max_new_tokens=10),
                              recorder=recorder):
            pass
    stored = store.load_trace(recorder.trace.run_id)
    assert stored.status == "cancelled" and len(stored.token_steps) == 4


def test_every_parameter_has_help_a_family_and_a_paper():
    import dataclasses

    from explorer.strategies import REGISTRY
    from explorer.strategies.base import FAMILIES

    for name, spec in REGISTRY.items():
        assert spec.family in FAMILIES[:-1] and spec.paper, name
        for field in dataclasses.fields(spec.config):
            assert field.metadata.get("help"), (name, field.name)
