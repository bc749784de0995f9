"""The mask-predict sampler every masked diffusion LM strategy shares, and its rules as small pure functions.

Notation (LLaDA, Nie et al. 2025, arXiv:2502.09992, Algorithm "low-confidence remasking"; Fast-dLLM, Wu et al.
2025, arXiv:2505.22618): the canvas x = prompt ‖ [M]^L (L = gen_length); one step runs the mask predictor on
the whole canvas, proposes x̂_i = argmax (logits_i + Gumbel noise at temperature T, float64) for every masked
position i, scores them (c_i = p(x̂_i), or a margin, an entropy, a random draw) and commits some of them; the
others stay masked. Semi-autoregressive: the canvas is cut into blocks of `block_length` decoded left to right;
a block gets steps/blocks steps, and step k of a block commits n_k of its masked positions (LLaDA's linear
schedule: ⌊m/steps⌋ each, the first m mod steps steps one more). Fast-dLLM's parallel decoding instead commits
every masked position of the block with c_i ≥ τ (`threshold`), at least the most confident one, and takes
as many steps as that needs. Classifier-free guidance (LLaDA): l = l_u + (w + 1)(l_c − l_u), l_u from the canvas
with the prompt masked. Schedules (Prophet, CreditDecoding, ...) plug in as a `Schedule`: they see each step's
proposals and scores and decide what to commit.

Recorded: an UnmaskStep per denoising step (every masked position's proposal, score, margin and entropy; what
was committed and why), and a TokenStep per position once it and every position before it are committed, with
the raw distribution it was committed from (origin "unmasked", `details` = the step and the score then).

Caches (`cache`; CanvasKV in explorer/models/canvas.py holds the K/V). Notation: a step at which the canvas is x_t
recomputes the positions C_t (their queries, keys, values) on the stored K/V of the others, computed at the step
s < t they were last recomputed, when the canvas was x_s. On a bidirectional mask predictor (an AR-to-diffusion
model, or a causal LM read with attention=bidirectional) a reused K/V is stale wherever the positions it attended
to changed between s and t: the approximation the papers make and measure. Under causal attention a position's K/V
depends only on what precedes it, so every cache here is exact there (and the sampler token-identical to cache=none).
- prefix: Fast-dLLM's prefix cache (NVlabs/Fast-dLLM llada/generate.py: generate_with_prefix_cache): a full pass
  over x when a block opens, whose K/V of the prompt and the finished blocks (positions before the block) is kept
  for the block's other steps; each of those recomputes the block and everything after it, attending to all of it.
- dual: Fast-dLLM's dual cache (generate_with_dual_cache): the same, with the K/V of the masks after the block kept
  too; each step recomputes only the block (their `replace_position`).
- dkv: dKV-Cache-Decode (Ma et al. 2025, arXiv:2505.15781; horseee/dKV-Cache
  generation_utils/llada_dkv_cache_decode.py: generate): a decoded position's K/V is cached one step after its
  token is in; every masked position is recomputed; the cache is rebuilt when a block opens and every `refresh`
  steps of a block.
CanvasKV keeps every position's K/V in one stored canvas where the authors truncate past_key_values (prefix) or
replace the block's entries in place (dual, dKV); the positions reused, and the step their K/V came from, are the
same. A model whose K/V cannot be reused (a masked LM without a KV cache API, sliding windows, an attention that
ignores explicit positions or 4-D masks) is refused in one line that names what works (CanvasKV.check).
`drift_every` = N > 0 measures the approximation: every N-th step (step % N == 0) of a run that reuses K/V also
runs a full pass over the same canvas and records, per masked position of the open block, the cached pass's top-1
token and its probability against the full pass's (plain argmax, without the Gumbel noise of temperature > 0), as
a CacheDrift event. That pass is not the method's work: it runs on its own pass counter (not in forward passes)
and changes nothing that is committed, though its time is in the run's wall time.

Departures, marked where they happen: a canvas whose length is not a multiple of the block length gets a
shorter last block, and steps not divisible by the blocks are spread over them (LLaDA asserts both divide);
on a causal LM the canvas is read causally with the shift (so that the sampler reduces to AR decoding there).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from explorer.events import CacheDrift, Event, TokenStep, UnmaskStep
from explorer.params import Checked, param
from explorer.strategies.base import commit_token, register

REMASKING = ("low_confidence", "margin", "entropy", "random")
ATTENTION = ("auto", "bidirectional")
CACHES = ("none", "prefix", "dual", "dkv")


@dataclass(frozen=True)
class UnmaskingConfig(Checked):
    steps: int = param(0, "denoising steps over the whole canvas (0: one per generated token, LLaDA's default)",
                       minimum=0, maximum=2048, step=1)
    block_length: int = param(32, "semi-autoregressive block length (0: one block, the whole canvas)",
                              minimum=0, maximum=2048, step=1)
    remasking: str = param("low_confidence", "which proposals a step commits first: highest probability "
                                             "(LLaDA), largest top-1 − top-2 margin, lowest entropy, or random",
                           choices=REMASKING)
    threshold: float = param(0.0, "Fast-dLLM parallel decoding: commit every position scoring at least this "
                                  "(at least one per step); 0: LLaDA's fixed number per step",
                             minimum=0.0, maximum=1.0, step=0.01)
    temperature: float = param(0.0, "Gumbel-noise temperature of the proposals (0: argmax)", minimum=0.0,
                               maximum=2.0, step=0.05)
    cfg_scale: float = param(0.0, "classifier-free guidance scale w (0: off; > 0 costs a second pass per step)",
                             minimum=0.0, maximum=5.0, step=0.1)
    attention: str = param("auto", "auto: the model's own attention (causal for a causal LM); bidirectional: "
                                   "every position sees every other (what AR-to-diffusion adaptation trains)",
                           choices=ATTENTION)
    cache: str = param("none", "reuse K/V across steps: prefix or dual = Fast-dLLM's caches (refreshed when a "
                               "block opens), dkv = dKV-Cache-Decode's delayed caching (rebuilt when a block opens); "
                               "approximate on a bidirectional model, exact on a causal reading; none = a full pass "
                               "every step", choices=CACHES)
    refresh: int = param(8, "dkv: a full pass at every this many steps of a block, besides its first two (8: the "
                            "authors' LLaDA setting; 1: every step; 0: only the first two)", minimum=0,
                         maximum=1024, step=1)
    drift_every: int = param(0, "cache drift: every this many steps also run a full pass and record how the cached "
                                "pass's top-1 and confidence differ from it in the open block (0: off; not counted "
                                "as the method's passes; a run that reuses no K/V records nothing)", minimum=0,
                             maximum=1024, step=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache != "none" and self.cfg_scale > 0:
            raise ValueError("classifier-free guidance runs a second canvas every step: use cache=none with it")


# ------------------------------------------------------------------------------------------- pure rules
def probs_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H in nats per row of probabilities `(..., vocab)` (zeros contribute nothing)."""
    return -(probs * torch.log(probs.clamp_min(1e-300))).sum(-1)


def transfer_counts(masked: int, steps: int) -> list[int]:
    """LLaDA's linear schedule: how many of `masked` positions each of `steps` steps commits."""
    steps = max(1, steps)
    base, extra = divmod(masked, steps)
    return [base + (1 if k < extra else 0) for k in range(steps)]


def gumbel_argmax(logits: torch.Tensor, temperature: float, rng: torch.Generator | None) -> torch.Tensor:
    """x̂ = argmax exp(l) / (−log u)^T with u ~ U(0, 1) in float64 (LLaDA's Gumbel-max: low precision hurts
    quality, their note); T = 0 is the plain argmax. `logits` (n, vocab) -> (n,)."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    generator_device = rng.device if rng is not None else logits.device
    noise = torch.rand(logits.shape, generator=rng, dtype=torch.float64, device=generator_device).to(logits.device)
    return torch.argmax(logits.double().exp() / (-torch.log(noise)) ** temperature, dim=-1)


def position_scores(probs: torch.Tensor, proposals: torch.Tensor, remasking: str,
                    rng: torch.Generator | None) -> torch.Tensor:
    """The score each masked position is ranked by (higher commits first). `probs` (n, vocab) float64."""
    if remasking == "low_confidence":
        return probs.gather(1, proposals[:, None])[:, 0]
    if remasking == "margin":
        top2 = torch.topk(probs, min(2, probs.shape[1]), dim=-1).values
        return top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0.0)
    if remasking == "entropy":
        return -probs_entropy(probs)  # −H: the most certain first
    generator_device = rng.device if rng is not None else probs.device
    return torch.rand(probs.shape[0], generator=rng, dtype=torch.float64, device=generator_device).to(probs.device)


def commit_top(scores: torch.Tensor, eligible: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` eligible positions with the highest scores (a bool mask over the rows)."""
    ranked = torch.where(eligible, scores, torch.full_like(scores, -math.inf))
    chosen = torch.zeros_like(eligible)
    count = min(count, int(eligible.sum()))
    if count > 0:
        chosen[torch.topk(ranked, count).indices] = True
    return chosen


def commit_above(scores: torch.Tensor, eligible: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fast-dLLM: every eligible position scoring at least `threshold`, and at least the best one."""
    chosen = eligible & (scores >= threshold)
    if eligible.any():
        ranked = torch.where(eligible, scores, torch.full_like(scores, -math.inf))
        chosen[int(torch.argmax(ranked))] = True
    return chosen


# ------------------------------------------------------------------------------------------- schedules
@dataclass
class StepView:
    """What a schedule sees at one step: rows are the canvas's masked positions (`positions`, ascending)."""

    step: int  # 0-based, over the whole run
    block_step: int  # 0-based, within the current block
    block_steps: int  # the steps the current block was given
    progress: float  # steps done / steps planned, in [0, 1]
    positions: torch.Tensor  # (n,) generated positions still masked
    in_block: torch.Tensor  # (n,) bool: in the current block
    logits: torch.Tensor  # (n, vocab) float32, after guidance
    probs: torch.Tensor  # (n, vocab) float64
    proposals: torch.Tensor  # (n,) x̂
    scores: torch.Tensor  # (n,) the remasking rule's scores
    count: int  # LLaDA's n_k for this step


@dataclass
class Decision:
    committed: torch.Tensor  # (n,) bool over the rows
    proposals: torch.Tensor | None = None  # tokens to commit (None: the view's)
    scores: list[float] = field(default_factory=list)  # the schedule's own score per row, recorded
    all_in: bool = False
    rule: str = ""


class Schedule:
    """The base rule (LLaDA's fixed count, or Fast-dLLM's threshold); schedules override `decide` (and
    `block_end`, `counts`, `recompute`)."""

    reuses_kv = False  # True: the schedule decides which K/V to reuse whatever `cache` says (Window-Diffusion)

    def __init__(self, config: UnmaskingConfig, model: Any = None, rng: torch.Generator | None = None):
        self.config, self.model, self.rng = config, model, rng

    def recompute(self, step: int, first: int, last: int | None, masked: torch.Tensor, committed_before: list[int],
                  *, block_step: int = 0) -> tuple[list[int], list[int] | None] | None:
        """The generated positions this step (`block_step` of its block; `last` is None when the block opens)
        recomputes, and those whose stored K/V it reuses (None: all the others); None for a full pass. `cache`:
        prefix (Fast-dLLM: a full pass when a block opens, then the block and what follows it on the prefix's K/V),
        dual (Fast-dLLM: then only the block, on the K/V of everything else), dkv (dKV-Cache-Decode, Ma et al. 2025,
        arXiv:2505.15781; horseee/dKV-Cache generation_utils/llada_dkv_cache_decode.py: generate): every masked
        position and those committed at the step before, whose K/V is cached one step late, once their token is
        in; the cache is dropped when a block opens (their `past_qkv = None` per block), and a block's steps 0 and
        1 (their step 0 stores nothing) and every step i with i % `refresh` == 0 (their cache_reloading_step) are
        full passes."""
        config, length = self.config, masked.shape[0]
        if config.cache in ("prefix", "dual") and last is None:
            return None
        if config.cache == "dkv" and (block_step < 2 or (config.refresh and block_step % config.refresh == 0)):
            return None
        if config.cache == "prefix":
            return list(range(first, length)), None
        if config.cache == "dual":
            return list(range(first, last)), None
        return sorted(set(torch.nonzero(masked).flatten().tolist()) | set(committed_before)), None

    def block_end(self, first: int, default: int, length: int, rows: torch.Tensor, proposals: torch.Tensor,
                  probs: torch.Tensor) -> int:
        """Where the block opening at `first` ends (called at its first step, with that step's proposals)."""
        return default

    def counts(self, masked: int, steps: int) -> list[int]:
        """How many positions each step of a block commits (LLaDA's linear schedule)."""
        return transfer_counts(masked, steps)

    def decide(self, view: StepView) -> Decision:
        if self.config.threshold > 0:
            committed = commit_above(view.scores, view.in_block, self.config.threshold)
            return Decision(committed, rule=f"score ≥ {self.config.threshold:g} (at least one)")
        return Decision(commit_top(view.scores, view.in_block, view.count),
                        rule=f"the {view.count} best by {self.config.remasking}")


# ------------------------------------------------------------------------------------------- the sampler
def mask_predict(model: Any, prompt_ids: Sequence[int], config: UnmaskingConfig, rng: torch.Generator,
                 max_new_tokens: int, schedule: Schedule | None = None) -> Iterator[Event]:
    """Decode a canvas of `max_new_tokens` masks after the prompt; yield UnmaskSteps and, in order, the
    TokenSteps of the positions committed so far."""
    schedule = schedule or Schedule(config)
    info = model.canvas_info()
    mask_id, start, length = info.mask_id, len(prompt_ids), max_new_tokens
    bidirectional = None if config.attention == "auto" else True
    canvas = torch.tensor([*prompt_ids, *([mask_id] * length)], device=model.device)
    block = config.block_length or length
    planned = config.steps or length
    steps_left = planned
    committed_steps: dict[int, TokenStep] = {}
    emitted = step = first = 0
    masked = torch.ones(length, dtype=torch.bool, device=model.device)
    reuse = CanvasReuse(model, config, schedule, start, length)
    while first < length and masked[first:].any():
        if not masked[first:first + block].any():  # committed already (an all-in step)
            first += block
            continue
        last, counts, block_step, block_steps = None, [], 0, 1
        while last is None or masked[first:last].any():
            if reuse.kv is None:
                logits = _guided_logits(model, canvas, length, config, bidirectional)  # (length, vocab)
                recomputed = list(range(length))
            else:
                logits, recomputed = reuse.step(canvas, step, first, last, masked)
            rows = torch.nonzero(masked).flatten()  # (n,) every masked position of the canvas
            row_logits = logits[rows]
            probs = torch.softmax(row_logits.double(), dim=-1)
            proposals = gumbel_argmax(row_logits, config.temperature, rng)
            scores = position_scores(probs, proposals, config.remasking, rng)
            if last is None:  # the block opens: its end (fixed, or the schedule's), its share of the steps
                last = schedule.block_end(first, min(first + block, length), length, rows, proposals, probs)
                # departure: LLaDA needs equal blocks and steps divisible by them; we give each block its share
                block_steps = max(1, math.ceil(steps_left * (last - first) / (length - first)))
                steps_left = max(0, steps_left - block_steps)
                counts = schedule.counts(int(masked[first:last].sum()), block_steps)
            in_block = (rows >= first) & (rows < last)
            drift = None
            if config.drift_every and reuse.kv is not None and step % config.drift_every == 0:
                drift = _cache_drift(model, canvas, length, config, bidirectional, logits, rows[in_block], step,
                                     (first, last), reuse.full_pass)
            count = counts[block_step] if block_step < len(counts) else 1  # past its steps: one per step
            view = StepView(step, block_step, block_steps, min(1.0, step / max(1, planned)), rows, in_block,
                            row_logits, probs, proposals, scores, max(1, count))
            decision = schedule.decide(view)
            tokens = decision.proposals if decision.proposals is not None else proposals
            chosen = rows[decision.committed]
            for row in torch.nonzero(decision.committed).flatten().tolist():
                position, token = int(rows[row]), int(tokens[row])
                canvas[start + position] = token
                committed_steps[position] = commit_token(
                    model, position, start + position, token, logits[position], origin="unmasked",
                    details={"denoising_step": step, "score": float(scores[row])})
            masked[chosen] = False
            reuse.committed = chosen.tolist()
            yield UnmaskStep(step=step, block_start=first, block_end=last, masked=rows.tolist(),
                             predicted_ids=proposals.tolist(), confidences=_floats(scores),
                             margins=_floats(_margins(probs)), entropies=_floats(probs_entropy(probs)),
                             committed=chosen.tolist(), committed_ids=[int(canvas[start + p]) for p in chosen],
                             scores=decision.scores, all_in=decision.all_in, rule=decision.rule,
                             recomputed=recomputed)
            if drift is not None:
                yield drift
            while emitted < length and emitted in committed_steps:  # the committed prefix, in order
                yield committed_steps.pop(emitted)
                emitted += 1
            step += 1
            block_step += 1
        first = last


class CanvasReuse:
    """K/V kept across denoising steps (`cache` other than none, or a schedule that manages its own): each step
    recomputes the positions its schedule names and reuses the stored K/V of the others."""

    def __init__(self, model: Any, config: UnmaskingConfig, schedule: Schedule, start: int, length: int):
        from explorer.models import CanvasKV

        self.schedule, self.start, self.length = schedule, start, length
        bidirectional = model.canvas_info().bidirectional or config.attention == "bidirectional"
        wanted = config.cache != "none" or schedule.reuses_kv
        self.kv = CanvasKV(model, bidirectional, start) if wanted else None
        self.committed: list[int] = []  # generated positions committed at the step before
        self.block_opened = 0  # the step at which the current block opened
        self.full_pass = True  # the last step ran a full pass (nothing reused)

    def step(self, canvas: torch.Tensor, step: int, first: int, last: int | None, masked: torch.Tensor
             ) -> tuple[torch.Tensor, list[int]]:
        """Logits `(length, vocab)` of the generated positions, and the generated positions recomputed."""
        start, ids = self.start, canvas.tolist()
        if last is None:  # a block opens
            self.block_opened = step
        plan = None if step == 0 else self.schedule.recompute(step, first, last, masked, self.committed,
                                                              block_step=step - self.block_opened)
        self.full_pass = plan is None
        if plan is None:
            return self.kv.run(ids), list(range(self.length))
        compute, reuse = plan
        kept = None if reuse is None else [*range(start), *(start + p for p in reuse)]
        return self.kv.run(ids, [start + p for p in compute], kept), compute


def _guided_logits(model: Any, canvas: torch.Tensor, length: int, config: UnmaskingConfig,
                   bidirectional: bool | None) -> torch.Tensor:
    """The generated positions' logits `(length, vocab)`, with classifier-free guidance when asked."""
    logits = model.canvas_logits(canvas.tolist(), bidirectional=bidirectional, last=length)
    if config.cfg_scale > 0:  # LLaDA's unsupervised CFG: the same canvas with the prompt masked
        unconditional = canvas.clone()
        unconditional[:canvas.shape[0] - length] = model.canvas_info().mask_id
        plain = model.canvas_logits(unconditional.tolist(), bidirectional=bidirectional, last=length)
        logits = plain + (config.cfg_scale + 1) * (logits - plain)
    return logits


def _cache_drift(model: Any, canvas: torch.Tensor, length: int, config: UnmaskingConfig, bidirectional: bool | None,
                 logits: torch.Tensor, positions: torch.Tensor, step: int, block: tuple[int, int],
                 full_pass: bool) -> CacheDrift:
    """The step's (cached) logits `(length, vocab)` against a full pass over the same canvas, at `positions` (the
    open block's masked ones): top-1 and its probability under each. The full pass runs on the model's own pass
    counter view (`for_run`), so the run's forward passes count only the method's work."""
    full = _guided_logits(model.for_run(), canvas, length, config, bidirectional)  # (length, vocab)
    cached_rows, full_rows = logits[positions], full[positions]  # (n, vocab)
    cached_top = torch.softmax(cached_rows.double(), dim=-1).max(dim=-1)
    full_top = torch.softmax(full_rows.double(), dim=-1).max(dim=-1)
    difference = float((cached_rows - full_rows).abs().max()) if positions.numel() else 0.0
    return CacheDrift(step=step, block_start=block[0], block_end=block[1], positions=positions.tolist(),
                      cached_ids=cached_top.indices.tolist(), cached_confidences=_floats(cached_top.values),
                      full_ids=full_top.indices.tolist(), full_confidences=_floats(full_top.values),
                      max_logit_difference=round(difference, 6), full_pass=full_pass)


def _margins(probs: torch.Tensor) -> torch.Tensor:
    return position_scores(probs, torch.argmax(probs, dim=-1), "margin", None)


def _floats(values: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in values.tolist()]


def kv_reuse_refusal(model: Any, bidirectional: bool | None = None) -> str | None:
    """Why `model` cannot reuse canvas K/V read this way (CanvasKV.check; `bidirectional` None: the model's own
    reading), or None if it can."""
    from explorer.models import CanvasKV

    try:
        CanvasKV.check(model, bidirectional)
    except ValueError as refusal:
        return str(refusal)
    return None


def diffusion_prepare(model: Any, config: UnmaskingConfig) -> None:
    """Refuse what cannot run before the run is stored."""
    info = model.canvas_info()
    if config.cache != "none":
        from explorer.models import CanvasKV

        CanvasKV.check(model, info.bidirectional or config.attention == "bidirectional")


# The ledger line every mask-based diffusion strategy shares about the caches (they run in this sampler).
CACHE_DEPARTURE = ("cache=prefix/dual/dkv reuse K/V only on models of a causal architecture with a KV cache (causal "
                   "LMs; AR-to-diffusion models read bidirectionally, where they are the papers' approximate "
                   "caches); masked LMs without a KV cache API (BERT, ModernBERT) are refused and run with "
                   "cache=none.")
NO_REUSE_NOTE = " (full pass: this model cannot reuse canvas K/V)"  # a step's rule where K/V cannot be reused


def register_diffusion(name: str, config: type, summary: str, paper: str, schedule: type = Schedule,
                       prepare: Any = diffusion_prepare, reference_code: str = "",
                       departures: Sequence[str] = ()) -> None:
    """Register a diffusion strategy: the shared sampler with `schedule(config, model, rng)` deciding."""
    def run(model: Any, prompt_ids: Sequence[int], config: UnmaskingConfig, rng: torch.Generator, *,
            max_new_tokens: int) -> Iterator[Event]:
        yield from mask_predict(model, prompt_ids, config, rng, max_new_tokens, schedule(config, model, rng))

    register(name, config, summary, needs_budget=True, prepare=prepare, family="diffusion", paper=paper,
             reference_code=reference_code, departures=departures)(run)
