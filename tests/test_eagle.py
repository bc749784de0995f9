"""Trained draft heads (issue 15, first part): training on a tiny model lowers the loss and raises agreement,
the saved head loads (fp16 + manifest), EAGLE drafting is token-identical to greedy under the greedy rule and
exact under the sampling rule (q is zero outside the draft vocabulary)."""

import hashlib
import json

import pytest
import torch

from explorer.events import DraftRound
from explorer.heads import CONFIG_FILE, HEAD_FILE, load_head, load_published
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
