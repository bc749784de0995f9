"""Dtypes: the greedy-rule draft-verify methods stay lossless in bfloat16 and float16 on CPU, up to ties (two
candidates within the dtype's rounding at the argmax), which the lossless check reports as such."""

import dataclasses

import pytest
import torch

from explorer.events import TokenStep
from explorer.metrics import lossless_check
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.testing import tiny_architecture

METHODS = [("prompt_lookup", {"min_ngram": 1}), ("speculative", {}), ("self_speculative", {"skip": "2"}),
           ("tree_speculative", {"mode": "topk", "skip": "2"}), ("lookahead", {}), ("token_recycling", {})]
PROMPT = "the cat sat on the mat. the cat sat on the"


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def low_precision(request):
    lm = tiny_architecture("llama", seed=3)
    lm.model.to(getattr(torch, request.param))
    return dataclasses.replace(lm, info=dataclasses.replace(lm.info, dtype=request.param))


@pytest.mark.parametrize("name, params", METHODS)
def test_greedy_rule_is_lossless_up_to_ties_in_low_precision(low_precision, name, params):
    greedy = run_to_end(low_precision, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=24, chat=False))
    assert greedy.started.dtype == low_precision.info.dtype  # recorded in the trace
    trace = run_to_end(low_precision, RunRequest.build(name, params, PROMPT, max_new_tokens=24, chat=False))
    assert lossless_check(trace, greedy).status in ("identical", "tie")


def step(index, token, top_ids, top_logprobs):
    return TokenStep(step=index, position=10 + index, token_id=token, token_text="x", logprob=top_logprobs[0],
                     rank=0, entropy=1.0, top_ids=top_ids, top_logprobs=top_logprobs,
                     top_texts=["x"] * len(top_ids), kept_top_ids=top_ids, kept_top_logprobs=top_logprobs,
                     kept_count=len(top_ids), kept_logprob=top_logprobs[0])


def test_lossless_check_tells_a_tie_from_a_difference(tiny):
    base = run_to_end(tiny, RunRequest.build("greedy", {}, "ab", max_new_tokens=3, chat=False))
    assert lossless_check(base, base).status == "identical"
    fp16 = dataclasses.replace(base.started, dtype="float16")
    tied_ref = [step(0, 5, [5, 6], [-0.690, -0.696])]
    tied_ours = [step(0, 6, [6, 5], [-0.689, -0.697])]
    a = type(base)(started=fp16, events=tied_ours)
    b = type(base)(started=fp16, events=tied_ref)
    assert lossless_check(a, b).status == "tie"
    far = type(base)(started=fp16, events=[step(0, 6, [6, 5], [-0.1, -2.4])])
    far_ref = type(base)(started=fp16, events=[step(0, 5, [5, 6], [-0.1, -2.4])])
    assert lossless_check(far, far_ref).status == "differs"
    fp32 = dataclasses.replace(base.started, dtype="float32")
    assert lossless_check(type(base)(started=fp32, events=tied_ours), type(base)(started=fp32, events=tied_ref)
                          ).status == "differs"  # the same gap is no tie in float32
