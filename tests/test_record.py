"""The transformers ecosystem as lanes: a `model.generate(...)` call recorded as a run (explorer/record.py), and a
transformers LogitsProcessor as a lane (explorer/strategies/logits_processor.py), both held to transformers' own
numbers on tiny models."""

import json

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.candidate_generator import AssistedCandidateGenerator, PromptLookupCandidateGenerator
from transformers.generation.logits_process import TypicalLogitsWarper

from explorer.events import DraftRound, TokenStep
from explorer.record import STRATEGY, record_generate, recording
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.serving import ServerPolicy
from explorer.strategies import make_config
from explorer.strategies.logits_processor import PLUGIN_PROCESSORS, register_logits_processor
from explorer.testing import tiny_model
from tests.recipes import write_recipe
from viz.catalog import get_view

PROMPT = "Hello world hello world hello"  # repeats: prompt lookup finds its n-grams
NEW = 16


@pytest.fixture(scope="module")
def draft():
    """A draft for `tiny` (conftest): its weights with noise on the head, so that it agrees with it only sometimes."""
    model = tiny_model(0, scale=20.0)
    noise = torch.Generator().manual_seed(7)
    with torch.no_grad():
        head = model.model.lm_head.weight
        head.add_(torch.randn(head.shape, generator=noise))
    return model


def prompt_ids(lm, text=PROMPT):
    return torch.tensor([lm.tokenizer(text)["input_ids"]])


def new_tokens(output, ids):
    return output[0, ids.shape[1]:].tolist()


def test_recorded_greedy_equals_generate_and_our_greedy(tiny, store):
    ids = prompt_ids(tiny)
    with recording(tiny.model, tiny.tokenizer, store=store, label="transformers greedy") as rec:
        output = tiny.model.generate(ids, max_new_tokens=NEW)
    assert "generate" not in tiny.model.__dict__ and "_get_candidate_generator" not in tiny.model.__dict__
    assert isinstance(output, torch.Tensor)  # what the call asked for, though the recording added the scores
    trace = rec.trace
    ours = run_to_end(tiny, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=NEW, chat=False))
    assert trace.token_ids == new_tokens(output, ids) == ours.token_ids
    assert trace.started.strategy == STRATEGY and trace.started.prompt_ids == ours.started.prompt_ids
    assert trace.started.tags["mode"] == "greedy" and trace.started.tags["label"] == "transformers greedy"
    assert trace.started.config["max_new_tokens"] == NEW and trace.finished.stop_reason == "max_new_tokens"
    assert trace.finished.target_forward_passes == NEW and trace.finished.text == ours.finished.text
    for mine, theirs in zip(trace.token_steps, ours.token_steps, strict=True):  # the same numbers as our lane
        assert mine.top_ids == theirs.top_ids and mine.kept_count == theirs.kept_count
        assert mine.entropy == pytest.approx(theirs.entropy, abs=1e-4)
        assert mine.top_logprobs == pytest.approx(theirs.top_logprobs, abs=1e-4)
    loaded = store.load_trace(rec.run_id)
    assert loaded.all_events() == trace.all_events()
    assert rec.run_id in [r.run_id for r in store.list_runs(strategy=STRATEGY)]


@pytest.mark.parametrize("kind", ["draft model", "prompt lookup"])
def test_recorded_assisted_rounds_are_transformers_own(tiny, draft, store, monkeypatch, kind):
    generator = AssistedCandidateGenerator if kind == "draft model" else PromptLookupCandidateGenerator
    seen = []  # an independent hook: what transformers' loop handed the generator each round
    learn = generator.update_candidate_strategy

    def spy(self, input_ids, scores, num_matches):
        seen.append((scores.shape[1] - 1, int(num_matches)))  # scores: (1, candidates + 1, vocab)
        return learn(self, input_ids, scores, num_matches)

    monkeypatch.setattr(generator, "update_candidate_strategy", spy)
    ids = prompt_ids(tiny)
    extra = {"assistant_model": draft.model} if kind == "draft model" else {"prompt_lookup_num_tokens": 3}
    output, trace = record_generate(tiny.model, tiny.tokenizer, ids, max_new_tokens=NEW, store=store, **extra)
    tokens = new_tokens(output, ids)
    assert trace.token_ids == tokens
    assert tokens == run_to_end(tiny, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=NEW, chat=False)).token_ids
    assert sum(matches + 1 for _, matches in seen) == len(tokens)
    rounds = trace.rounds
    assert [(len(r.draft_tokens), r.accepted_count) for r in rounds] == [s for s in seen if s[0] > 0]
    assert sum(r.accepted_count for r in rounds) > 0  # something was accepted: the test can tell
    assert trace.started.tags["mode"] == f"assisted: {generator.__name__}"
    # each round is followed by its committed tokens: the accepted drafts, then one from the target
    events = [e for e in trace.events if isinstance(e, (DraftRound, TokenStep))]
    for index, event in enumerate(events):
        if isinstance(event, DraftRound):
            committed = events[index + 1: index + 2 + event.accepted_count]
            assert [s.token_id for s in committed] == [*event.draft_tokens[:event.accepted_count], event.bonus_token]
            assert [s.origin for s in committed] == ["draft"] * event.accepted_count + ["bonus"]
            assert event.verdicts[:event.accepted_count] == ["accepted"] * event.accepted_count
            assert all(p is not None for p in event.p[:event.accepted_count + 1][:len(event.draft_tokens)])
    loaded = store.load_trace(trace.run_id)
    assert loaded.all_events() == trace.all_events()
    for name in ("acceptance", "draft-tree", "timeline", "accepted-lengths"):
        figure = get_view(name).render([loaded], 0)
        assert figure.data, name


def test_beam_and_sampling_are_recorded_and_outputs_keep_their_shape(tiny, tiny_flat):
    ids = prompt_ids(tiny)
    with recording(tiny, label="beams") as rec:
        beams = tiny.model.generate(ids, max_new_tokens=8, num_beams=3, return_dict_in_generate=True,
                                    output_scores=True)
    assert rec.trace.token_ids == new_tokens(beams.sequences, ids) and rec.trace.started.tags["mode"] == "beam search"
    assert beams.scores is not None and beams.logits is None  # the logits the recording added are not handed back
    torch.manual_seed(3)
    with recording(tiny_flat, seed=3) as rec:
        sampled = tiny_flat.model.generate(ids, max_new_tokens=8, do_sample=True, top_k=5)
    steps = rec.trace.token_steps
    assert rec.trace.token_ids == new_tokens(sampled, ids) and rec.trace.started.seed == 3
    assert all(s.kept_count == 5 and s.token_id in s.kept_top_ids for s in steps)  # the processed scores: top-k 5


def test_a_generate_that_raises_is_stored_as_failed(tiny, store):
    with recording(tiny, store=store) as rec, pytest.raises(ValueError):
        tiny.model.generate(prompt_ids(tiny), max_new_tokens=4, num_beams=2, do_sample=False, num_beam_groups=3)
    stored = store.load_trace(rec.run_id)
    assert stored.status == "failed" and stored.finished.error.startswith("ValueError")


# ------------------------------------------------------------------------------- a LogitsProcessor as a lane
@pytest.mark.parametrize("seed", [0, 1])
def test_typical_warper_lane_equals_transformers_sampling_with_it(tiny_flat, seed):
    prompt = "Once upon a time"
    torch.manual_seed(seed)  # transformers samples with the global generator; our lane with one seeded the same
    with recording(tiny_flat, seed=seed) as rec:
        tiny_flat.model.generate(prompt_ids(tiny_flat, prompt), max_new_tokens=NEW, do_sample=True, top_k=0,
                                 logits_processor=LogitsProcessorList([TypicalLogitsWarper(mass=0.5)]))
    theirs = rec.trace
    ours = run_to_end(tiny_flat, RunRequest.build("logits_processor", {"processor_kwargs": '{"mass": 0.5}'}, prompt,
                                                  max_new_tokens=NEW, chat=False, seed=seed))
    assert ours.token_ids == theirs.token_ids
    for mine, hf in zip(ours.token_steps, theirs.token_steps, strict=True):  # the kept set of every step
        assert mine.kept_count == hf.kept_count and mine.kept_top_ids == hf.kept_top_ids
        assert 1 < mine.kept_count < len(tiny_flat.tokenizer)


def test_processor_lane_greedy_rule_and_filters(tiny):
    config = make_config("logits_processor", {"processor": "RepetitionPenaltyLogitsProcessor",
                                              "processor_kwargs": '{"penalty": 1.0}', "rule": "greedy"})
    trace = run_to_end(tiny, RunRequest("logits_processor", config, PROMPT, max_new_tokens=8, chat=False))
    assert trace.token_ids == run_to_end(tiny, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=8,
                                                                chat=False)).token_ids


@pytest.mark.parametrize("params, message", [
    ({"processor": "os.system"}, "processor must name a LogitsProcessor"),
    ({"processor": "builtins.eval"}, "processor must name a LogitsProcessor"),
    ({"processor": "transformers.generation.logits_process.LogitsProcessor"}, "processor must name"),
    ({"processor": "transformers.generation.logits_process.__builtins__"}, "processor must name"),
    ({"processor": "transformers.generation.utils.GenerationMixin"}, "processor must name"),
    ({"processor": "PrefixConstrainedLogitsProcessor"}, "processor must name"),
    ({"processor_kwargs": "mass=0.9"}, "must be a JSON object"),
    ({"processor_kwargs": "[0.9]"}, "must be a JSON object"),
    ({"processor_kwargs": '{"mass": NaN}'}, "finite numbers"),
    ({"processor_kwargs": '{"mass": 2.0}'}, "TypicalLogitsWarper refused these arguments: ValueError"),
    ({"processor_kwargs": '{"mas": 0.9}'}, "TypicalLogitsWarper refused these arguments: TypeError"),
    ({"processor_kwargs": '{"mass": 0.9, "device": "cuda"}'}, "device is the model's"),
    ({"processor_kwargs": '{"mass": 99999999999}'}, "integer within"),
    ({"processor_kwargs": '{"mass": [[[[0.9]]]]}'}, "nested at most"),
    ({"processor_kwargs": '{"mass": {"a": 1}}'}, "must be a number, a flag"),
    ({"processor_kwargs": json.dumps({"mass": 0.9, "x": "a" * 600})}, "longer than 512"),
])
def test_bad_processors_and_arguments_are_refused_in_one_line(params, message):
    with pytest.raises(ValueError, match=message) as error:
        make_config("logits_processor", params)
    assert "\n" not in str(error.value)


def test_a_processor_that_cannot_run_on_one_sequence_is_refused_before_the_run(tiny, store):
    request = RunRequest.build("logits_processor", {"processor": "ClassifierFreeGuidanceLogitsProcessor",
                                                    "processor_kwargs": '{"guidance_scale": 1.5}'}, PROMPT)
    with pytest.raises(ValueError, match="cannot run on one sequence") as error:
        run_to_end(tiny, request)
    assert "\n" not in str(error.value) and store.count_runs() == 0


def test_a_plugins_processor_is_allowed_once_registered(tiny):
    class Favour(LogitsProcessor):
        def __init__(self, token: int):
            self.token = token

        def __call__(self, input_ids, scores):
            return scores.index_fill(-1, torch.tensor([self.token]), 1e4)

    path = f"{Favour.__module__}.{Favour.__qualname__}"
    with pytest.raises(ValueError, match="processor must name"):
        make_config("logits_processor", {"processor": path, "processor_kwargs": '{"token": 40}'})
    register_logits_processor(Favour)
    try:
        config = make_config("logits_processor", {"processor": path, "processor_kwargs": '{"token": 40}'})
        trace = run_to_end(tiny, RunRequest("logits_processor", config, PROMPT, max_new_tokens=4, chat=False))
        assert trace.token_ids == [40] * 4
        with pytest.raises(ValueError, match="takes a subclass"):
            register_logits_processor(dict)
    finally:
        PLUGIN_PROCESSORS.pop(path, None)


def test_a_server_passes_the_lane_with_its_allowed_classes_only():
    policy = ServerPolicy()
    request = RunRequest.build("logits_processor", {"processor": "TopKLogitsWarper",
                                                    "processor_kwargs": '{"top_k": 5}'}, PROMPT)
    assert policy.limit(request).config.processor == "TopKLogitsWarper"
    with pytest.raises(ValueError, match="processor must name"):  # what a visitor types is checked the same way
        RunRequest.build("logits_processor", {"processor": "subprocess.Popen"}, PROMPT)


# ------------------------------------------------------------------------------- a custom_generate recipe as a lane
def test_a_trusted_local_recipe_runs_as_a_lane_and_is_recorded(tiny, tmp_path, store):
    recipe = str(write_recipe(tmp_path / "recipe"))
    params = {"repo": recipe, "trust_remote_code": True}
    trace = run_to_end(tiny, RunRequest.build("custom_generate", params, PROMPT, max_new_tokens=8, chat=False))
    greedy = run_to_end(tiny, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=8, chat=False))
    assert trace.token_ids == greedy.token_ids
    assert trace.finished.target_forward_passes == 8  # the recipe's own passes (no cache: one full pass per token)
    for mine, theirs in zip(trace.token_steps, greedy.token_steps, strict=True):  # scores of one pass over it all
        assert mine.top_ids == theirs.top_ids and mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
    ids = prompt_ids(tiny)
    with recording(tiny, store=store) as rec:  # part 1's recording takes a custom_generate call as it is
        output = tiny.model.generate(input_ids=ids, max_new_tokens=8, custom_generate=recipe, trust_remote_code=True)
    assert rec.trace.token_ids == new_tokens(output, ids) == greedy.token_ids
    assert rec.trace.started.tags["mode"] == "custom_generate" and rec.trace.started.tags["scores"] == "recomputed"


@pytest.mark.parametrize("params, message", [
    ({"trust_remote_code": False}, "switch trust_remote_code on"),
    ({"repo": "no/such/recipe/dir"}, "must be a local directory"),
    ({"repo": ""}, "must be a local directory"),
])
def test_a_recipe_runs_only_trusted_and_local(tiny, tmp_path, store, params, message):
    settings = {"repo": str(write_recipe(tmp_path / "recipe")), "trust_remote_code": True, **params}
    with pytest.raises(ValueError, match=message) as error:
        run_to_end(tiny, RunRequest.build("custom_generate", settings, PROMPT, max_new_tokens=4))
    assert "\n" not in str(error.value) and store.count_runs() == 0


def test_a_recipe_from_the_hub_is_fetched_first_and_fails_in_one_line_offline(tiny, tmp_path, store, monkeypatch):
    from explorer.strategies import custom_generate

    def offline(repo_id):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(custom_generate, "fetch_recipe", offline)
    settings = {"repo": "someone/recipe", "trust_remote_code": True}
    with pytest.raises(ValueError, match="cannot fetch the recipe 'someone/recipe'") as error:
        run_to_end(tiny, RunRequest.build("custom_generate", settings, PROMPT, max_new_tokens=4))
    assert "\n" not in str(error.value) and store.count_runs() == 0
    fetched = write_recipe(tmp_path / "fetched")  # where the Hub is reachable: its fetched copy runs
    monkeypatch.setattr(custom_generate, "fetch_recipe", lambda repo_id: fetched)
    trace = run_to_end(tiny, RunRequest.build("custom_generate", settings, PROMPT, max_new_tokens=4, chat=False))
    assert len(trace.token_ids) == 4
    monkeypatch.setattr(custom_generate, "fetch_recipe", lambda repo_id: tmp_path / "empty")
    with pytest.raises(ValueError, match="has no custom_generate/generate.py"):
        run_to_end(tiny, RunRequest.build("custom_generate", settings, PROMPT, max_new_tokens=4))


def test_a_server_never_runs_a_recipe(tmp_path):
    request = RunRequest.build("custom_generate", {"repo": str(write_recipe(tmp_path / "recipe")),
                                                   "trust_remote_code": True}, PROMPT)
    with pytest.raises(ValueError, match="never on a server"):
        ServerPolicy().limit(request)
