"""Diverse Beam Search (Vijayakumar et al. 2016/2018, "Diverse Beam Search: Decoding Diverse Solutions from
Neural Sequence Models", arXiv:1610.02424, Algorithm 1 with Hamming diversity).

Notation: B beams split into G groups of B/G, lambda = diversity strength. At each step the groups expand in
order; group g scores its continuations with log p(v | beam) - lambda * (number of times v was chosen by
groups 1..g-1 at this step), then runs an ordinary beam step (see beam.BeamGroup). All groups share one
batched forward pass. With lambda = 0 every group is an independent beam search of width B/G.
Departures: each group's beam step, stop rule and length penalty are transformers' (beam_search.BeamGroup), not
the authors' Lua code's (no length penalty there, B/G candidates per group, each group's own top B/G returned);
the penalised scores accumulate into the beam scores, as in the authors' code and transformers, whereas the
paper's objective adds lambda * Delta to the current step only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import Checked, param
from explorer.strategies.base import register
from explorer.strategies.beam_search import EARLY_STOPPING, BeamGroup, beam_loop, check_beam_cost


@dataclass(frozen=True)
class DiverseBeamConfig(Checked):
    num_beams: int = param(4, "beams B in all", minimum=2, maximum=16, step=1)
    groups: int = param(2, "groups G (must divide B)", minimum=1, maximum=16, step=1)
    diversity: float = param(0.5, "Hamming diversity strength lambda (>= 0)", minimum=0.0, maximum=5.0, step=0.1)
    length_penalty: float = param(1.0, "score / length ** lp", minimum=-2.0, maximum=3.0, step=0.1)
    early_stopping: str = param("false", "stop rule per group: false, true, never", choices=EARLY_STOPPING)
    num_return: int = param(0, "size of the n-best list (0 = one per beam)", minimum=0, maximum=16, step=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_beams % self.groups:
            raise ValueError("groups must divide num_beams (e.g. 4 beams in 2 groups)")
        if self.num_return > self.num_beams:
            raise ValueError("num_return must be between 0 (one per beam) and num_beams")

    def check_cost(self, max_new_tokens: int) -> None:
        check_beam_cost(self.num_beams, max_new_tokens)


@register("diverse_beam", DiverseBeamConfig, "diverse beam search: G groups with a Hamming diversity penalty",
          needs_budget=True,
          family="search",
          paper="Vijayakumar et al. 2016, arXiv:1610.02424",
          reference_code="ashwinkalyan/dbs: dbs/beam_utils.lua: beam_utils.beam_search (add_diversity, beam_step)",
          departures=(
              "each group's beam step is transformers' (2 x B/G candidates, finished hypotheses kept aside, "
              "length penalty lp, default 1.0, early-stopping heuristic, n-best across groups by normalised "
              "score); the authors' code keeps B/G candidates, no length penalty, parks a beam that emits EOS "
              "at score -1000 and returns each group's top B/G by summed log-probability",
              "diversity penalties accumulate into the running beam score and the final ranking (as the "
              "authors' beam_step and transformers do); the paper's objective adds lambda * Delta to the "
              "current step's selection only",
              "the Hamming count uses only the previous groups' continuing beams at this step (as transformers); "
              "the authors' code also counts a beam of an earlier group that just emitted EOS",
          ))
def run(model: Any, prompt_ids: Sequence[int], config: DiverseBeamConfig, rng: torch.Generator, *,
        max_new_tokens: int) -> Iterator[Event]:
    width = config.num_beams // config.groups
    groups = [BeamGroup(width, model.eos_token_ids, len(prompt_ids), len(prompt_ids) + max_new_tokens,
                        config.length_penalty, config.early_stopping, group=g) for g in range(config.groups)]
    n_best = config.num_return or config.num_beams
    yield from beam_loop(model, prompt_ids, groups, max_new_tokens, n_best, config.diversity)
