"""Trained draft heads (issue 15, first part): training on a tiny model lowers the loss and raises agreement,
the saved head loads (fp16 + manifest), EAGLE drafting is token-identical to greedy under the greedy rule and
exact under the sampling rule (q is zero outside the draft vocabulary)."""

import hashlib
import json

import pytest
import torch

from explorer.events import DraftRound
from explorer.heads import CONFIG_FILE, HEAD_FILE, load_head
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies import get_strategy, make_config
from explorer.strategies.medusa import medusa_tree
from explorer.testing import tiny_model
from explorer.train_drafter import train
from viz.catalog import get_view
from viz.drafting import training_curve_figure

PROMPTS = ["the cat sat on the mat. the cat sat on the mat. the cat", "abc abc abc abd", "x"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    lm = tiny_model(0, scale=8.0)
    directory = tmp_path_factory.mktemp("head")
    record = train(lm, directory, corpus_tokens=3000, steps=80, vocab=48, save_every=40, progress=False)
    return lm, directory, record


def test_training_lowers_the_loss_and_writes_a_loadable_head(trained):
    lm, directory, record = trained
    first, last = record["curve"][0], record["curve"][-1]
    assert last["loss"] < first["loss"] and last["agreement"] > first["agreement"]
    manifest = json.loads((directory / CONFIG_FILE).read_text())
    assert manifest["sha256"] == hashlib.sha256((directory / HEAD_FILE).read_bytes()).hexdigest()
    assert manifest["training"]["steps"] == 80 and len(manifest["draft_ids"]) <= 48 + len(lm.eos_token_ids)
    head = load_head(lm, directory)
    assert head.draft_ids.tolist() == manifest["draft_ids"]


def test_training_resumes_from_its_checkpoint(trained, tmp_path):
    lm, _, _ = trained
    train(lm, tmp_path, corpus_tokens=2000, steps=20, vocab=32, save_every=10, progress=False)
    record = train(lm, tmp_path, corpus_tokens=2000, steps=30, vocab=32, save_every=10, progress=False)
    assert [point["step"] for point in record["curve"]] == [10, 20, 30]  # picked up at 20


@pytest.mark.parametrize("prompt", PROMPTS)
def test_eagle_is_token_identical_to_greedy(trained, prompt):
    lm, directory, _ = trained
    greedy = run_to_end(lm, RunRequest.build("greedy", {}, prompt, max_new_tokens=30, chat=False))
    eagle = run_to_end(lm, RunRequest.build("eagle", {"drafter": str(directory)}, prompt, max_new_tokens=30,
                                            chat=False))
    assert eagle.token_ids == greedy.token_ids
    assert any(isinstance(e, DraftRound) for e in eagle.events)


def test_eagle_sampling_drafts_only_inside_its_vocabulary_and_replays(trained):
    lm, directory, _ = trained
    request = RunRequest.build("eagle", {"drafter": str(directory), "rule": "sampling"}, PROMPTS[0],
                               max_new_tokens=30, chat=False, seed=4)
    trace = run_to_end(lm, request)
    vocab = set(load_head(lm, directory).draft_ids.tolist())
    assert all(t in vocab for r in trace.rounds for t in r.draft_tokens)
    assert run_to_end(lm, request).token_ids == trace.token_ids


def test_a_missing_or_foreign_head_is_a_clear_error(trained, tmp_path):
    lm, directory, _ = trained
    for params, message in (({}, "needs a trained head"), ({"drafter": str(tmp_path)}, "holds no draft head")):
        with pytest.raises(ValueError, match=message):
            get_strategy("eagle").prepare(lm, make_config("eagle", params))
    with pytest.raises(ValueError, match="hidden size"):
        load_head(tiny_model(0, hidden=32), directory)
    assert torch.is_tensor(load_head(lm, directory).fc.weight)


def test_the_coverage_view_and_the_training_curve(trained):
    lm, directory, record = trained
    trace = run_to_end(lm, RunRequest.build("eagle", {"drafter": str(directory)}, PROMPTS[0], max_new_tokens=30,
                                            chat=False))
    flags = [r.details["target_in_vocab"] for r in trace.rounds]
    assert flags and all(len(f.split(",")) == len(r.draft_tokens) + 1 for f, r in zip(flags, trace.rounds,
                                                                                      strict=True))
    assert "outside it" in get_view("draft-vocabulary").render([trace], 0).layout.title.text
    assert (directory / "training.html").is_file()
    assert len(training_curve_figure(record).data) == 2


def test_the_dynamic_tree_is_lossless_and_its_top_path_is_the_chain(trained):
    lm, directory, _ = trained
    for prompt in PROMPTS[:2]:
        greedy = run_to_end(lm, RunRequest.build("greedy", {}, prompt, max_new_tokens=30, chat=False))
        tree = run_to_end(lm, RunRequest.build("eagle", {"drafter": str(directory), "tree": "dynamic", "top_k": 3,
                                                         "depth": 4, "budget": 8}, prompt, max_new_tokens=30,
                                               chat=False))
        assert tree.token_ids == greedy.token_ids
        assert max(len(r.draft_tokens) for r in tree.rounds) == 8 and not all(r.parents == list(range(-1, 7))
                                                                               for r in tree.rounds)
        # one child per level: the tree is the head's greedy chain, drafted through tree-masked head passes
        chain = run_to_end(lm, RunRequest.build("eagle", {"drafter": str(directory), "draft_length": 4,
                                                          "adaptive": False}, prompt, max_new_tokens=30, chat=False))
        narrow = run_to_end(lm, RunRequest.build("eagle", {"drafter": str(directory), "tree": "dynamic", "top_k": 1,
                                                           "depth": 4, "budget": 4}, prompt, max_new_tokens=30,
                                                 chat=False))
        assert [r.draft_tokens for r in narrow.rounds] == [r.draft_tokens for r in chain.rounds]


# ---------------------------------------------------------------------------------------------- Medusa
@pytest.fixture(scope="module")
def medusa(tmp_path_factory):
    lm = tiny_model(0, scale=8.0)
    directory = tmp_path_factory.mktemp("medusa")
    record = train(lm, directory, kind="medusa", heads=3, corpus_tokens=3000, steps=60, vocab=48, save_every=30,
                   progress=False)
    return lm, directory, record


def test_medusa_training_and_the_tree(medusa):
    lm, directory, record = medusa
    assert record["kind"] == "medusa" and record["curve"][-1]["loss"] < record["curve"][0]["loss"]
    assert medusa_tree([[1, 2], [3], [4, 5]]) == ([1, 2, 3, 3, 4, 5, 4, 5], [-1, -1, 0, 1, 2, 2, 3, 3],
                                                  [0, 0, 1, 1, 2, 2, 2, 2])
    with pytest.raises(ValueError, match="holds a medusa head"):
        load_head(lm, directory, kind="eagle")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_medusa_is_token_identical_to_greedy(medusa, prompt):
    lm, directory, _ = medusa
    greedy = run_to_end(lm, RunRequest.build("greedy", {}, prompt, max_new_tokens=30, chat=False))
    trace = run_to_end(lm, RunRequest.build("medusa", {"drafter": str(directory), "widths": "3,2,1"}, prompt,
                                            max_new_tokens=30, chat=False))
    assert trace.token_ids == greedy.token_ids
    assert max(len(r.draft_tokens) for r in trace.rounds) == 3 + 6 + 6
