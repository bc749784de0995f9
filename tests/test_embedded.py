"""Integration tests on the embedded SmolLM2-135M-Instruct (select with `-m integration`)."""

import pytest
import torch

from explorer.models import EMBEDDED_MODEL_ID
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies import make_config

pytestmark = pytest.mark.integration

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain recursion in one sentence.",
]


_GREEDY: dict[tuple[str, int], list[int]] = {}


def greedy_tokens(embedded, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy's tokens for `prompt`, decoded once per test session (greedy is deterministic): the reference every
    token-identity test below compares with, shared instead of recomputed by each method's test."""
    key = (prompt, max_new_tokens)
    if key not in _GREEDY:
        request = RunRequest.build("greedy", {}, prompt, chat=True, max_new_tokens=max_new_tokens)
        _GREEDY[key] = run_to_end(embedded, request).token_ids
    return _GREEDY[key]


def test_embedded_model_identity(embedded):
    assert embedded.info.model_id == EMBEDDED_MODEL_ID
    assert len(embedded.info.weights_hash) == 64  # sha256 of the GGUF file
    assert embedded.has_chat_template and 2 in embedded.eos_token_ids


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_is_token_identical_to_generate(embedded, prompt):
    trace = run_to_end(embedded, RunRequest.build("greedy", {}, prompt, chat=True, max_new_tokens=64))
    ids = torch.tensor([trace.started.prompt_ids])
    reference = embedded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=64)[0, ids.shape[1]:].tolist()
    assert trace.token_ids == reference
    assert trace.text == embedded.decode(reference)


def test_sampling_run_on_embedded_model(embedded):
    trace = run_to_end(embedded, RunRequest.build("sample", {"top_p": 0.9, "temperature": 0.7},
                       "Tell me a fact about owls.", chat=True, max_new_tokens=24, seed=5))
    assert trace.status == "ok" and 0 < len(trace.token_ids) <= 24 and trace.text.strip()
    assert all(s.kept_count < 49152 for s in trace.token_steps)


COPY_PROMPT = ("Repeat this sentence exactly, then say why it is true: The quick brown fox jumps over the lazy dog "
               "because the dog is lazy and the fox is quick.")


@pytest.mark.parametrize("name, params", [
    ("prompt_lookup", {}),
    ("jacobi", {"window": 6}),
    ("speculative", {"draft_length": 4}),  # 'auto': the EAGLE head shipped for the embedded model
    ("speculative", {"draft_length": 4, "draft_model": "layer-skip"}),
    ("self_speculative", {"skip": "12-17"}),
    ("self_speculative", {"exit_after": 10}),
    ("self_speculative", {}),  # CLaSp's DP search on the shared cache
    ("jacobi", {"window": 6, "variant": "blocks"}),
])
def test_draft_verify_methods_are_token_identical_to_greedy(embedded, name, params):
    for prompt in (COPY_PROMPT, PROMPTS[1]):
        trace = run_to_end(embedded, RunRequest.build(name, params, prompt, chat=True, max_new_tokens=48))
        assert trace.token_ids == greedy_tokens(embedded, prompt, 48), (name, prompt)
        assert trace.rounds, "no verification round ran"


def test_prompt_lookup_copies_on_the_embedded_model(embedded):
    trace = run_to_end(embedded, RunRequest.build("prompt_lookup", {}, COPY_PROMPT, chat=True,
                       max_new_tokens=48))
    assert trace.mean_accepted_tokens > 1.3
    assert trace.finished.target_forward_passes < len(trace.token_ids)


@pytest.mark.parametrize("beams, length_penalty", [(2, 1.0), (4, 1.0), (4, 0.5)])
def test_beam_search_matches_transformers(embedded, beams, length_penalty):
    from explorer.events import BeamResult

    for prompt in ("What is 2 + 2?", PROMPTS[2]):
        config = make_config("beam", {"num_beams": beams, "length_penalty": length_penalty, "num_return": beams})
        trace = run_to_end(embedded, RunRequest("beam", config, prompt, chat=True, max_new_tokens=32))
        result = next(e for e in trace.events if isinstance(e, BeamResult))
        ids = torch.tensor([trace.started.prompt_ids])
        out = embedded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=beams,
                                      max_new_tokens=32, length_penalty=length_penalty, num_return_sequences=beams,
                                      output_scores=True, return_dict_in_generate=True)
        pad = embedded.tokenizer.pad_token_id
        for ours, theirs in zip(result.hypotheses, out.sequences[:, ids.shape[1]:].tolist(), strict=True):
            assert theirs[:len(ours)] == ours and all(t == pad for t in theirs[len(ours):])
        assert result.scores == pytest.approx(out.sequences_scores.tolist(), abs=1e-3)


@pytest.mark.parametrize("name, params", [
    ("tree_speculative", {"mode": "topk", "skip": "13-16"}),
    ("tree_speculative", {"mode": "dynamic", "budget": 12, "skip": "13-16"}),
    ("token_recycling", {}),
    ("token_recycling", {"tree": "widths"}),
    ("lookahead", {}),
])
def test_tree_methods_are_token_identical_to_greedy(embedded, name, params):
    for prompt in (COPY_PROMPT, PROMPTS[1]):
        trace = run_to_end(embedded, RunRequest.build(name, params, prompt, chat=True, max_new_tokens=40))
        assert trace.token_ids == greedy_tokens(embedded, prompt, 40), (name, prompt)
