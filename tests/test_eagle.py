"""Trained draft heads (issue 15, first part): training on a tiny model lowers the loss and raises agreement,
the saved head loads (fp16 + manifest), EAGLE drafting is token-identical to greedy under the greedy rule and
exact under the sampling rule (q is zero outside the draft vocabulary)."""

import hashlib
import json
import math

import pytest
import torch

from explorer.events import DraftRound
from explorer.heads import CONFIG_FILE, HEAD_FILE, load_head, load_published
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.strategies import get_strategy, make_config
from explorer.strategies.acceptance import RejectionSampling
from explorer.strategies.draft_verify import DraftTree, SpeculativeConfig
from explorer.strategies.medusa import TypicalAcceptance, medusa_tree
from explorer.testing import tiny_model
from explorer.train_drafter import train
from explorer.trees import path_to
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


def test_speculative_drafts_with_the_shipped_head_by_default_and_stays_lossless(trained, tmp_path, monkeypatch):
    """draft_model 'auto' (the default): the head shipped for the target where there is one, layer-skip
    elsewhere and with BiLD's settings (which need a draft model); 'eagle-head' asks for the head. Both rules stay
    exact."""
    import shutil

    import explorer.heads as heads

    lm, directory, _ = trained
    prompt = PROMPTS[0]
    greedy = run_to_end(lm, RunRequest.build("greedy", {}, prompt, max_new_tokens=30, chat=False))
    before = run_to_end(lm, RunRequest.build("speculative", {}, prompt, max_new_tokens=30, chat=False))
    assert before.token_ids == greedy.token_ids and "skipping" in before.rounds[0].drafter  # no head ships for it
    with pytest.raises(ValueError, match="needs a trained head"):
        get_strategy("speculative").prepare(lm, make_config("speculative", {"draft_model": "eagle-head"}))
    shutil.copytree(directory, tmp_path / "tiny-eagle")
    monkeypatch.setattr(heads, "SHIPPED", tmp_path)  # now a head ships for the tiny model
    for params in ({}, {"draft_model": "eagle-head", "draft_length": 3, "adaptive": False}):
        trace = run_to_end(lm, RunRequest.build("speculative", params, prompt, max_new_tokens=30, chat=False))
        assert trace.token_ids == greedy.token_ids and trace.started.config["draft_model"] == params.get(
            "draft_model", "auto")
        assert {r.drafter for r in trace.rounds} == {"EAGLE head"} and trace.mean_accepted_tokens > 1
    sampled = RunRequest.build("speculative", {"rule": "sampling"}, prompt, max_new_tokens=30, chat=False, seed=4)
    trace = run_to_end(lm, sampled)
    vocab = set(load_head(lm, directory).draft_ids.tolist())
    assert all(t in vocab for r in trace.rounds for t in r.draft_tokens)
    assert run_to_end(lm, sampled).token_ids == trace.token_ids
    for params in ({"rollback": 1.0}, {"fallback_threshold": 0.3}):  # BiLD: 'auto' drafts with layer-skip
        trace = run_to_end(lm, RunRequest.build("speculative", params, prompt, max_new_tokens=12, chat=False))
        assert trace.status == "ok" and all("skipping" in r.drafter for r in trace.rounds)
        assert trace.rounds or "fallback_threshold" in params  # the fallback may hand every step to the target
        with pytest.raises(ValueError, match="need a draft model, not the EAGLE head"):
            get_strategy("speculative").prepare(lm, make_config("speculative", {**params, "draft_model": "eagle-head"}))
    layer_skip = run_to_end(lm, RunRequest.build("speculative", {"draft_model": "layer-skip"}, prompt,
                                                 max_new_tokens=30, chat=False))
    assert "skipping" in layer_skip.rounds[0].drafter
    with pytest.raises(ValueError, match="not as a draft model"):
        get_strategy("tree_speculative").prepare(lm, make_config("tree_speculative", {"draft_model": "eagle-head"}))


def test_the_heads_draft_rows_are_gathered_once_and_follow_the_lm_head(trained):
    """EagleHead.logits keeps W[V_d]: the scores equal the product with freshly gathered rows, in inference mode
    and then with autograd (an inference tensor would refuse backward), and follow an in-place change of W."""
    lm, directory, _ = trained
    head = load_head(lm, directory)
    weight = lm.model.get_output_embeddings().weight.detach().clone()
    predicted = torch.randn(3, weight.shape[1])
    with torch.inference_mode():
        assert torch.allclose(head.logits(predicted, weight), predicted @ weight[head.draft_ids].T)
        rows = head._rows[1]
        head.logits(predicted, weight)
        assert head._rows[1] is rows  # kept, not gathered again
    wanting_grad = predicted.clone().requires_grad_()
    head.logits(wanting_grad, weight).sum().backward()
    assert torch.allclose(wanting_grad.grad, weight[head.draft_ids].sum(dim=0).expand(3, -1))
    weight.mul_(2.0)
    assert torch.allclose(head.logits(predicted, weight), predicted @ weight[head.draft_ids].T)


def test_a_missing_or_foreign_head_is_a_clear_error(trained, tmp_path):
    lm, directory, _ = trained
    for params, message in (({}, "needs a trained head"), ({"drafter": str(tmp_path)}, "has none of"),
                            ({"drafter": "layer-skip"}, "is a draft model, not a trained head")):
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
        tree = run_to_end(lm, RunRequest.build("eagle", {"drafter": str(directory), "tree": "dynamic", "tree_top_k": 3,
                                                         "depth": 4, "budget": 8}, prompt, max_new_tokens=30,
                                               chat=False))
        assert tree.token_ids == greedy.token_ids
        assert max(len(r.draft_tokens) for r in tree.rounds) == 8 and not all(r.parents == list(range(-1, 7))
                                                                               for r in tree.rounds)
        # one child per level: the tree is the head's greedy chain, drafted through tree-masked head passes
        chain = run_to_end(lm, RunRequest.build("eagle", {"drafter": str(directory), "draft_length": 4,
                                                          "adaptive": False}, prompt, max_new_tokens=30, chat=False))
        narrow = run_to_end(lm, RunRequest.build("eagle", {"drafter": str(directory), "tree": "dynamic",
                                                           "tree_top_k": 1, "depth": 4, "budget": 4}, prompt,
                                                 max_new_tokens=30, chat=False))
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


def authors_typical_choice(logits, tokens, parents, temperature, epsilon, delta):
    """An independent rendering of the authors' rule (FasterDecoding/Medusa, medusa/model/utils.py:
    evaluate_posterior, sampling='typical', fast=True; generate_candidates takes the next first token as the
    argmax): one candidate row per leaf path, p = softmax(logits / T), threshold min(epsilon, delta exp(-H)) with
    their log(p + 1e-5), accept length = cumprod of the mask, the longest wins, ties by the summed log p.
    Returns (accepted node indices, the next token)."""
    leaves = [i for i in range(len(tokens)) if i not in parents]
    paths = []
    for leaf in leaves:
        path = [leaf]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        paths.append(path[::-1])
    candidates = torch.tensor([[tokens[i] for i in path] for path in paths])  # (paths, depth)
    rows = torch.stack([logits[[0, *(i + 1 for i in path)]] for path in paths])  # (paths, depth + 1, vocab)
    prob = torch.softmax(rows[:, :-1] / temperature, dim=-1)
    candidate_prob = prob.gather(-1, candidates[..., None])[..., 0]
    entropy = -(prob * torch.log(prob + 1e-5)).sum(-1)
    threshold = torch.minimum(torch.full_like(entropy, epsilon), torch.exp(-entropy) * delta)
    lengths = torch.cumprod((candidate_prob > threshold).int(), dim=1).sum(dim=1)
    length = int(lengths.max())
    best = 0
    if length:
        tied = torch.where(lengths == length)[0]
        best = int(tied[torch.argmax(torch.log(candidate_prob[tied, :length]).sum(-1))])
    return paths[best][:length], int(rows[best, length].argmax())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_medusa_typical_acceptance_picks_the_authors_candidate(temperature):
    """On hand-built trees (top-3 x top-2 x top-2 candidates) and random target rows, the accepted path and the
    next token equal the authors' rule: the longest accepted candidate, ties broken by likelihood."""
    g = torch.Generator().manual_seed(int(temperature * 10))
    config = SpeculativeConfig(rule="sampling", temperature=temperature)
    typical = TypicalAcceptance(posterior_threshold=0.09, posterior_alpha=0.3, filters=config)
    lengths, tie_breaks = set(), 0
    for _ in range(300):
        levels = [torch.randperm(6, generator=g)[:w].tolist() for w in (3, 2, 2)]
        tokens, parents, _ = medusa_tree(levels)
        logits = torch.randn(len(tokens) + 1, 6, generator=g) * 2.5
        draft = DraftTree(tokens, parents, [1.0] * len(tokens), None, mode="point")
        verdict = typical.verify(logits, draft, [0], g)
        path, next_token = authors_typical_choice(logits, tokens, parents, temperature, 0.09, 0.3)
        assert (verdict.path, verdict.bonus_token) == (path, next_token)
        assert verdict.u == [None] * len(tokens) and verdict.details["acceptance"] == "typical"
        lengths.add(len(path))
        passing = [i for i, v in enumerate(verdict.node_verdicts) if v != "unreached" and i not in path
                   and verdict.p[i] > float(verdict.details["typical_threshold"].split(",")[i])]
        tie_breaks += any(len(path_to(parents, i)) == len(path) for i in passing)
    assert lengths == {0, 1, 2, 3} and tie_breaks > 10  # every accept length, and ties the likelihood decided


def test_medusa_typical_acceptance_is_lossy_where_exact_rejection_is_not():
    """p(x) = 0.2 clears min(0.09, 0.3 exp(-H)): typical accepts x outright, while exact speculative sampling of
    the point-mass candidate with the same generator draws u = 0.50 > 0.2 and rejects it; p(y) = 0.05 at a peaked
    row falls short of the bar, yet exact sampling accepts it whenever u < 0.05."""
    config = SpeculativeConfig(rule="sampling")
    typical = TypicalAcceptance(0.09, 0.3, config)
    p = torch.tensor([0.2, 0.3, 0.25, 0.25])
    logits = torch.log(torch.stack([p, p]))
    draft = DraftTree.chain([0])
    draft.mode = "point"
    rng = torch.Generator().manual_seed(0)
    exact = RejectionSampling(config).verify(logits, draft, [1], rng)
    assert exact.u[0] > 0.2 and exact.node_verdicts == ["rejected"]
    lossy = typical.verify(logits, draft, [1], rng)
    assert lossy.node_verdicts == ["accepted"] and lossy.path == [0] and lossy.bonus_token == 1  # then the argmax
    threshold = float(lossy.details["typical_threshold"])
    entropy = -float((p * p.log()).sum())
    assert threshold == pytest.approx(min(0.09, 0.3 * math.exp(-entropy))) and lossy.p[0] == pytest.approx(0.2)
    peaked = torch.tensor([0.05, 0.9, 0.05])
    rejected = typical.verify(torch.log(torch.stack([peaked, peaked])), draft, [1], rng)
    assert rejected.accepted_count == 0 and rejected.bonus_token == 1 and rejected.bonus_kind == "correction"
    assert float(rejected.details["typical_threshold"]) == pytest.approx(0.09)  # here the hard threshold binds


def test_medusa_typical_acceptance_runs_records_its_thresholds_and_asks_for_the_sampling_rule(medusa):
    lm, directory, _ = medusa
    with pytest.raises(ValueError, match="set rule to sampling"):
        make_config("medusa", {"acceptance": "typical"})
    params = {"drafter": str(directory), "rule": "sampling", "acceptance": "typical"}
    trace = run_to_end(lm, RunRequest.build("medusa", params, PROMPTS[0], max_new_tokens=30, chat=False, seed=3))
    assert len(trace.token_ids) == 30 and trace.rounds
    for r in trace.rounds:
        thresholds = r.details["typical_threshold"].split(",")
        assert r.details["acceptance"] == "typical" and r.u == [None] * len(r.draft_tokens)
        assert len(thresholds) == len(r.draft_tokens)
        for p, bar, verdict in zip(r.p, thresholds, r.verdicts, strict=True):
            assert (p is None) == (bar == "") == (verdict == "unreached")
            if verdict == "accepted":
                assert p > float(bar)
    again = run_to_end(lm, RunRequest.build("medusa", params, PROMPTS[0], max_new_tokens=30, chat=False, seed=3))
    assert again.token_ids == trace.token_ids
    assert make_config("medusa", {}).acceptance == "exact"  # lossless stays the default


# ----------------------------------------------------------------------------- published formats, as released
def write_published_eagle1(lm, directory):
    """A randomly initialised EAGLE-1 head in the authors' format: config.json (one-layer Llama config) and
    pytorch_model.bin with fc.weight/bias and layers.0.* (no input_layernorm), for the tiny model."""
    config = lm.model.config
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    g = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    attention = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden)}
    state = {"fc.weight": rand(hidden, 2 * hidden), "fc.bias": rand(hidden),
             **{f"layers.0.self_attn.{name}_proj.weight": rand(*shape) for name, shape in attention.items()},
             "layers.0.mlp.gate_proj.weight": rand(inter, hidden), "layers.0.mlp.up_proj.weight": rand(inter, hidden),
             "layers.0.mlp.down_proj.weight": rand(hidden, inter),
             "layers.0.post_attention_layernorm.weight": torch.ones(hidden),
             "embed_tokens.weight": rand(config.vocab_size, hidden)}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps({**config.to_dict(), "num_hidden_layers": 1, "bias": True}))
    return directory


def write_published_medusa(lm, directory, heads=3, layers=1):
    from safetensors.torch import save_file

    hidden, vocab = lm.model.config.hidden_size, lm.model.config.vocab_size
    g = torch.Generator().manual_seed(6)
    state = {}
    for i in range(heads):
        for j in range(layers):
            state[f"{i}.{j}.linear.weight"] = torch.randn(hidden, hidden, generator=g) * 0.05
            state[f"{i}.{j}.linear.bias"] = torch.zeros(hidden)
        state[f"{i}.{layers}.weight"] = torch.randn(vocab, hidden, generator=g)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "medusa_lm_head.safetensors"))
    (directory / "config.json").write_text(json.dumps({"medusa_num_heads": heads, "medusa_num_layers": layers,
                                                        "hidden_size": hidden, "base_model_name_or_path": "tiny"}))
    return directory


def test_released_eagle1_and_medusa_heads_load_and_stay_lossless(tmp_path):
    lm = tiny_model(1, scale=8.0)
    eagle1 = write_published_eagle1(lm, tmp_path / "eagle1")
    medusa1 = write_published_medusa(lm, tmp_path / "medusa1", heads=3, layers=2)
    head = load_published(lm, str(eagle1), "eagle")
    assert head.fc.bias is not None and isinstance(head.body.norm, torch.nn.Identity)
    assert len(load_published(lm, str(medusa1), "medusa").blocks[0]) == 2
    for prompt in PROMPTS:
        greedy = run_to_end(lm, RunRequest.build("greedy", {}, prompt, max_new_tokens=24, chat=False))
        for name, params in (("eagle", {"drafter": str(eagle1)}),
                             ("eagle", {"drafter": str(eagle1), "tree": "dynamic"}),
                             ("medusa", {"drafter": str(medusa1)})):
            trace = run_to_end(lm, RunRequest.build(name, params, prompt, max_new_tokens=24, chat=False))
            assert trace.finished.status == "ok" and trace.token_ids == greedy.token_ids
    (tmp_path / "broken").mkdir()
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "broken" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="does not fit this model"):
        load_published(lm, str(tmp_path / "broken"), "eagle")


def test_self_distillation_data_and_its_features_match_teacher_forcing(tmp_path):
    """drafter-data: prompts of every kind (none of the benchmark's), greedy + sampled answers; the features and
    argmax read off the generation's own (left-padded, cached) passes equal a teacher-forced pass; a head trains
    on the file in batches, unrolled, with or without stored features."""
    from explorer.drafter_data import benchmark_prompts, load_sequences, make_prompts, self_distill
    from explorer.train_drafter import teacher_forced

    lm = tiny_model(0, scale=8.0)
    prompts = make_prompts(lm, count=16, batch=8, progress=False)
    assert len(prompts) >= 10 and not set(prompts) & benchmark_prompts()
    assert any(p.startswith("Write a") for p in prompts) and any("Python" in p for p in prompts)
    for features in (True, False):
        path = tmp_path / f"data{features}.npz"
        record = self_distill(lm, path, prompts=8, samples=1, max_new_tokens=12, batch=3, features=features,
                              progress=False)
        rows, first, stored = load_sequences(path)
        assert record == stored and len(rows) == record["sequences"] and record["answers_per_prompt"] == 2
        for (ids, f, a), start in list(zip(rows, first, strict=True))[:6]:
            assert 0 < start < len(ids) - 1  # a chat prompt, then at least two answer positions
            if features:
                reference = teacher_forced(lm, ids.tolist())
                assert torch.allclose(f.float(), reference.features, atol=2e-2)
                assert (a == reference.argmax).float().mean() > 0.95
        out = tmp_path / f"head{features}"
        record = train(lm, out, data=path, steps=6, batch=4, unroll=2, vocab=32, save_every=3, progress=False)
        assert record["steps"] == 6 and len(record["curve"][-1]["agreement_by_depth"]) == 2
        assert load_head(lm, out).draft_ids.numel() <= 32 + len(lm.eos_token_ids)
    both = train(lm, tmp_path / "both", data=f"{tmp_path / 'dataTrue.npz'},{tmp_path / 'dataFalse.npz'}", steps=2,
                 batch=2, vocab=32, progress=False)
    assert both["data"].count("prompts x 2 answers") == 2 and len(both["data_records"]) == 2
    from explorer.train_drafter import answer_sequences  # the no-file path's fresh answers share `generate`

    fresh = answer_sequences(lm, 3, max_new_tokens=6, batch=2)
    assert len(fresh) == 3 and all(0 < s.first < len(s.ids) and s.features.shape[0] == len(s.ids) for s in fresh)


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_a_released_eagle3_head_loads_matches_its_formula_and_stays_lossless(tmp_path):
    """A tiny random checkpoint in EAGLE-3's released format (config.json with draft_vocab_size; fc 3H -> H,
    midlayer.* with hidden_norm and 2H-wide q/k/v, norm, lm_head over the draft vocabulary, d2t): the loaded head's
    first draft scores equal the formula computed by hand (one position: attention is v then o), the draft ids
    follow d2t, and EAGLE drafting with it is token-identical to greedy (chain and dynamic tree)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    lm = tiny_model(3, layers=8, scale=8.0)
    target = lm.model.config
    hidden, vocab, draft = target.hidden_size, target.vocab_size, 40
    config = LlamaConfig(hidden_size=hidden, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=vocab, rms_norm_eps=1e-6, max_position_embeddings=512)
    head_dim, kv = hidden // 4, 2 * (hidden // 4)
    generator = torch.Generator().manual_seed(0)
    shapes = {"fc.weight": (hidden, 3 * hidden), "midlayer.self_attn.q_proj.weight": (hidden, 2 * hidden),
              "midlayer.self_attn.k_proj.weight": (kv, 2 * hidden),
              "midlayer.self_attn.v_proj.weight": (kv, 2 * hidden),
              "midlayer.self_attn.o_proj.weight": (hidden, hidden), "midlayer.mlp.gate_proj.weight": (96, hidden),
              "midlayer.mlp.up_proj.weight": (96, hidden), "midlayer.mlp.down_proj.weight": (hidden, 96),
              "lm_head.weight": (draft, hidden)}
    state = {k: torch.randn(*shape, generator=generator) * 0.2 for k, shape in shapes.items()}
    for norm in ("midlayer.input_layernorm", "midlayer.hidden_norm", "midlayer.post_attention_layernorm", "norm"):
        state[f"{norm}.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
    chosen = torch.randperm(vocab, generator=generator)[:draft].sort().values
    state["d2t"] = chosen - torch.arange(draft)  # target id = d + d2t[d], as released
    state["t2d"] = torch.zeros(vocab, dtype=torch.bool).index_fill_(0, chosen, True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(), "draft_vocab_size": draft,
                                                      "architectures": ["LlamaForCausalLMEagle3"]}))
    head = load_published(lm, str(tmp_path), "eagle")
    assert head.draft_ids.tolist() == chosen.tolist() and head.feature_layers == (2, 4, 5)

    ids = lm.encode_prompt("abc", chat=False)
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        stacked = torch.stack([h[0] for h in out.hidden_states])
        feature = head.feature(stacked)[:1]  # position 0
        embed = lm.model.get_input_embeddings()(torch.tensor([ids[1]]))
        got = head.logits(head.predict(embed[None], feature[None]), None)[0, 0]
        eps = 1e-6
        g = feature @ state["fc.weight"].T
        u = torch.cat([_rms(embed, state["midlayer.input_layernorm.weight"], eps),
                       _rms(g, state["midlayer.hidden_norm.weight"], eps)], -1)
        v = (u @ state["midlayer.self_attn.v_proj.weight"].T).view(2, head_dim).repeat_interleave(2, 0).reshape(1, -1)
        a = g + v @ state["midlayer.self_attn.o_proj.weight"].T
        m = _rms(a, state["midlayer.post_attention_layernorm.weight"], eps)
        a = a + (torch.nn.functional.silu(m @ state["midlayer.mlp.gate_proj.weight"].T)
                 * (m @ state["midlayer.mlp.up_proj.weight"].T)) @ state["midlayer.mlp.down_proj.weight"].T
        expected = _rms(a, state["norm.weight"], eps) @ state["lm_head.weight"].T
    assert torch.allclose(got, expected[0], atol=1e-4)

    for prompt in PROMPTS[:2]:
        greedy = run_to_end(lm, RunRequest.build("greedy", {}, prompt, max_new_tokens=24, chat=False))
        for params in ({}, {"tree": "dynamic", "tree_top_k": 3, "depth": 3, "budget": 8}):
            run = run_to_end(lm, RunRequest.build("eagle", {"drafter": str(tmp_path), **params}, prompt,
                                                  max_new_tokens=24, chat=False))
            assert run.token_ids == greedy.token_ids
            drafted = {t for r in run.rounds for t in r.draft_tokens}
            assert drafted and drafted <= set(chosen.tolist())

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file({**{k: v.contiguous() for k, v in state.items()}, "d2t": torch.full((draft,), vocab)},
              str(foreign / "model.safetensors"))
    (foreign / "config.json").write_text((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="d2t"):
        load_published(lm, str(foreign), "eagle")


def test_the_shipped_head_is_the_embedded_models_default_and_lossless(embedded):
    """assets/drafters holds a head for the embedded model: its manifest's sha256 matches the weights, it is
    found by the model's weights hash, an empty `drafter` uses it (and speculative's default 'auto' drafter), and
    drafting with it is exactly greedy."""
    from explorer.heads import SHIPPED, shipped_head

    directory = shipped_head(embedded, "eagle")
    assert directory is not None and directory.parent == SHIPPED
    manifest = json.loads((directory / CONFIG_FILE).read_text())
    assert manifest["sha256"] == hashlib.sha256((directory / HEAD_FILE).read_bytes()).hexdigest()
    assert manifest["target_weights_hash"] == embedded.info.weights_hash and manifest["training"]["command"]
    prompt = "Explain what a binary search does."
    greedy = run_to_end(embedded, RunRequest.build("greedy", {}, prompt, max_new_tokens=24))
    for params in ({}, {"tree": "dynamic"}):
        eagle = run_to_end(embedded, RunRequest.build("eagle", params, prompt, max_new_tokens=24))
        assert eagle.token_ids == greedy.token_ids and eagle.mean_accepted_tokens > 1
    speculative = run_to_end(embedded, RunRequest.build("speculative", {}, prompt, max_new_tokens=24))
    assert speculative.token_ids == greedy.token_ids and speculative.rounds[0].drafter == "EAGLE head"


# ------------------------------------------------------------------- faithful to the papers, round 3 (EAGLE)
class _TableHead:
    """A fake EAGLE head whose draft distributions we write by hand: the predicted feature of a node is the one-hot
    of its token (the fake embedding is the identity), and the scores of its children are row `token` of `table`
    (log-probabilities), so the head's top-k children of each node are known in advance."""

    def __init__(self, table):
        from transformers import LlamaConfig

        self.table = table  # (V, V)
        self.draft_ids = torch.arange(table.shape[0])
        self.body = type("Body", (), {"config": LlamaConfig(hidden_size=16, intermediate_size=16,
                                                            num_attention_heads=2, num_key_value_heads=2,
                                                            num_hidden_layers=1, vocab_size=1)})()

    def predict(self, embeds, features, cache=None, position_ids=None, attention_mask=None):
        return embeds

    def logits(self, predicted, lm_head_weight):
        return predicted @ self.table


def _table_drafter(rows, config):
    from types import SimpleNamespace

    from explorer.strategies.eagle_drafter import EagleDrafter

    vocab = 12
    table = torch.full((vocab, vocab), 1e-4)
    for token, children in rows.items():
        for child, p in children.items():
            table[token, child] = p
    table = (table / table.sum(-1, keepdim=True)).log()
    embedding = torch.nn.Embedding(vocab, vocab)
    embedding.weight.data = torch.eye(vocab)
    inner = SimpleNamespace(get_input_embeddings=lambda: embedding,
                            get_output_embeddings=lambda: SimpleNamespace(weight=torch.zeros(vocab, vocab)))
    model = SimpleNamespace(model=inner, device=torch.device("cpu"))
    return EagleDrafter(model, _TableHead(table), config, torch.Generator().manual_seed(0), config.dynamic_tree())


def test_eagle2_reranks_every_candidate_of_the_pool():
    """EAGLE-2 as its authors' code (cnets.py: topK_genrate) builds it: every frontier node adds its top-k children to
    the pool, the best k of them are expanded next, and the `budget` best of the WHOLE pool (k + (depth - 1) k^2
    candidates) by path probability are verified. Here k = 2, 3 levels: the pool holds 10 candidates; B's second
    child b2 (0.4 * 0.45 = 0.18) is not expanded but beats x2 (0.162) and y2, so it is among the 7 kept."""
    A, B, a1, a2, b1, b2, x1, x2, y1, y2 = range(1, 11)  # noqa: N806 - the nodes' names
    rows = {0: {A: 0.6, B: 0.4}, A: {a1: 0.9, a2: 0.1}, B: {b1: 0.55, b2: 0.45}, a1: {x1: 0.5, x2: 0.3, 11: 0.2},
            b1: {y1: 0.9, y2: 0.1}}
    config = make_config("eagle", {"tree": "dynamic", "tree_top_k": 2, "depth": 3, "budget": 7})
    predicted = torch.nn.functional.one_hot(torch.tensor([0]), 12).float()  # the root's distribution: row 0
    with torch.inference_mode():
        tree = _table_drafter(rows, config)._dynamic([5, 6], predicted)
    assert tree.tokens == [A, B, a1, b1, b2, x1, y1] and tree.parents == [-1, -1, 0, 1, 1, 2, 3]
    assert tree.details["pool"] == 2 + (3 - 1) * 2 * 2 == 10
    assert tree.draft_probs == pytest.approx([0.6, 0.4, 0.54, 0.22, 0.18, 0.27, 0.198], rel=1e-2)
    small = make_config("eagle", {"tree": "dynamic", "tree_top_k": 2, "depth": 3, "budget": 4})
    with torch.inference_mode():
        tree = _table_drafter(rows, small)._dynamic([5, 6], predicted)
    assert tree.tokens == [A, B, a1, x1] and tree.parents == [-1, -1, 0, 2]  # a chosen node's ancestors are in


def test_best_nodes_keeps_a_tree_under_ties():
    """Ties (a child as likely as its parent: q = 1) go to the node generated first, so the parent ranks first."""
    from explorer.strategies.eagle_drafter import best_nodes

    parents, scores = [-1, -1, 0, 2], [-0.5, -0.5, -0.5, -0.5]
    assert best_nodes(range(4), scores, 3) == [0, 1, 2]
    assert all(parents[n] in best_nodes(range(4), scores, k) or parents[n] < 0
               for k in range(1, 5) for n in best_nodes(range(4), scores, k))


def test_eagle_loss_trains_on_the_targets_soft_distribution():
    """EAGLE's classification term is CE against p = softmax(f_(j+1) W[V_d]^T), the frozen target LM head over the
    stored target feature (renormalised over V_d), not against the target's argmax: on a hand-built batch the loss
    equals SmoothL1 + w CE computed independently with torch's cross entropy on probability targets, and differs
    from the argmax version (still there as labels='hard')."""
    from explorer.heads import EagleHead
    from explorer.train_drafter import eagle_loss

    lm = tiny_model(0, scale=8.0)
    config = lm.model.config
    vocab, hidden, n = config.vocab_size, config.hidden_size, 7
    draft_ids = list(range(0, vocab, 2))  # V_d: the even ids
    head = EagleHead(config, draft_ids)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, n), generator=g)
    features = torch.randn(1, n, hidden, generator=g)
    argmax = torch.tensor([draft_ids[3 * i % len(draft_ids)] for i in range(n)])[None]  # inside V_d: all trained
    index_of = torch.full((vocab,), -100, dtype=torch.long)
    index_of[torch.tensor(draft_ids)] = torch.arange(len(draft_ids))
    batch = (ids, features, argmax, torch.ones(1, n, dtype=torch.bool), torch.zeros(1, dtype=torch.long))
    weight = lm.model.get_output_embeddings().weight.detach().float()
    with torch.no_grad():
        predicted = head.predict(lm.model.get_input_embeddings()(ids).float()[:, 1:], features[:, :-1])
        regression = torch.nn.functional.smooth_l1_loss(predicted, features[:, 1:])
        rows = weight[torch.tensor(draft_ids)]
        scores = predicted[0] @ rows.T
        p = torch.softmax(features[0, 1:] @ rows.T, dim=-1)
        soft = regression + 1.0 * torch.nn.functional.cross_entropy(scores, p)
        hard = regression + 1.0 * torch.nn.functional.cross_entropy(scores, index_of[argmax[0, 1:]])
        got = eagle_loss(head, lm, batch, index_of, weight, ce_weight=1.0)[0]
        assert abs(float(soft - hard)) > 0.01  # 600 times the tolerance below
        assert float(got) == pytest.approx(float(soft), rel=1e-5)
        assert float(eagle_loss(head, lm, batch, index_of, weight, ce_weight=1.0, labels="hard")[0]) == \
            pytest.approx(float(hard), rel=1e-5)
    with pytest.raises(ValueError, match="labels must be"):
        eagle_loss(head, lm, batch, index_of, weight, labels="argmax")


def test_feature_noise_follows_the_authors_uniform_scale():
    """The authors' AddUniformNoise (std 0.2): (U(0,1) - 0.5) * 0.2 * 512 / n, i.e. U(-0.1, 0.1) on a 512-position
    sequence and U(-0.2, 0.2) on a 256-position one."""
    from explorer.train_drafter import feature_noise

    noise = feature_noise(torch.zeros(2, 512, 64), torch.tensor([512, 256]), 0.1)
    for row, half_width in ((0, 0.1), (1, 0.2)):
        assert half_width * 0.99 < float(noise[row].abs().max()) <= half_width
        assert float(noise[row].std()) == pytest.approx(half_width / 3 ** 0.5, rel=0.02)  # uniform's std
        assert abs(float(noise[row].mean())) < 0.01 * half_width * 10


def test_a_released_eagle1_head_with_a_rotary_buffer_loads(tmp_path):
    """Checkpoints saved by an older transformers hold the rotary buffer `layers.0.self_attn.rotary_emb.inv_freq`:
    it is ignored, the weights load; a truly unknown key is still refused."""
    lm = tiny_model(1, scale=8.0)
    directory = write_published_eagle1(lm, tmp_path / "eagle1")
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    head_dim = lm.model.config.hidden_size // lm.model.config.num_attention_heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    torch.save({**state, "layers.0.self_attn.rotary_emb.inv_freq": inv_freq}, directory / "pytorch_model.bin")
    head = load_published(lm, str(directory), "eagle")
    assert torch.equal(head.fc.weight.float(), state["fc.weight"].to(head.fc.weight.dtype).float())
    unknown = write_published_eagle1(lm, tmp_path / "unknown")
    torch.save({**state, "layers.0.self_attn.mystery.weight": torch.zeros(3)}, unknown / "pytorch_model.bin")
    with pytest.raises(ValueError, match="unexpected body.layers.0.self_attn.mystery.weight"):
        load_published(lm, str(unknown), "eagle")
