"""The architecture matrix: for every causal-LM family in `explorer.testing.ARCHITECTURES` (tiny random models
built in code), our greedy equals transformers' greedy `generate`, every greedy-rule draft-verify method (chains
and trees, layer skip included) is token-identical to our greedy, KV rollback leaves the logits of a fresh pass,
and beam search equals transformers' beam search."""

import pytest
import torch

from explorer.check import greedy_mismatch
from explorer.events import BeamResult
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.testing import ARCHITECTURES, tiny_architecture

NAMES = sorted(ARCHITECTURES)
PROMPT = "the cat sat on the mat. the cat sat on the"  # longer than the sliding windows (12)
DRAFT_METHODS = [
    ("prompt_lookup", {"min_ngram": 1}),
    ("jacobi", {"window": 4}),
    ("speculative", {"draft_length": 3}),  # the default layer-skip draft, on the target's own cache
    ("self_speculative", {"skip": "2"}),
    ("self_speculative", {"auto_skip": 1}),  # CLaSp's DP search
    ("tree_speculative", {"mode": "topk", "branching": 2, "depth": 2, "skip": "2"}),
    ("tree_speculative", {"mode": "dynamic", "budget": 6, "skip": "2"}),
    ("token_recycling", {}),
    ("lookahead", {}),
]


@pytest.fixture(scope="module", params=NAMES)
def arch(request):
    return tiny_architecture(request.param)


def greedy(lm, tokens=24):
    return run_to_end(lm, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=tokens, chat=False))


def test_greedy_equals_transformers_generate(arch):
    ours = greedy(arch)
    ids = torch.tensor([ours.started.prompt_ids])
    out = arch.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24)
    theirs = out[0, ids.shape[1]:].tolist()
    assert theirs[:len(ours.token_ids)] == ours.token_ids


@pytest.mark.parametrize("name, params", DRAFT_METHODS)
def test_greedy_rule_draft_verify_is_token_identical(arch, name, params):
    assert greedy_mismatch(arch, name, params, [PROMPT], max_new_tokens=24, chat=False) is None, \
        (arch.info.model_id, name, params)


def test_kv_rollback_and_tree_keep_match_a_fresh_pass(arch):
    prompt = arch.encode_prompt(PROMPT)
    fresh = arch.session().forward([*prompt, 7, 8, 9]).logits[-1]
    session = arch.session()
    session.forward(prompt)
    session.forward([20, 21, 22, 23])  # a rejected draft
    session.crop(len(prompt))
    torch.testing.assert_close(session.forward([7, 8, 9]).logits[-1], fresh, rtol=1e-4, atol=1e-4)
    tree = arch.session()
    tree.forward(prompt)
    tree.forward([7, 30, 8, 31, 9], parents=[-1, -1, 0, 0, 2])  # 7 -> 8 -> 9 among siblings
    tree.keep([*range(len(prompt)), len(prompt), len(prompt) + 2, len(prompt) + 4])
    torch.testing.assert_close(tree.forward([10]).logits[-1], arch.session().forward([*prompt, 7, 8, 9, 10]).logits[-1],
                               rtol=1e-4, atol=1e-4)


def test_beam_equals_transformers_beam_search(arch):
    trace = run_to_end(arch, RunRequest.build("beam", {"num_beams": 3, "num_return": 3}, PROMPT, max_new_tokens=10,
                                              chat=False))
    result = next(e for e in trace.events if isinstance(e, BeamResult))
    ids = torch.tensor([trace.started.prompt_ids])
    out = arch.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=3,
                              num_return_sequences=3, max_new_tokens=10, output_scores=True,
                              return_dict_in_generate=True)
    pad = arch.tokenizer.pad_token_id
    for ours, theirs in zip(result.hypotheses, out.sequences[:, ids.shape[1]:].tolist(), strict=True):
        assert theirs[:len(ours)] == ours and all(t == pad for t in theirs[len(ours):])
    assert result.scores == pytest.approx(out.sequences_scores.tolist(), abs=1e-3)


def test_sampling_replays_with_its_seed(arch):
    runs = [run_to_end(arch, RunRequest.build("sample", {"top_p": 0.9}, PROMPT, max_new_tokens=12, chat=False,
                                              seed=3)) for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and runs[0].token_ids


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text"])
def test_layer_skip_view_of_a_mixed_attention_model_keeps_each_layers_type(name):
    from explorer.models import decoder_owner
    from explorer.strategies.draft_models import layer_skip_view

    lm = tiny_architecture(name)
    types = list(lm.model.config.layer_types)
    assert len(set(types)) == 2  # sliding and full layers
    view = layer_skip_view(lm, {1})
    assert decoder_owner(view.model).config.layer_types == [t for i, t in enumerate(types) if i != 1]
    assert lm.model.config.layer_types == types  # the target is untouched


def test_a_model_that_ignores_tree_masks_is_refused_with_the_reason(monkeypatch):
    from explorer.models.lm import _TREE_SUPPORT

    lm = tiny_architecture("llama", seed=9)
    original = lm.model.forward

    def ignores_masks(*args, **kwargs):  # an architecture that drops custom masks and positions
        kwargs.pop("attention_mask", None)
        kwargs.pop("position_ids", None)
        return original(*args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", ignores_masks)
    _TREE_SUPPORT.clear()
    with pytest.raises(ValueError, match="does not honour a custom tree mask"):
        run_to_end(lm, RunRequest.build("tree_speculative", {"draft_model": "target"}, PROMPT, max_new_tokens=8,
                                        chat=False))
    trace = run_to_end(lm, RunRequest.build("speculative", {"draft_model": "target"}, PROMPT, max_new_tokens=8,
                                            chat=False))
    assert trace.token_ids  # chain methods still run
    _TREE_SUPPORT.clear()
