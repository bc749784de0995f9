"""Layer-skip self-speculative decoding: the model with some of its layers skipped drafts for itself (Zhang et
al. 2024, "Draft & Verify", arXiv:2309.08168; CLaSp, Chen et al. 2025, "In-Context Layer Skip for
Self-Speculative Decoding", arXiv:2505.24196). Early exit after the first N layers is the special case
skip = {N, ..., L-1}.

Notation: L = number of layers, S = skipped set, M = |S|, gamma = draft length, p = target, q = the skipped
model, x*_l = the full model's hidden state entering layer l (x*_L: its final, normed state) at the last
verified token, f_l = decoder layer l.
The draft shares weights and the KV cache with the target (`cache="shared"`, as both papers do): the kept
layers read the K/V the full model cached for the context; the draft's own K/V are dropped before each
verification. `cache="separate"` (a named variant) gives the draft a cache of its own, built from the skipped
model's hidden states, and rebuilt after each skip-set change.

Skip-set search (`search`):
- "dp" (default; CLaSp's Algorithm 1): after every verification, dynamic programming over layers on the last
  verified token. g[0][0] = x*_0; for layer l and j skipped so far, g[l+1][j] is the better (by cosine
  similarity to x*_(l+1)) of f_l(g[l][j]) (run layer l, attending to the cached context at that layer) and
  g[l][j-1] (skip it); the skips compound through the layers. S is read back from g[L][M]. One batched call
  of each layer over the at most M + 1 states per search, re-run every `search_every` rounds (1: every
  verification, as in the paper).
- "rank" (a cheaper named mode): score each layer by the mean cosine similarity cos(x*_l, x*_(l+1)) of its
  input and output over the accepted positions and skip the M most similar layers (no compounding).
`skip` or `exit_after` fix S and turn the search off. Layer 0 is never skipped.

Authors' code: dilab-zju/self-speculative-decoding decoding.py (exact_self_speculative_generate,
self_speculative_sample) for Draft & Verify; CLaSp published no code we found. Departures: whole decoder layers
are skipped (Draft & Verify skips attention and MLP sublayers separately); the skip set comes from CLaSp's DP or the
"rank" mode, not Draft & Verify's offline Bayesian optimisation (searching.py); the draft length adapts (DraftLength:
doubles after full acceptance, accepted + 1 after a rejection) instead of Draft & Verify's adaptive draft-exiting
threshold on the draft's top probability; M = 4 and the middle-layers start are ours.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.models import decoder_layers, final_norm
from explorer.params import param
from explorer.strategies.base import register
from explorer.strategies.draft_models import ChainDraftConfig, ModelDrafter, layer_skip_view, parse_layers
from explorer.strategies.draft_verify import Verdict, draft_verify

SEARCHES = ("dp", "rank")
CACHES = ("shared", "separate")


@dataclass(frozen=True)
class SelfSpeculativeConfig(ChainDraftConfig):
    skip: str = param("", "layers to skip, e.g. '10-14,20' (0-based; overrides the two below)")
    exit_after: int = param(0, "early exit: keep only the first N layers (0 = off; overrides auto_skip)",
                            minimum=0, maximum=64, step=1)
    auto_skip: int = param(4, "otherwise: skip this many layers (M), searched from the hidden states", minimum=1,
                           maximum=64, step=1)
    search: str = param("dp", "dp: CLaSp's dynamic programming over layers; rank: skip the M layers that change "
                              "their input least", choices=SEARCHES)
    search_every: int = param(1, "rounds between skip-set searches", minimum=1, maximum=64, step=1)
    cache: str = param("shared", "shared: draft on the target's KV cache (the papers'); separate: a draft cache of "
                                 "its own", choices=CACHES)

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_layers(self.skip)


def most_skippable(hidden: torch.Tensor, count: int) -> set[int]:
    """Search "rank": the `count` layers (never the first or last) whose output is most similar to their input.
    `hidden`: (layers + 1, positions, hidden) with hidden[l] the input of layer l."""
    inputs, outputs = hidden[:-1].float(), hidden[1:].float()
    similarity = torch.nn.functional.cosine_similarity(inputs, outputs, dim=-1).mean(dim=-1)  # (layers,)
    similarity[0] = similarity[-1] = -float("inf")
    return set(torch.topk(similarity, min(count, len(similarity) - 2)).indices.tolist())


@torch.no_grad()
def clasp_search(run_layer: Any, final_norm: Any, target: torch.Tensor, count: int) -> set[int]:
    """Search "dp": CLaSp's dynamic programming. `target` `(L + 1, hidden)` holds x*_0..x*_L of one token;
    `run_layer(l, states (batch, hidden)) -> (batch, hidden)` applies layer l to candidate states; `final_norm`
    maps a last-layer output to x*_L's space. Returns the skipped set of size `count` (layer 0 always runs)."""
    layers = target.shape[0] - 1
    count = min(count, layers - 1)
    states = {0: target[0].float()}  # j skipped so far -> g[l][j]
    choices: list[dict[int, bool]] = []  # per layer: j -> whether g[l+1][j] skipped layer l
    for layer in range(layers):
        reference = target[layer + 1].float()
        keys = sorted(states)
        ran = run_layer(layer, torch.stack([states[j] for j in keys])).float()  # one batched call
        if layer == layers - 1:
            ran = final_norm(ran).float()
        ran_by_j = dict(zip(keys, ran, strict=True))
        left = layers - 1 - layer  # layers still to come
        new: dict[int, torch.Tensor] = {}
        choice: dict[int, bool] = {}
        for j in range(0, min(layer, count) + 1):
            if j + left < count:
                continue  # cannot reach `count` skips any more
            options: list[tuple[float, bool, torch.Tensor]] = []
            if j in ran_by_j:
                options.append((_cosine(ran_by_j[j], reference), False, ran_by_j[j]))
            if layer > 0 and j - 1 in states:
                skipped = states[j - 1] if layer < layers - 1 else final_norm(states[j - 1]).float()
                options.append((_cosine(skipped, reference), True, skipped))
            if options:
                _, skip, state = max(options, key=lambda option: option[0])
                new[j], choice[j] = state, skip
        states = new
        choices.append(choice)
    chosen: set[int] = set()
    j = count
    for layer in range(layers - 1, -1, -1):  # read the skips back from g[L][M]
        if choices[layer][j]:
            chosen.add(layer)
            j -= 1
    return chosen


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1))


def initial_skip(model: Any, config: SelfSpeculativeConfig) -> tuple[set[int], bool]:
    """The skipped set to start from, and whether to search for better ones."""
    total = len(decoder_layers(model.model))
    if config.skip.strip():
        return parse_layers(config.skip), False
    if config.exit_after:
        return set(range(config.exit_after, total)), False
    count = min(config.auto_skip, total - 1)  # start from the middle layers, then search
    first = max(1, (total - count) // 2)
    return set(range(first, first + count)), True


def prepare(model: Any, config: SelfSpeculativeConfig) -> None:
    layer_skip_view(model, initial_skip(model, config)[0])  # refuses sets this model cannot skip


class LayerSkipDrafter(ModelDrafter):
    """A ModelDrafter over a layer-skip view of the target; with a searched skip set it asks the engine for the
    verification pass's hidden states and re-searches every `search_every` rounds."""

    def __init__(self, model: Any, config: SelfSpeculativeConfig, rng: torch.Generator):
        skip, searching = initial_skip(model, config)
        super().__init__(layer_skip_view(model, skip), config, rng, name="layer skip",
                         shared=config.cache == "shared")
        self.target, self.skip, self.rounds, self.config = model, skip, 0, config
        self.wants_hidden_states = searching

    def round_details(self) -> dict[str, float | str]:
        return {"skipped_layers": ",".join(str(i) for i in sorted(self.skip)), "skip_count": float(len(self.skip))}

    def observe(self, verdict: Verdict) -> None:
        super().observe(verdict)
        self.rounds += 1
        due = self.rounds % self.config.search_every == 0
        if not (self.wants_hidden_states and verdict.hidden_states is not None and due):
            return
        count = min(self.config.auto_skip, verdict.hidden_states.shape[0] - 2)
        if self.config.search == "dp":
            last = verdict.accepted_count  # the last verified token: its K/V are cached, at the cache's end
            session = self.cache.target  # the target's session: its cache ends at the last verified token
            runner = session.layer_runner(session.length - 1)
            chosen = clasp_search(runner, final_norm(self.target.model), verdict.hidden_states[:, last], count)
        else:
            accepted = verdict.hidden_states[:, : verdict.accepted_count + 1]  # positions the target committed
            chosen = most_skippable(accepted, count)
        if chosen != self.skip:
            self.skip = chosen
            self.reset(layer_skip_view(self.target, chosen))


@register("self_speculative", SelfSpeculativeConfig, "layer-skip self-speculation (CLaSp's skip-set search)",
          prepare=prepare,
          family="speed-up: draft-verify",
          paper="Draft & Verify, Zhang et al. 2024, arXiv:2309.08168; CLaSp, Chen et al. 2025, arXiv:2505.24196",
          reference_code=("dilab-zju/self-speculative-decoding: decoding.py: exact_self_speculative_generate, "
                          "self_speculative_sample (Draft & Verify); CLaSp: none public"),
          departures=(
              "Skips whole decoder layers; Draft & Verify skips attention and MLP sublayers separately.",
              "The skip set comes from CLaSp's DP (default) or the 'rank' mode (ours), not Draft & Verify's offline "
              "Bayesian optimisation (searching.py).",
              "The draft length adapts (doubles after full acceptance, accepted + 1 after a rejection); Draft & "
              "Verify stops drafting when the draft's top probability falls below an adaptively tuned threshold.",
              "M = 4 skipped layers by default, starting from the middle layers before the first search, and layer 0 "
              "never skipped: our choices.",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: SelfSpeculativeConfig, rng: torch.Generator
        ) -> Iterator[Event]:
    yield from draft_verify(model, prompt_ids, LayerSkipDrafter(model, config, rng), config, rng)
