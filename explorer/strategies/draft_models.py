"""Plumbing shared by the drafters that run a model (a separate draft model, or the target with layers
skipped): loading a draft model, the draft's KV cache (its own, kept in step with the committed context, or
the target's own cache for a draft that shares the target's weights), layer-skip views of the target, and the
chain drafter they all use. Strategies import this module; it imports no strategy.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.draft_source import EAGLE_HEAD, MODEL, TARGET, DraftSource
from explorer.models import MODEL_CACHE, check_same_vocabulary, decoder_layers, layer_path, same_tokenizer
from explorer.params import param
from explorer.strategies.draft_verify import Drafter, DraftLength, DraftTree, SpeculativeConfig, Verdict


def middle_layers(total: int) -> set[int]:
    """The middle quarter of `total` layers (at least one; never layer 0): the default layer-skip set."""
    count = max(1, total // 4)
    first = max(1, (total - count) // 2)
    return set(range(first, min(first + count, total)))


@dataclass(frozen=True)
class ChainDraftConfig(SpeculativeConfig):
    """Fields of a model that drafts a chain of up to gamma tokens, one draft pass each."""

    draft_length: int = param(4, "maximum draft length gamma", minimum=1, maximum=16, step=1)
    adaptive: bool = param(True, "grow gamma after full acceptance, shrink it after a rejection")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def load_draft_model(model: Any, draft_model: str, *, any_tokenizer: bool = False) -> Any:
    """The drafting model for a run: the target itself ('target'), the target with its middle layers skipped
    ('layer-skip'), or a model sharing its vocabulary (with `any_tokenizer`, any causal LM: its drafts are then
    re-tokenised, see UniversalDrafter)."""
    source = DraftSource.parse(draft_model)
    if source.kind == TARGET:
        return model.for_run()
    if source.kind == EAGLE_HEAD:
        raise ValueError(f"'{EAGLE_HEAD}' drafts in the speculative and eagle strategies only, not as a draft model")
    if source.kind != MODEL:  # layer-skip, auto: no head drafts here, the layer-skip view is the best built in
        return layer_skip_view(model, middle_layers(len(decoder_layers(model.model))))
    draft = MODEL_CACHE.get(source.name, dtype=model.info.dtype, device=model.info.device).for_run()
    if not any_tokenizer:
        check_same_vocabulary(model, draft)
    return draft


def same_vocabulary(target: Any, draft: Any) -> bool:
    """Whether the draft's token ids are the target's (one vocabulary, the same merges)."""
    return same_tokenizer(target, draft)


def sync_cache(session: Any, cached: list[int], context: Sequence[int]) -> torch.Tensor:
    """Bring a draft's KV cache (holding the tokens `cached`) to the committed context: keep the common prefix,
    run the rest, and return the draft's next-token logits `(vocab,)`. `cached` becomes the context."""
    keep = min(common_prefix(cached, context), len(context) - 1)
    session.crop(keep)
    logits = session.forward(list(context[keep:]), all_logits=False).logits[-1]
    cached[:] = context
    return logits


def shares_weights(target: Any, draft: Any) -> bool:
    """Whether `draft` runs the target's own layers (the target itself or a layer-skip view of it)."""
    ours = {id(layer) for layer in decoder_layers(target.model)}
    return (draft.model.get_input_embeddings() is target.model.get_input_embeddings()
            and all(id(layer) in ours for layer in decoder_layers(draft.model)))


class DraftCache:
    """Where a model drafter keeps its KV cache.

    Own cache (a separate draft model): a cache of the draft's own, kept in step with the committed context
    by `sync_cache`; chain drafts stay in it (accepted ones are reused next round).
    Shared (a draft that runs the target's own layers, as Draft & Verify and CLaSp draft): the draft runs on
    the target's cache, so its kept layers read the K/V the full model computed for the context (a separate
    cache would hold K/V computed from the skipped model's hidden states). Each round it runs the last
    committed token and its drafts on top, writing K/V for its own layers only, and `finish` drops them before
    the target verifies."""

    def __init__(self, lm: Any, shared: bool):
        self.lm, self.shared = lm, shared
        self.session = None if shared else lm.session()
        self.target: Any = None
        self.cached: list[int] = []  # own cache: the tokens in it
        self.base = 0

    def bind(self, target_session: Any) -> None:
        self.target = target_session

    def start(self, context: Sequence[int]) -> torch.Tensor:
        """Bring the cache to `context`; return the draft's next-token logits `(vocab,)`. The draft's cache then
        holds len(context) positions."""
        if not self.shared:
            return sync_cache(self.session, self.cached, context)
        if self.target is None:
            raise RuntimeError("a shared draft cache needs bind(target session) before the first round")
        self.base = self.target.length  # every committed token but the last
        self.session = self.target.view(self.lm)
        return self.session.forward([context[-1]], all_logits=False).logits[-1]

    def finish(self) -> None:
        """After drafting: a shared cache drops every position it wrote; an own cache drops a tree's nodes (a
        chain's tokens stay, listed in `cached`)."""
        self.session.crop(self.base if self.shared else len(self.cached))


def draft_cache(target: Any, draft: Any) -> DraftCache:
    return DraftCache(draft, shared=shares_weights(target, draft))


def parse_layers(text: str) -> set[int]:
    """'3,5-7' -> {3, 5, 6, 7}."""
    layers: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                if last < first:
                    raise ValueError
                layers.update(range(first, last + 1))
            else:
                layers.add(int(part))
        except ValueError:
            raise ValueError(f"skip must list layers like '10-14,20', got {part!r}") from None
    return layers


def layer_skip_view(lm: Any, skip: set[int]) -> Any:
    """A LanguageModel sharing the weights of `lm` whose decoder runs every layer but those in `skip`: the
    modules on the path to the layers are shallow copies (own module tables, shared parameters)."""
    path = layer_path(lm.model).split(".")
    layers = decoder_layers(lm.model)
    total = len(layers)
    bad = sorted(i for i in skip if not 0 < i < total)
    if bad:
        raise ValueError(f"cannot skip layers {bad}: this model has layers 0-{total - 1} and layer 0 always runs")
    kept = torch.nn.ModuleList(layer for i, layer in enumerate(layers) if i not in skip)
    config = lm.model.config
    types = getattr(config, "layer_types", None)
    view_config = None
    if types is not None and len(set(types)) > 1:  # Gemma 3 reads layer i's type from config.layer_types[i]
        view_config = copy.copy(config)
        view_config.layer_types = [t for i, t in enumerate(types) if i not in skip]

    def rebuilt(module: torch.nn.Module, names: list[str]) -> torch.nn.Module:
        copy_ = copy.copy(module)  # shallow: shares parameters, but gets its own module table
        copy_._modules = dict(module._modules)
        if view_config is not None and getattr(module, "config", None) is config:
            copy_.config = view_config
        copy_._modules[names[0]] = kept if len(names) == 1 else rebuilt(module._modules[names[0]], names[1:])
        return copy_

    label = ",".join(str(i) for i in sorted(skip))
    info = dataclasses.replace(lm.info, model_id=f"{lm.info.model_id} skipping [{label}]")
    return dataclasses.replace(lm, model=rebuilt(lm.model, path), info=info, forward_passes=0)


class ModelDrafter(Drafter):
    """Drafts a chain autoregressively with any language model that has its own KV cache, kept in sync with
    the committed context: argmax under the greedy rule, a draw from the filtered q under the sampling rule.
    With `fallback_threshold` > 0, drafting stops early when the draft's top probability falls below it."""

    def __init__(self, lm: Any, config: ChainDraftConfig, rng: torch.Generator, name: str,
                 fallback_threshold: float = 0.0, *, shared: bool = False):
        self.lm, self.config, self.rng, self.name = lm, config, rng, name
        self.fallback_threshold = fallback_threshold
        self.length = DraftLength(config.draft_length, config.adaptive)
        self.cache = DraftCache(lm, shared)
        self._drafted = 0

    def bind(self, target_session: Any) -> None:
        self.cache.bind(target_session)

    def reset(self, lm: Any) -> None:
        """Draft with another model (e.g. another layer-skip view) from the next round on."""
        target = self.cache.target
        self.lm, self.cache = lm, DraftCache(lm, self.cache.shared)
        self.cache.bind(target)

    def propose(self, context: Sequence[int]) -> DraftTree:
        gamma = self.length.current
        passes = self.lm.forward_passes
        logits = self.cache.start(context)  # (vocab,)
        tokens: list[int] = []
        draft_probs: list[float] = []
        rows: list[torch.Tensor] = []
        fell_back = 0.0
        sampling = self.config.rule == "sampling"
        for i in range(gamma):
            q = self.config.draft_distribution(logits, [*context, *tokens])
            if self.fallback_threshold and float(q.max()) < self.fallback_threshold:
                fell_back = 1.0  # the draft is unsure: hand the step to the target
                break
            token = int(torch.multinomial(q, 1, generator=self.rng)) if sampling else int(q.argmax())
            tokens.append(token)
            draft_probs.append(float(q[token]))
            rows.append(q)
            if i + 1 < gamma:
                logits = self.cache.session.forward([token]).logits[-1]
                self.cache.cached.append(token)
        self.cache.finish()
        self._drafted = len(tokens)
        q_dists = torch.stack(rows) if sampling and rows else None
        return DraftTree.chain(tokens, draft_probs, q_dists, gamma=float(gamma), fallback=fell_back,
                               draft_forward_passes=float(self.lm.forward_passes - passes))

    def observe(self, verdict: Verdict) -> None:
        self.length.update(verdict, self._drafted)


class UniversalDrafter(Drafter):
    """A draft model with a tokenizer of its own: universal assisted decoding (Timor et al. 2025, "Accelerating
    LLM Inference with Lossless Speculative Decoding Algorithms for Heterogeneous Vocabularies", arXiv:2502.05202;
    transformers' `assistant_tokenizer`). Each round:
    1. the committed context, decoded to text, is encoded with the draft's tokenizer (the draft's cache keeps the
       common prefix of those ids);
    2. the draft proposes gamma tokens of its own (argmax, or a draw under the sampling rule);
    3. their text is re-encoded with the target's tokenizer after a look-behind of the last LOOKBEHIND committed
       target tokens; the target tokens past the look-behind are the draft. If the look-behind does not
       re-encode to itself (a token boundary moved), nothing is drafted this round.
    The drafted target tokens are a deterministic function of the draft's own randomness, so they are verified
    as point masses: token-identical to greedy under the greedy rule, exactly p under the sampling rule."""

    LOOKBEHIND = 8

    def __init__(self, target: Any, draft: Any, config: ChainDraftConfig, rng: torch.Generator):
        self.target, self.lm, self.config, self.rng = target, draft, config, rng
        self.name = f"draft model {draft.info.model_id} (its own tokenizer)"
        self.length = DraftLength(config.draft_length, config.adaptive)
        self.session = draft.session()
        self.cached: list[int] = []
        self._drafted = 0
        self._details: dict[str, float | str] = {}

    def propose(self, context: Sequence[int]) -> DraftTree:
        target_tok, draft_tok = self.target.tokenizer, self.lm.tokenizer
        gamma = self.length.current
        passes = self.lm.forward_passes
        draft_context = draft_tok(target_tok.decode(list(context), skip_special_tokens=False),
                                  add_special_tokens=False)["input_ids"]  # 1.
        self._drafted, self._details = 0, {}
        if not draft_context:
            return DraftTree()
        logits = sync_cache(self.session, self.cached, draft_context)
        sampling = self.config.rule == "sampling"
        drafted: list[int] = []
        for i in range(gamma):  # 2.
            if sampling:
                q = torch.softmax(self.config.apply(logits, [*draft_context, *drafted]), dim=-1)
                token = int(torch.multinomial(q, 1, generator=self.rng))
            else:
                token = int(logits.argmax())
            drafted.append(token)
            if i + 1 < gamma:
                logits = self.session.forward([token]).logits[-1]
                self.cached.append(token)
        prefix = draft_tok.decode(draft_context, skip_special_tokens=False)
        full = draft_tok.decode([*draft_context, *drafted], skip_special_tokens=False)
        proposal: list[int] = []
        new_text = full[len(prefix):] if full.startswith(prefix) else ""
        if new_text:  # 3.
            tail = list(context[-self.LOOKBEHIND:])
            ids = target_tok(target_tok.decode(tail, skip_special_tokens=False) + new_text,
                             add_special_tokens=False)["input_ids"]
            if ids[:len(tail)] == tail:
                proposal = ids[len(tail):][: 2 * gamma]
        self._drafted = len(proposal)
        self._details = {"draft_text": new_text, "draft_model_tokens": float(len(drafted)),
                         "target_tokens": float(len(proposal))}
        return DraftTree.chain(proposal, gamma=float(gamma),
                               draft_forward_passes=float(self.lm.forward_passes - passes))

    def round_details(self) -> dict[str, float | str]:
        return dict(self._details)

    def observe(self, verdict: Verdict) -> None:
        self.length.update(verdict, self._drafted)


def early_exit_prepare(model: Any, config: Any) -> None:
    """The `prepare` of early-exit drafters: the model needs a layer to exit after and one to skip."""
    if len(decoder_layers(model.model)) < 2:
        raise ValueError("early-exit drafting needs a model with at least 2 layers")


def early_exit_layers(total: int, count: int) -> list[int]:
    """The layers an early exit after `count` layers runs: the first `count` (at least one, at most `total`)."""
    return list(range(max(1, min(count, total))))


def early_exit_view(lm: Any, kept: int) -> Any:
    """The target cut after its first `kept` layers (then its final norm and LM head): an early-exit draft."""
    total = len(decoder_layers(lm.model))
    return layer_skip_view(lm, set(range(total)) - set(early_exit_layers(total, kept)))


class EarlyExitDrafter(Drafter):
    """Drafts a chain with shallow views of the target on the target's own cache: the i-th draft token from a
    pass through `depths()[i]` layers, which ones `kept_layers(count)` says (by default the first `count`: an early
    exit; D^3 keeps the first and the last ones). Each token's layers must be among the previous token's, so that
    every pass finds the K/V it attends to in the layers it runs (the pass before it ran them); the layers a draft
    skips have no K/V for the draft positions, and the verification pass, which runs every layer from the last
    committed token on, writes them. Drafting stops early when the draft's top probability is below `confidence`
    (0: never; the first token is always drafted). Subclasses choose `depths()` per round."""

    wants_hidden_states = False

    def __init__(self, model: Any, config: ChainDraftConfig, rng: torch.Generator, confidence: float = 0.0):
        self.model, self.config, self.rng, self.confidence = model, config, rng, confidence
        self.total = len(decoder_layers(model.model))
        self.target: Any = None
        self.views: dict[int, Any] = {}
        self.drafted_depths: list[int] = []

    def bind(self, target_session: Any) -> None:
        self.target = target_session

    def kept_layers(self, count: int) -> list[int]:
        """The layers (indices, ascending, layer 0 first) a pass that keeps `count` of them runs."""
        return early_exit_layers(self.total, count)

    def view(self, count: int) -> Any:
        if count not in self.views:
            skipped = set(range(self.total)) - set(self.kept_layers(count))
            self.views[count] = layer_skip_view(self.model, skipped)
        return self.views[count]

    def depths(self) -> list[int]:
        """Layers kept for each draft token of this round (non-increasing, each in [1, L])."""
        raise NotImplementedError

    def propose(self, context: Sequence[int]) -> DraftTree:
        depths = self.depths()
        layer_sets = [set(self.kept_layers(count)) for count in depths]
        if any(not later <= earlier for earlier, later in zip(layer_sets, layer_sets[1:], strict=False)):
            raise ValueError("each draft token must run a subset of the layers the token before it ran: the depths "
                             "must not increase along a draft")
        base = self.target.length  # every committed token but the last
        sampling = self.config.rule == "sampling"
        tokens: list[int] = []
        draft_probs: list[float] = []
        rows: list[torch.Tensor] = []
        passes = 0
        inputs = [context[-1]]
        for i, count in enumerate(depths):
            session = self.target.view(self.view(count), length=base + i)
            logits = session.forward(inputs, all_logits=False).logits[-1]
            passes += 1
            q = self.config.draft_distribution(logits, [*context, *tokens])
            if self.confidence and tokens and float(q.max()) < self.confidence:
                break  # the exit is unsure: stop drafting this round (after one token, so each round verifies)
            token = int(torch.multinomial(q, 1, generator=self.rng)) if sampling else int(q.argmax())
            tokens.append(token)
            draft_probs.append(float(q[token]))
            rows.append(q)
            inputs = [token]
        if passes:  # drop every position the drafts wrote (the first pass's layers hold every later one's)
            self.target.view(self.view(depths[0]), length=base + passes).crop(base)
        self.drafted_depths = depths[: len(tokens)]
        q_dists = torch.stack(rows) if sampling and rows else None
        return DraftTree.chain(tokens, draft_probs, q_dists, draft_forward_passes=float(passes),
                               draft_layers=float(sum(depths[:passes])))
