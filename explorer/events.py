"""Typed trace events: frozen dataclasses holding plain Python values only (no tensors past the engine).

Every event kind has a unique `kind` string; `to_dict` / `from_dict` turn events into plain dicts and back,
which is all that the store and exports need: a new event kind needs no change there.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

STATUS_OK, STATUS_FAILED, STATUS_CANCELLED, STATUS_RUNNING = "ok", "failed", "cancelled", "running"
STATUS_STOPPED, STATUS_INTERRUPTED = "stopped", "interrupted"  # a limit stopped it; its process died
STATUSES = (STATUS_OK, STATUS_FAILED, STATUS_CANCELLED, STATUS_RUNNING, STATUS_STOPPED, STATUS_INTERRUPTED)
RUN_ID = re.compile(r"[0-9a-f]{12}")  # what the runner generates: safe in file names and URLs


# A strategy's own per-step value: a plain JSON scalar (a number, a flag, a label, null) or a flat list of them, so a
# boolean stays a boolean and a set stays a list; nothing nested (a hostile bundle cannot hide a deep tree here).
Scalar = float | int | bool | str | None
Detail = Scalar | list[Scalar]

@dataclass(frozen=True)
class RunStarted:
    """Everything needed to reproduce the run."""

    kind: ClassVar[str] = "run_started"
    run_id: str
    strategy: str
    config: dict[str, Any]
    model_id: str
    weights_hash: str
    dtype: str
    device: str
    seed: int
    versions: dict[str, str]
    prompt: str
    chat: bool
    system_prompt: str | None
    prompt_ids: list[int]
    max_new_tokens: int
    stop_strings: list[str]
    created_at: str
    tags: dict[str, str] = field(default_factory=dict)  # e.g. a sweep's prompt category and resume key
    history: list[list[str]] = field(default_factory=list)  # earlier [user, assistant] turns of a conversation
    defaults: dict[str, Any] = field(default_factory=dict)  # the strategy's default config (labels show changes)
    prefix_ids: list[int] = field(default_factory=list)  # a branch: its forced first tokens (the last one chosen)
    parent_run: str | None = None  # a branch: the run it branched from, and the step where it differs
    parent_step: int | None = None
    probes: dict[str, Any] = field(default_factory=dict)  # optional records: {"lens": true, "attention": {...}}


# RunStarted.tags["canvas"] of a diffusion strategy's run: a diffusion LM, or an autoregressive model read as a
# canvas (the sampler then reduces to one token per step, which is not the method's behaviour on a diffusion LM).
CANVAS_DIFFUSION, CANVAS_AUTOREGRESSIVE = "diffusion LM", "autoregressive model"
BRANCH_ORIGINS = ("prefix", "forced")  # a branch's tokens that its strategy did not choose


@dataclass(frozen=True)
class TokenStep:
    """One committed token with the distribution it came from.

    `logprob`, `rank` and `entropy` describe the model's raw distribution (log-softmax of the logits, natural
    log). `top_ids`/`top_logprobs` are the raw top-k; `kept_top_ids`/`kept_top_logprobs` the top-k of the
    distribution the strategy actually drew from (after its transforms), whose support has `kept_count`
    tokens. `details` holds strategy-specific plain JSON scalars or flat lists (Mirostat's mu, Top-H's bound, whether
    instructive decoding's contrast flipped the token, ...). `origin` says where
    the token came from in draft-verify strategies; in a branch, "prefix" (copied from the parent run) and
    "forced" (the token chosen at the fork) mark the tokens its strategy did not choose.
    """

    kind: ClassVar[str] = "token_step"
    step: int
    position: int
    token_id: int
    token_text: str
    logprob: float
    rank: int
    entropy: float
    top_ids: list[int]
    top_logprobs: list[float]
    top_texts: list[str]
    kept_top_ids: list[int]
    kept_top_logprobs: list[float]
    kept_count: int
    kept_logprob: float
    details: dict[str, Detail] = field(default_factory=dict)
    # plain | draft (an accepted draft token) | bonus (the target's token after a round) | prefix (a branch's
    # copy of its parent's token) | forced (the token a branch chose instead of its parent's)
    origin: str = "plain"

    @classmethod
    def from_stats(cls, stats: Any, **fields: Any) -> TokenStep:
        """A TokenStep from a step's statistics (a dataclass whose fields are TokenStep's logprob ... kept_logprob,
        e.g. explorer.sampling.StepStats) and the remaining fields."""
        return cls(**{f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}, **fields)


@dataclass(frozen=True)
class RunFinished:
    """How the run ended; `status` is ok, failed or cancelled. `wall_time_s` counts only the time this run
    spent computing (not the time its consumer held it, e.g. while other lanes ran)."""

    kind: ClassVar[str] = "run_finished"
    status: str
    stop_reason: str
    error: str | None
    text: str
    new_tokens: int
    wall_time_s: float
    prefill_time_s: float
    target_forward_passes: int


@dataclass(frozen=True)
class DraftRound:
    """One propose -> verify -> accept round of a draft-verify strategy.

    The draft is a tree in one representation: `draft_tokens[i]` with parent `parents[i]` (-1: the committed
    prefix); a chain has parents [-1, 0, 1, ...]. Per node: `q` = draft probability of the token (1.0 for
    deterministic drafters), `p` = target probability of it (None if not reached), `u` = the uniform draw of
    the sampling rule (None under the greedy rule or when the node was not reached), `verdicts` = accepted |
    rejected | unreached.
    `accepted_count` draft tokens were committed, then `bonus_token` (a correction after a rejection, or a
    free token after full acceptance). The committed tokens follow as TokenStep events.
    """

    kind: ClassVar[str] = "draft_round"
    round: int
    position: int
    drafter: str
    rule: str
    draft_tokens: list[int]
    draft_texts: list[str]
    parents: list[int]
    q: list[float]
    p: list[float | None]
    u: list[float | None]
    verdicts: list[str]
    accepted_count: int
    bonus_token: int
    bonus_text: str
    bonus_kind: str
    draft_time_s: float
    verify_time_s: float
    details: dict[str, Detail] = field(default_factory=dict)


@dataclass(frozen=True)
class BeamStep:
    """One expansion of a beam group: every candidate considered (a continuation of running beam `parents[i]`
    by `tokens[i]`, cumulative log-probability `scores[i]`) and what became of it: kept (in new slot
    `slots[i]`), finished (with length-normalised score `finished_scores[i]`), or pruned. Kept candidates are
    the tree nodes (step, slot); the root is the prompt."""

    kind: ClassVar[str] = "beam_step"
    step: int
    group: int
    parents: list[int]
    tokens: list[int]
    texts: list[str]
    scores: list[float]
    statuses: list[str]
    slots: list[int]
    finished_scores: list[float | None]


@dataclass(frozen=True)
class BeamResult:
    """The n-best list of a beam search, best first: token ids, length-normalised scores (for diverse beam search,
    of the diversity-augmented objective), the group, where each hypothesis ended (the step and candidate index
    of its finishing BeamStep entry), and each hypothesis' plain model log-probability sum log p(y_t | y_<t)."""

    kind: ClassVar[str] = "beam_result"
    hypotheses: list[list[int]]
    texts: list[str]
    scores: list[float]
    groups: list[int]
    end_steps: list[int]
    end_candidates: list[int]
    logprobs: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class CandidateStep:
    """A re-ranked step (contrastive search, momentum decoding): the top candidates with their model
    probability, a penalty, the resulting score and the chosen index. `features` is the per-candidate value the
    penalty came from (`feature_name`: max cosine similarity, repeated n-gram length, ...)."""

    kind: ClassVar[str] = "candidate_step"
    step: int
    position: int
    tokens: list[int]
    texts: list[str]
    probs: list[float]
    penalties: list[float]
    scores: list[float]
    chosen: int
    feature_name: str
    features: list[float]


@dataclass(frozen=True)
class TrialBranch:
    """Cautious next-token prediction at an uncertain step: the trials sampled from here to the next
    punctuation, their perplexities, and the chosen (lowest-perplexity) trial."""

    kind: ClassVar[str] = "trial_branch"
    step: int
    position: int
    entropy: float
    trials: list[list[int]]
    trial_texts: list[str]
    perplexities: list[float]
    chosen: int


@dataclass(frozen=True)
class PoolUpdate:
    """What a pool-based drafter learned in one round (lookahead's n-gram pool, Token Recycling's adjacency
    table): each entry maps a head token to the continuation it now holds for it."""

    kind: ClassVar[str] = "pool_update"
    round: int
    source: str
    heads: list[int]
    head_texts: list[str]
    continuations: list[list[int]]
    continuation_texts: list[list[str]]
    pool_size: int


@dataclass(frozen=True)
class LensStep:
    """The logit lens at one step: every layer's hidden state at the position that predicted the step's token,
    through the final norm and the LM head (the last layer: the model's own output). Per layer (index l = the
    output of decoder layer l): the chosen token's probability and rank, and that layer's top tokens."""

    kind: ClassVar[str] = "lens_step"
    step: int
    position: int
    token_id: int
    chosen_probs: list[float]
    chosen_ranks: list[int]
    top_ids: list[list[int]]
    top_probs: list[list[float]]
    top_texts: list[list[str]]


@dataclass(frozen=True)
class AttentionStep:
    """Which earlier positions the prediction of this step's token attended to: the attention weights of the
    query that produced it, averaged over heads and over layers `first_layer`..`last_layer`, the `top` largest
    (positions count the prompt from 0), largest first."""

    kind: ClassVar[str] = "attention_step"
    step: int
    position: int
    token_id: int
    first_layer: int
    last_layer: int
    sources: list[int]
    weights: list[float]
    source_texts: list[str] = field(default_factory=list)  # the tokens at those positions


@dataclass(frozen=True)
class UnmaskStep:
    """One denoising step of a masked diffusion LM over its canvas of generated positions (0 = the first one
    after the prompt). Per position still masked before the step (`masked`, ascending): the token it would take
    now, the score the commit rule ranks by, the top-1 minus top-2 probability and the entropy (nats). Then the
    positions the rule committed this step with their tokens (and any it remasked), in the current block
    [block_start, block_end). `scores` holds a schedule's own per-position score where it has one (e.g.
    CreditDecoding's fused confidence); `rule` says in words why these positions were committed; `recomputed`
    lists the generated positions the step's pass recomputed (the others reused cached K/V)."""

    kind: ClassVar[str] = "unmask_step"
    step: int
    block_start: int
    block_end: int
    masked: list[int]
    predicted_ids: list[int]
    confidences: list[float]
    margins: list[float]
    entropies: list[float]
    committed: list[int]
    committed_ids: list[int]
    remasked: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    all_in: bool = False
    rule: str = ""
    recomputed: list[int] = field(default_factory=list)  # generated positions this step's pass recomputed


@dataclass(frozen=True)
class CacheDrift:
    """How much a diffusion step's K/V reuse changed its decision (the sampler's `drift_every`): at `step` a
    second, full pass (no cache) over the same canvas; per masked position of the open block [block_start,
    block_end) (`positions`, ascending), the top-1 token and its probability under the step's own (approximate)
    logits and under the full pass's, and the largest |logit difference| over those positions. `full_pass`: the
    step itself was a full pass (a cache refresh), so the two agree up to float rounding."""

    kind: ClassVar[str] = "cache_drift"
    step: int
    block_start: int
    block_end: int
    positions: list[int]
    cached_ids: list[int]
    cached_confidences: list[float]
    full_ids: list[int]
    full_confidences: list[float]
    max_logit_difference: float
    full_pass: bool


@dataclass(frozen=True)
class MbrResult:
    """Minimum Bayes risk decoding: the sampled candidates (token ids, texts, log-probability sums under the
    model), the utility matrix U[i][j] = u(candidate i, candidate j as reference), each candidate's expected
    utility, the chosen index, the best-of-N by log-probability, and the greedy output for comparison."""

    kind: ClassVar[str] = "mbr_result"
    candidates: list[list[int]]
    texts: list[str]
    logprobs: list[float]
    utilities: list[list[float]]
    expected: list[float]
    chosen: int
    best_by_logprob: int
    greedy_ids: list[int] = field(default_factory=list)
    greedy_text: str = ""
    greedy_logprob: float = 0.0


@dataclass(frozen=True)
class FinishRace:
    """First-finish search: every raced sample as it stood when the race stopped (tokens, texts, lengths,
    log-probability sums, whether it finished), the order in which samples finished, the one kept and why."""

    kind: ClassVar[str] = "finish_race"
    samples: list[list[int]]
    texts: list[str]
    lengths: list[int]
    logprobs: list[float]
    finished: list[bool]
    finish_order: list[int]
    chosen: int
    reason: str = ""


@dataclass(frozen=True)
class ExtractSpans:
    """exact-extract: the prompt positions a span may start at, and for each start the log-probability of the
    spans of length 1..L from there (row = start, column = length − 1; -inf where none), the best span (its
    start, length and text) and the free greedy answer for comparison."""

    kind: ClassVar[str] = "extract_spans"
    starts: list[int]
    log_probs: list[list[float]]
    best_start: int
    best_length: int
    best_text: str
    greedy_ids: list[int] = field(default_factory=list)
    greedy_text: str = ""


@dataclass(frozen=True)
class LatticeResult:
    """Lattice decoding: the lattice's nodes (token ids, texts, positions; node 0 is the end of the prompt), its
    edges (from, to, the log-probability of `to`'s token where the edge was found, whether a recombination
    made it), the terminal nodes, the number of distinct complete paths, the merges, the chosen path and the
    greedy path (node ids, root excluded)."""

    kind: ClassVar[str] = "lattice_result"
    tokens: list[int]
    texts: list[str]
    depths: list[int]
    edge_from: list[int]
    edge_to: list[int]
    edge_logprobs: list[float]
    edge_merged: list[bool]
    terminal: list[int]
    path_count: int
    merges: int
    chosen: list[int]
    greedy: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SuperposedStep:
    """One step of superposed decoding: the drafts going in (texts) with their superposition weights, and the
    k x n scored candidates (which draft, which token, the model's log p, the n-gram filter's log P, the combined
    score; those scoring -inf are left out), best first, with the indices of those kept."""

    kind: ClassVar[str] = "superposed_step"
    step: int
    drafts: list[str]
    weights: list[float]
    candidate_drafts: list[int]
    candidate_tokens: list[int]
    candidate_texts: list[str]
    model_logprobs: list[float]
    ngram_logprobs: list[float]
    scores: list[float]
    kept: list[int]


@dataclass(frozen=True)
class SuperposedResult:
    """Superposed decoding's final drafts (token ids, texts, scores), best first, and the one committed."""

    kind: ClassVar[str] = "superposed_result"
    drafts: list[list[int]]
    texts: list[str]
    scores: list[float]
    chosen: int


@dataclass(frozen=True)
class EngineRecord:
    """What an inference engine reported about one request (a run imported with `import --format vllm|sglang|
    aiperf|specbench`, RunStarted.strategy == "external"): per verification step, the draft tokens proposed
    (`per_step_drafted`; a tree counts every node), the draft positions proposed (`per_step_depth`, a chain's
    length) and the draft tokens accepted (`per_step_accepted`, the bonus token excluded), where the engine gives
    them; otherwise only the totals. `accepted_per_position[i]` = steps whose draft position i was accepted;
    `drafted_per_position[i]` = steps that proposed position i (empty where not reported). `reported` keeps the
    engine's own numbers under its own names. None / [] = not reported (the views that need it say so)."""

    kind: ClassVar[str] = "engine_record"
    engine: str
    request_id: str
    steps: int | None  # verification passes (every decode step of a speculative engine)
    draft_steps: int | None  # steps that proposed at least one draft token
    drafted_tokens: int | None
    accepted_tokens: int | None
    output_tokens: int | None
    per_step_drafted: list[int] = field(default_factory=list)
    per_step_depth: list[int] = field(default_factory=list)
    per_step_accepted: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    acceptance_histogram: list[int] = field(default_factory=list)  # [j]: drafting steps that accepted exactly j
    time_to_first_token_s: float | None = None
    latency_s: float | None = None
    token_ids: list[int] = field(default_factory=list)  # the output's token ids, where the record gives them
    reported: dict[str, Detail] = field(default_factory=dict)


@dataclass(frozen=True)
class QualityProbe:
    """Quality numbers that need the model, measured once the run has ended (one extra forward pass over prompt
    + output, outside the run's timing and pass count): `coherence` = cosine of the mean hidden states (layer
    `layer`) of the prompt and of the continuation (explorer.quality.coherence); None where it does not apply."""

    kind: ClassVar[str] = "quality_probe"
    coherence: float | None
    layer: int


Event = (RunStarted | TokenStep | RunFinished | DraftRound | BeamStep | BeamResult | CandidateStep | TrialBranch
         | PoolUpdate | LensStep | AttentionStep | UnmaskStep | CacheDrift | MbrResult
         | FinishRace | ExtractSpans | LatticeResult | SuperposedStep | SuperposedResult | EngineRecord
         | QualityProbe)
EVENT_TYPES: dict[str, type] = {
    cls.kind: cls
    for cls in (RunStarted, TokenStep, RunFinished, DraftRound, BeamStep, BeamResult, CandidateStep, TrialBranch,
                PoolUpdate, LensStep, AttentionStep, UnmaskStep, CacheDrift, MbrResult, FinishRace,
                ExtractSpans, LatticeResult, SuperposedStep, SuperposedResult, EngineRecord,
                QualityProbe)
}


def to_dict(event: Any) -> dict[str, Any]:
    """Plain dict of an event's fields (shallow: values are already plain)."""
    return {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}


def from_dict(kind: str, data: dict[str, Any], *, strict: bool = False) -> Any:
    """The event of this kind from its fields. `strict` (for input from outside, e.g. an imported bundle) also
    checks every field's type against the dataclass and the values a run id, status and timestamp may take."""
    try:
        cls = EVENT_TYPES[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown event kind {kind!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"a {kind} event must be a JSON object")
    names, required = _field_names(cls)
    if not names.issuperset(data) or not required.issubset(data):
        unknown, missing = sorted(set(data) - names), sorted(required - set(data))
        raise ValueError(f"a {kind} event has unknown fields {unknown} or lacks {missing}")
    if strict:
        hints = _hints(cls)
        for name, value in data.items():
            if not _conforms(value, hints[name]):
                raise ValueError(f"{kind}.{name} has the wrong type ({type(value).__name__})")
        _check_values(kind, data)
    return cls(**data)


_HINTS: dict[type, dict[str, Any]] = {}
_NAMES: dict[type, tuple[frozenset[str], frozenset[str]]] = {}


def _field_names(cls: type) -> tuple[frozenset[str], frozenset[str]]:
    """(every field, the fields without a default) of an event class."""
    if cls not in _NAMES:
        fields = dataclasses.fields(cls)
        _NAMES[cls] = (frozenset(f.name for f in fields),
                       frozenset(f.name for f in fields
                                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING))
    return _NAMES[cls]


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a plain JSON value fits a field annotation (int, float, str, bool, None, lists, str-keyed dicts,
    unions, Any)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _conforms(v, args[1]) for k, v in value.items())
    return False


def _check_values(kind: str, data: dict[str, Any]) -> None:
    if kind == RunStarted.kind:
        if not RUN_ID.fullmatch(data["run_id"]):
            raise ValueError(f"run id {data['run_id'][:40]!r} is not one this program writes (12 hex digits)")
        try:
            datetime.fromisoformat(data["created_at"])
        except ValueError:
            raise ValueError(f"created_at {data['created_at'][:40]!r} is not an ISO timestamp") from None
        if not 0 <= data["seed"] < 2**63 or data["max_new_tokens"] < 1:
            raise ValueError("the seed or max_new_tokens is out of range")
    if kind == RunFinished.kind and data["status"] not in STATUSES:
        raise ValueError(f"status {data['status'][:40]!r} is not one of {', '.join(STATUSES)}")
