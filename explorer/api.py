"""The public API for your own decoding method: everything a plugin needs, and nothing else.

A plugin is a Python file or module that imports from here and registers what it adds when it is imported
(explorer/plugins.py loads it; README, "Your own method"):

- a strategy: a frozen config subclassing `Checked` (or `SamplingFilters`, `SpeculativeConfig`,
  `UnmaskingConfig`) whose fields are `param(default, help, minimum=, maximum=, choices=)`, and
  `@register(name, Config, summary)` on `run(model, prompt_ids, config, rng) -> Iterator[Event]`. One token per
  forward pass: `autoregressive(model, prompt_ids, choose)` with `choose(logits, context) -> Choice`; other
  loops commit each token with `commit_token`.
- a drafter: subclass `Drafter` (`propose(context) -> DraftTree`) and run it with
  `draft_verify(model, prompt_ids, drafter, config, rng)`; an acceptance rule of your own subclasses `NodeRule`
  (`judge(...) -> Judgement`, writing into the `Walk`) or `Acceptance`, passed as `draft_verify(...,
  acceptance=...)`. `GreedyMatch` and `RejectionSampling` are the exact rules.
- a diffusion schedule: a `Schedule` subclass (`decide(StepView) -> Decision`, `block_end`, `counts`,
  `recompute`) and `register_diffusion(name, Config, summary, paper=..., schedule=...)`.
- a logits processor of your own for the `logits_processor` lane: `register_logits_processor(cls)` on a subclass
  of transformers' `LogitsProcessor` (named "module.ClassName" in the lane's `processor` parameter).
- a view: `register_view(View(name, tab, label, render))`, `render(traces, lane) -> plotly Figure` over `Trace`s
  (`pick` chooses the lane a per-lane view draws); `empty_figure(note)` where no lane holds its data (the app then
  knows it has nothing to show), `base_layout` and `lane_color` for the app's theme.

The events a strategy yields are the frozen dataclasses re-exported below (`Event` is their union). This module is
versioned: `__version__` changes with its names (CHANGELOG.md), and a test pins them; what is not here is
internal and may change without notice.
"""

from __future__ import annotations

from explorer.events import (
    EVENT_TYPES,
    AttentionStep,
    BeamResult,
    BeamStep,
    CacheDrift,
    CandidateStep,
    Detail,
    DraftRound,
    EngineRecord,
    Event,
    ExtractSpans,
    FinishRace,
    LatticeResult,
    LensStep,
    MbrResult,
    PoolUpdate,
    QualityProbe,
    RunFinished,
    RunStarted,
    SuperposedResult,
    SuperposedStep,
    TokenStep,
    TrialBranch,
    UnmaskStep,
)
from explorer.params import Checked, param
from explorer.sampling import SamplingFilters
from explorer.strategies.acceptance import (
    Acceptance,
    DraftTree,
    GreedyMatch,
    Judgement,
    NodeRule,
    RejectionSampling,
    Verdict,
    Walk,
)
from explorer.strategies.base import Choice, autoregressive, commit_token, register
from explorer.strategies.draft_verify import Drafter, SpeculativeConfig, draft_verify
from explorer.strategies.logits_processor import register_logits_processor
from explorer.strategies.unmasking import Decision, Schedule, StepView, UnmaskingConfig, register_diffusion
from explorer.trace import Trace
from viz.catalog import View, pick, register_view
from viz.theme import base_layout, empty_figure, lane_color

__version__ = "1.2"

__all__ = [
    # registering
    "register", "register_diffusion", "register_view", "register_logits_processor",
    # configs
    "param", "Checked", "SamplingFilters", "SpeculativeConfig", "UnmaskingConfig",
    # one token per pass
    "Choice", "commit_token", "autoregressive",
    # draft and verify
    "Drafter", "DraftTree", "Verdict", "draft_verify",
    "Acceptance", "NodeRule", "Judgement", "Walk", "GreedyMatch", "RejectionSampling",
    # diffusion
    "Schedule", "StepView", "Decision",
    # events
    "Event", "Detail", "EVENT_TYPES", "RunStarted", "TokenStep", "RunFinished", "DraftRound", "BeamStep",
    "BeamResult", "CandidateStep", "TrialBranch", "PoolUpdate", "LensStep", "AttentionStep", "UnmaskStep",
    "CacheDrift", "MbrResult", "FinishRace", "ExtractSpans", "LatticeResult", "SuperposedStep", "SuperposedResult",
    "EngineRecord", "QualityProbe",
    # views
    "View", "Trace", "pick", "empty_figure", "base_layout", "lane_color",
]
