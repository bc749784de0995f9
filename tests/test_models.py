"""The model adapter: KV cache, rollback, tree attention masks, loading errors."""

import pytest
import torch

from explorer.models import ancestor_mask, check_same_vocabulary, load_model
from explorer.testing import tiny_model
from explorer.trees import tree_depths

PREFIX = [5, 40, 41, 42, 17, 23]


def fresh_logits(lm, tokens):
    return lm.session().forward(tokens).logits


def test_incremental_forward_equals_one_pass(tiny):
    whole = fresh_logits(tiny, PREFIX + [50, 51, 52])
    session = tiny.session()
    session.forward(PREFIX)
    stepped = torch.cat([session.forward([t]).logits for t in [50, 51, 52]])
    torch.testing.assert_close(stepped, whole[-3:], atol=1e-5, rtol=1e-5)


def test_crop_rolls_back_to_a_fresh_state(tiny):
    session = tiny.session()
    session.forward(PREFIX)
    session.forward([60, 61, 62, 63])  # a rejected draft
    session.crop(len(PREFIX))
    assert session.length == len(PREFIX)
    after = session.forward([70, 71]).logits
    torch.testing.assert_close(after, fresh_logits(tiny, PREFIX + [70, 71])[-2:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot crop"):
        session.crop(100)


def test_tree_logits_equal_each_root_to_node_path(tiny):
    #        node: 0  1  2  3  4  5  6
    parents = [-1, 0, 0, 1, -1, 4, 3]
    tokens = [30, 31, 32, 33, 34, 35, 36]
    session = tiny.session()
    session.forward(PREFIX)
    tree_logits = session.forward(tokens, parents=parents).logits
    for node in range(len(tokens)):
        path, cursor = [], node
        while cursor >= 0:
            path.append(tokens[cursor])
            cursor = parents[cursor]
        alone = fresh_logits(tiny, PREFIX + path[::-1])[-1]
        torch.testing.assert_close(tree_logits[node], alone, atol=1e-4, rtol=1e-4)


def test_tree_then_crop_then_continue(tiny):
    session = tiny.session()
    session.forward(PREFIX)
    session.forward([30, 31, 32], parents=[-1, -1, 1])
    session.crop(len(PREFIX))
    torch.testing.assert_close(session.forward([9]).logits, fresh_logits(tiny, PREFIX + [9])[-1:], atol=1e-5, rtol=1e-5)


def test_ancestor_mask_and_depths():
    parents = [-1, 0, 0, 1, -1]
    assert tree_depths(parents) == [0, 1, 1, 2, 0]
    mask = ancestor_mask(parents)
    assert mask[3].tolist() == [True, True, False, True, False]
    assert mask[4].tolist() == [False, False, False, False, True]
    with pytest.raises(ValueError, match="parents must precede"):
        tree_depths([-1, 2, 0])


def test_forward_pass_counter_is_per_run(tiny):
    run_a, run_b = tiny.for_run(), tiny.for_run()
    session_a, session_b = run_a.session(), run_b.session()
    session_a.forward(PREFIX)
    session_b.forward(PREFIX)
    session_a.forward([1])
    assert (run_a.forward_passes, run_b.forward_passes) == (2, 1)
    assert run_a.model is tiny.model


def test_vocabulary_check():
    a, b = tiny_model(0), tiny_model(1)
    check_same_vocabulary(a, b)  # same tokenizer, different weights: fine
    b.tokenizer.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="different vocabularies"):
        check_same_vocabulary(a, b)


def test_load_local_directory(tiny_dir, tiny):
    lm = load_model(str(tiny_dir), device="cpu")
    assert lm.info.model_id == str(tiny_dir) and lm.info.weights_hash.startswith("files:")
    torch.testing.assert_close(fresh_logits(lm, PREFIX), fresh_logits(tiny, PREFIX))


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="could not be loaded"):
        load_model("no-such-org/no-such-model-xyz", device="cpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(tmp_path), dtype="float8", device="cpu")


def test_chat_template_and_empty_prompt(tiny):
    plain = tiny.encode_prompt("hi")
    chat = tiny.encode_prompt("hi", chat=True, system_prompt="be brief")
    assert len(chat) > len(plain) and tiny.decode(chat).count("hi") == 1
    with pytest.raises(ValueError, match="prompt is empty"):
        tiny.encode_prompt("   ")


def test_tree_grown_level_by_level_equals_each_path(tiny):
    tokens = [30, 31, 32, 33, 34, 35]
    parents = [-1, -1, 0, 0, 1, 2]  # two levels, then a third
    session = tiny.session()
    session.forward(PREFIX)
    base = session.length
    first = session.forward(tokens[:2], parents=parents[:2], tree_base=base).logits
    second = session.forward(tokens[2:5], parents=parents[:5], tree_base=base).logits
    third = session.forward(tokens[5:], parents=parents, tree_base=base).logits
    rows = torch.cat([first, second, third])
    for node in range(len(tokens)):
        path, cursor = [], node
        while cursor >= 0:
            path.append(tokens[cursor])
            cursor = parents[cursor]
        torch.testing.assert_close(rows[node], fresh_logits(tiny, PREFIX + path[::-1])[-1], atol=1e-4, rtol=1e-4)
    session.keep([*range(base), base + 0, base + 2, base + 5])  # compact to the path 30 -> 32 -> 35
    torch.testing.assert_close(session.forward([9]).logits, fresh_logits(tiny, PREFIX + [30, 32, 35, 9])[-1:],
                               atol=1e-4, rtol=1e-4)


def test_same_vocabulary_with_other_merges_is_another_tokenizer():
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from explorer.models import same_tokenizer

    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4}

    def bpe(merges):
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=merges)))

    first, second = bpe([("a", "b")]), bpe([("b", "c")])
    assert first.get_vocab() == second.get_vocab()
    assert first("abc")["input_ids"] != second("abc")["input_ids"]  # the same text, other tokens
    one, other = SimpleNamespace(tokenizer=first), SimpleNamespace(tokenizer=second)
    assert same_tokenizer(one, SimpleNamespace(tokenizer=bpe([("a", "b")])))
    assert not same_tokenizer(one, other)
