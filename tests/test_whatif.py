"""What if: branches from any token (runner, CLI, tree), the logit lens, attention records, why two lanes part."""

import json

import pytest

from explorer.branch import branch_request, branch_tree
from explorer.cli import main
from explorer.export import read_bundle, write_bundle
from explorer.recorder import Recorder
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies import get_strategy, make_config
from explorer.viewer import Viewer
from store import Store

PROMPT = "the cat sat on the mat. the cat"


def greedy_from(model, prompt_ids, limit):
    """Plain greedy decoding from a given context (the reference a branch's continuation must equal)."""
    events = get_strategy("greedy").run(model, list(prompt_ids), make_config("greedy", {}), None)
    tokens = []
    for event in events if limit > 0 else ():
        tokens.append(event.token_id)
        if len(tokens) == limit:
            break
    return tokens


@pytest.fixture(scope="module")
def parent(tiny):
    return run_to_end(tiny, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=16, chat=False))


@pytest.mark.parametrize("step", [0, 5, 15])
def test_a_branch_keeps_the_prefix_forces_the_token_and_decodes_on_like_greedy(tiny, parent, step):
    alternative = parent.token_steps[step].top_ids[2]
    branch = run_to_end(tiny, branch_request(tiny, parent, step, alternative))
    assert branch.token_ids[:step] == parent.token_ids[:step]
    assert branch.token_ids[step] == alternative and branch.token_steps[step].origin == "forced"
    assert [s.origin for s in branch.token_steps[:step]] == ["prefix"] * step
    assert [s.step for s in branch.token_steps] == list(range(16)) and len(branch.token_ids) == 16
    rest = greedy_from(tiny, parent.started.prompt_ids + branch.token_ids[:step + 1], 16 - step - 1)
    assert branch.token_ids[step + 1:] == rest
    started = branch.started
    assert (started.parent_run, started.parent_step, started.prefix_ids) == (
        parent.run_id, step, [*parent.token_ids[:step], alternative])
    forced = branch.token_steps[step]  # the forced token's statistics are the model's at that position
    assert forced.rank == 2 and forced.top_ids == parent.token_steps[step].top_ids


def test_a_branch_may_decode_on_with_another_strategy(tiny, parent):
    alternative = parent.token_steps[3].top_ids[1]
    greedy = run_to_end(tiny, branch_request(tiny, parent, 3, alternative))
    for name, params in [("prompt_lookup", {"min_ngram": "1"}), ("beam", {"num_beams": "2"}),
                         ("sample", {"top_p": "0.9"})]:
        other = run_to_end(tiny, branch_request(tiny, parent, 3, alternative, name, params))
        assert other.status == "ok" and other.token_ids[:4] == greedy.token_ids[:4]
        assert [s.step for s in other.token_steps] == list(range(len(other.token_steps)))
        if name == "prompt_lookup":  # greedy rule: the same tokens as greedy from the fork
            assert other.token_ids == greedy.token_ids


def test_bad_branches_are_refused_in_one_line(tiny, parent):
    chosen = parent.token_ids[2]
    with pytest.raises(ValueError, match="step must be between 0 and 15"):
        branch_request(tiny, parent, 16, "a")
    with pytest.raises(ValueError, match="already: pick another token"):
        branch_request(tiny, parent, 2, chosen)
    with pytest.raises(ValueError, match="is 3 tokens for this model"):
        branch_request(tiny, parent, 2, "abc")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        branch_request(tiny, parent, 2, 10**6)
    with pytest.raises(ValueError, match="has no parameter"):
        branch_request(tiny, parent, 2, "q", "sample", {"nope": 1})
    assert branch_request(tiny, parent, 2, parent.token_steps[2].top_texts[1]).prefix[-1] == \
        parent.token_steps[2].top_ids[1]  # a recorded alternative by its text


def test_the_parent_link_survives_export_and_import_and_forms_a_tree(tiny, parent, tmp_path, store):
    first = run_to_end(tiny, branch_request(tiny, parent, 4, parent.token_steps[4].top_ids[1]))
    second = run_to_end(tiny, branch_request(tiny, first, 9, first.token_steps[9].top_ids[1]))
    back = read_bundle(write_bundle(second, tmp_path / "b.zip"))
    assert (back.started.parent_run, back.started.parent_step) == (first.run_id, 9)
    for trace in (parent, first, second):
        store.save_trace(trace)
    loaded = store.load_traces([parent.run_id, first.run_id, second.run_id])
    [root] = branch_tree(loaded)
    assert root.trace.run_id == parent.run_id and root.children[0].trace.run_id == first.run_id
    assert root.children[0].children[0].trace.run_id == second.run_id and root.children[0].children[0].step == 9


def test_branch_cli(tiny_dir, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'b.sqlite'}"
    assert main(["run", "--strategy", "greedy", "--prompt", PROMPT, "--no-chat", "--model", str(tiny_dir),
                 "--max-new-tokens", "10", "--db", db, "--json", "--quiet"]) == 0
    parent = json.loads(capsys.readouterr().out)
    stored = Store(db).load_trace(parent["run_id"])
    alt = stored.token_steps[3].top_ids[1]
    assert main(["branch", parent["run_id"], "--step", "3", "--token", str(alt), "--model", str(tiny_dir),
                 "--db", db, "--json", "--quiet"]) == 0
    branch = json.loads(capsys.readouterr().out)
    assert branch["token_ids"][:3] == parent["token_ids"][:3] and branch["token_ids"][3] == alt
    assert Store(db).load_trace(branch["run_id"]).started.parent_run == parent["run_id"]
    assert main(["branch", parent["run_id"], "--step", "99", "--token", "a", "--model", str(tiny_dir),
                 "--db", db]) == 2
    assert "step must be between 0 and 9" in capsys.readouterr().err
    assert main(["branch", "nosuchrun", "--step", "1", "--token", "a", "--db", db]) == 2


# ------------------------------------------------------------------------------------------- logit lens
def test_the_last_layer_of_the_lens_is_the_models_own_distribution(tiny):
    import math

    for name, params in [("greedy", {}), ("sample", {"top_p": "0.9"}), ("prompt_lookup", {"min_ngram": "1"})]:
        trace = run_to_end(tiny, RunRequest.build(name, params, PROMPT, max_new_tokens=12, chat=False, lens=True))
        lens = [e for e in trace.events if type(e).__name__ == "LensStep"]
        assert [e.step for e in lens] == [s.step for s in trace.token_steps]
        layers = tiny.model.config.num_hidden_layers
        for step, record in zip(trace.token_steps, lens, strict=True):
            assert len(record.chosen_probs) == layers and record.token_id == step.token_id
            assert record.chosen_probs[-1] == pytest.approx(math.exp(step.logprob), rel=1e-4, abs=1e-6)
            assert record.chosen_ranks[-1] == step.rank and record.top_ids[-1][:3] == step.top_ids[:3]
        assert trace.started.probes == {"lens": True}
        assert trace.finished.target_forward_passes == run_to_end(
            tiny, RunRequest.build(name, params, PROMPT, max_new_tokens=12, chat=False)
        ).finished.target_forward_passes  # the probe's passes are not the run's


def test_a_lens_layer_is_the_head_over_the_normed_hidden_state(tiny):
    import torch

    from explorer.models import final_norm

    trace = run_to_end(tiny, RunRequest.build("greedy", {}, PROMPT, max_new_tokens=3, chat=False, lens=True))
    record = next(e for e in trace.events if type(e).__name__ == "LensStep")
    ids = torch.tensor([trace.started.prompt_ids])
    with torch.no_grad():
        hidden = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states[1][0, -1]
        probs = torch.softmax(tiny.model.get_output_embeddings()(final_norm(tiny.model)(hidden)), dim=-1)
    assert record.chosen_probs[0] == pytest.approx(float(probs[record.token_id]), rel=1e-4)
    assert record.top_ids[0][0] == int(probs.argmax())


# -------------------------------------------------------------------------------------------- attention
def marker_model(marker: int):
    """A 1-layer Llama whose every query attends to the positions holding `marker`: all embeddings share a
    direction the queries read, the marker's embedding has one the keys read, and both land on each head's
    slowest rotary pair (rope_theta 1e12: position barely turns them)."""
    import dataclasses as dc

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from explorer.models import LanguageModel, ModelInfo
    from explorer.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, rope_theta=1e12, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.mul_(0.1)
        emb[:, 0] += 1.0  # shared: every query reads it
        emb[marker, 1] += 1.0  # the marker: keys read it
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        for head in range(4):
            attn.q_proj.weight[head * 16 + 7, 0] = 30.0
            attn.k_proj.weight[head * 16 + 7, 1] = 30.0
    info = ModelInfo("tiny-marker", "marker", "float32", "cpu")
    return dc.replace(LanguageModel(model=model, tokenizer=tokenizer, info=info))


def test_attention_records_are_sorted_distributions_that_find_the_source():
    from explorer.testing import tiny_tokenizer

    marker = tiny_tokenizer().convert_tokens_to_ids("Z")
    lm = marker_model(marker)
    prompt = "abcdefgZhijklmnop"
    trace = run_to_end(lm, RunRequest.build("greedy", {}, prompt, max_new_tokens=6, chat=False, attention=True,
                                            attention_top=5))
    records = [e for e in trace.events if type(e).__name__ == "AttentionStep"]
    assert len(records) == 6 and trace.started.probes == {"attention": {"layers": [0, 0], "top": 5}}
    sequence = trace.started.prompt_ids + trace.token_ids
    for record in records:
        assert len(record.sources) == 5 and record.weights == sorted(record.weights, reverse=True)
        assert 0 < sum(record.weights) <= 1 + 1e-6 and all(0 <= s < record.position for s in record.sources)
        assert sequence[record.sources[0]] == marker and record.weights[0] > 0.5  # it leans on the marker


def test_bad_probe_settings_are_refused_before_a_run_is_stored(tiny, store):
    with pytest.raises(ValueError, match="within 0-1"):
        run_to_end(tiny, RunRequest.build("greedy", {}, "hi", attention=True, attention_layers="0-5"),
                   recorder=Recorder(store))
    with pytest.raises(ValueError, match="attention top must be between 1 and 64"):
        RunRequest.build("greedy", {}, "hi", attention=True, attention_top=500)
    assert store.count_runs() == 0


# ------------------------------------------------------------------------------ exports, figures, why parted
def test_lens_and_attention_go_to_parquet_and_every_what_if_view_draws(tiny_dir, tmp_path, capsys):
    import pyarrow.parquet as pq

    from explorer.models import load_model
    from viz.catalog import get_view
    from viz.theme import has_data

    db = f"sqlite:///{tmp_path / 'w.sqlite'}"
    lm = load_model(str(tiny_dir))
    store = Store(db)
    parent = run_to_end(lm, RunRequest.build("prompt_lookup", {"min_ngram": 1}, PROMPT, max_new_tokens=10,
                                             chat=False, lens=True, attention=True), recorder=Recorder(store))
    assert main(["export", parent.run_id, "--format", "lens", "--out", str(tmp_path / "lens.parquet"),
                 "--db", db]) == 0
    lens = pq.read_table(tmp_path / "lens.parquet").to_pylist()
    layers = lm.model.config.num_hidden_layers
    assert len(lens) == 10 * layers and {r["layer"] for r in lens} == set(range(layers))
    assert main(["export", parent.run_id, "--format", "attention", "--out", str(tmp_path / "att.parquet"),
                 "--db", db]) == 0
    attention = pq.read_table(tmp_path / "att.parquet").to_pylist()
    assert len(attention) == 10 * 8 and all(r["source_position"] < r["position"] for r in attention)
    for view in ("logit-lens", "attention-graph"):
        assert main(["figure", parent.run_id, "--view", view, "--out", str(tmp_path / f"{view}.svg"),
                     "--db", db]) == 0
        assert (tmp_path / f"{view}.svg").read_text().startswith("<svg")
    branch = run_to_end(lm, branch_request(lm, parent, 3, parent.token_steps[3].top_ids[1]), recorder=Recorder(store))
    assert main(["figure", parent.run_id, "--view", "branch-tree", "--out", str(tmp_path / "tree.svg"),
                 "--db", db]) == 0  # the parent alone: its stored branch is drawn too
    assert "Branch tree (2 runs; 1 stored" in (tmp_path / "tree.svg").read_text()
    sample = run_to_end(lm, RunRequest.build("sample", {"top_p": 0.9}, PROMPT, max_new_tokens=10, chat=False,
                                             seed=1))
    for view in ("branch-tree", "why-parted"):
        assert has_data(get_view(view).render([parent, sample, branch], 2))


def test_why_two_lanes_parted_names_each_lanes_rule(tiny_flat):
    from viz.whatif import why_chosen

    runs = {name: run_to_end(tiny_flat, RunRequest.build(name, params, PROMPT, max_new_tokens=6, chat=False, seed=2))
            for name, params in [("greedy", {}), ("sample", {"top_p": 0.9, "temperature": 0.8}), ("mirostat", {}),
                                 ("top_h", {}), ("beam", {"num_beams": 3})]}
    assert why_chosen(runs["greedy"], 0).startswith("the argmax (rank 0")
    sampled = why_chosen(runs["sample"], 0)
    assert sampled.startswith("sampled at temperature 0.8: top-p 0.9 kept") and "raw rank" in sampled
    assert "Mirostat's mu = " in why_chosen(runs["mirostat"], 0)
    assert "Top-H kept" in why_chosen(runs["top_h"], 0)
    assert why_chosen(runs["beam"], 0).startswith("the best beam hypothesis")
    greedy = runs["greedy"]
    branch = run_to_end(tiny_flat, branch_request(tiny_flat, greedy, 2, greedy.token_steps[2].top_ids[1]))
    assert why_chosen(branch, 2).startswith("forced") and why_chosen(branch, 0).startswith("copied from the parent")


def test_a_branchs_given_tokens_do_not_count_in_its_speed_metrics(tiny, parent):
    """A branch's prefix and forced token were not chosen by its strategy: greedy from the fork still has one token
    per verification round, and its speed counts the tokens it decoded."""
    branch = run_to_end(tiny, branch_request(tiny, parent, 6, parent.token_steps[6].top_ids[1]))
    assert len(branch.decoded_steps) == len(branch.token_steps) - 7
    assert branch.mean_accepted_tokens == 1.0
    metrics = branch.metrics()
    assert metrics["forward_passes_per_token"] == pytest.approx(
        metrics["target_forward_passes"] / len(branch.decoded_steps))
    assert metrics["tokens_per_s"] == pytest.approx(len(branch.decoded_steps) / branch.finished.wall_time_s)


def test_the_store_finds_a_runs_whole_branch_family_that_its_owner_may_see(tiny, store):
    """From any run of a family, the root and every branch below it, oldest first; another visitor's branch of a
    shared run is not shown, and neither is a parent one may not see."""
    def stored(request, owner):
        return run_to_end(tiny, request, recorder=Recorder(store, owner=owner))

    root = stored(RunRequest.build("greedy", {}, PROMPT, max_new_tokens=8, chat=False), "a")
    first = stored(branch_request(tiny, root, 2, root.token_steps[2].top_ids[1]), "a")
    deeper = stored(branch_request(tiny, first, 5, first.token_steps[5].top_ids[1]), "a")
    second = stored(branch_request(tiny, root, 4, root.token_steps[4].top_ids[2]), "a")
    strangers = stored(branch_request(tiny, root, 1, root.token_steps[1].top_ids[1]), "b")
    family = [root.run_id, first.run_id, deeper.run_id, second.run_id]
    a, b, b_shared = Viewer("a"), Viewer("b"), Viewer("b", frozenset([root.run_id]))  # b_shared opened the root
    assert store.family([deeper.run_id], viewer=a) == family
    assert store.family([root.run_id, second.run_id], viewer=a) == family
    assert store.family([deeper.run_id]) == sorted([*family, strangers.run_id],
                                                   key=lambda r: store.load_trace(r).started.created_at)
    assert store.family([strangers.run_id], viewer=b) == [strangers.run_id]  # a's root is not b's to see
    assert store.family([strangers.run_id], viewer=b_shared) == [root.run_id, strangers.run_id]
    assert len(store.family([root.run_id], viewer=a, limit=2)) == 2
