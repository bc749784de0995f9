"""What every strategy shares: the registry, config parsing, and the plain autoregressive loop.

A strategy is `run(model, prompt_ids, config, rng) -> Iterator[event]`; the runner decides when to stop
(EOS, stop strings, max new tokens) and closes the generator, so strategies simply keep going.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from explorer.events import Detail, Event, TokenStep
from explorer.sampling import StepStats, step_stats

RECORD_TOP_K = 10


@dataclass(frozen=True)
class StrategySpec:
    name: str
    run: Callable[..., Iterator[Event]]
    config: type
    summary: str
    needs_budget: bool = False  # search strategies get `max_new_tokens=` (they commit only at the end)
    prepare: Callable[[Any, Any], None] | None = None  # checks (model, config) before the run is stored
    family: str = "other"  # one of FAMILIES: decides how lists group it and (diffusion) how the runner runs it
    paper: str = ""  # the paper(s) it implements: "Authors year, name, arXiv:id"
    # The fidelity ledger (`fidelity_ledger`): the authors' code this follows ("owner/repo: path: function", or
    # "none public"), and each way this implementation departs from the paper and that code, one line each.
    reference_code: str = ""
    departures: tuple[str, ...] = ()
    plugin: str = ""  # the plugin that registered it (explorer/plugins.py sets it), "" for a built-in

    @property
    def group(self) -> str:
        """Where lists show it: its family, or "plugins" for every strategy a plugin added (the family still
        decides how it runs: a plugin's "diffusion" strategy runs on a canvas)."""
        return "plugins" if self.plugin else self.family

    @property
    def fidelity(self) -> str:
        """'faithful' when nothing departs from the paper and the authors' code, else 'departures'."""
        return "departures" if self.departures else "faithful"


FAMILIES = ("sampling", "search", "speed-up: draft-verify", "speed-up: model-free", "diffusion", "other",
            "plugins")
REGISTRY: dict[str, StrategySpec] = {}


def register(name: str, config: type, summary: str, *, needs_budget: bool = False,
             prepare: Callable[[Any, Any], None] | None = None, family: str = "other", paper: str = "",
             reference_code: str = "", departures: Sequence[str] = ()) -> Callable[[Callable], Callable]:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}")

    def decorate(run: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"strategy {name!r} is already registered: give this one another name")
        REGISTRY[name] = StrategySpec(name, run, config, summary, needs_budget, prepare, family, paper,
                                      reference_code, tuple(departures))
        return run

    return decorate


def get_strategy(name: str) -> StrategySpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}: choose one of {', '.join(sorted(REGISTRY))}") from None


def tree_prepare(model: Any, config: Any) -> None:
    """The `prepare` of strategies that run tree passes: refuse a model whose attention ignores tree masks."""
    from explorer.models import check_tree_support

    check_tree_support(model)


def field_type(config: type, name: str) -> type:
    hints = typing.get_type_hints(config)
    kind = hints[name]
    if isinstance(kind, types.UnionType):  # `float | None` -> float
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return kind


def make_config(name: str, params: dict[str, Any]) -> Any:
    """Build a strategy's config from loosely typed values (CLI strings, UI numbers); raise ValueError."""
    spec = get_strategy(name)
    fields = {f.name: f for f in dataclasses.fields(spec.config)}
    values: dict[str, Any] = {}
    for key, raw in params.items():
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise ValueError(f"strategy {name!r} has no parameter {key!r}: valid parameters are {valid}")
        values[key] = _coerce(field_type(spec.config, key), key, raw)
    return spec.config(**values)


def _coerce(kind: type, key: str, raw: Any) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, str):
                if raw.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                    raise ValueError
                return raw.lower() in {"true", "1", "yes"}
            return bool(raw)
        if kind is int:
            value = float(raw)
            if value != int(value):
                raise ValueError
            return int(value)
        if kind is float:
            return float(raw)
        return kind(raw)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key} must be a {kind.__name__}, got {raw!r}") from None


def config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


# ------------------------------------------------------------------------------- the autoregressive loop
@dataclass(frozen=True)
class Choice:
    """One step's decision: the token, the logits it was drawn from (None: the raw ones), and scalars."""

    token_id: int
    kept_logits: torch.Tensor | None = None
    details: dict[str, Detail] = field(default_factory=dict)


def commit_token(model: Any, step: int, position: int, token_id: int, raw: torch.Tensor | None = None,
                 kept: torch.Tensor | None = None, *, stats: StepStats | None = None,
                 details: dict[str, Detail] | None = None, origin: str = "plain") -> TokenStep:
    """The TokenStep of a committed token: from the raw logits `(vocab,)` it was chosen from (and the
    transformed logits it was drawn from, None: the raw ones), or from `stats` computed earlier."""
    if stats is None:
        if raw is None:
            raise ValueError("commit_token needs the raw logits or precomputed stats")
        stats = step_stats(raw, kept, token_id, RECORD_TOP_K)
    return TokenStep.from_stats(stats, step=step, position=position, token_id=token_id,
                                token_text=model.piece(token_id), top_texts=[model.piece(i) for i in stats.top_ids],
                                details=dict(details or {}), origin=origin)


def autoregressive(
    model: Any, prompt_ids: Sequence[int], choose: Callable[[torch.Tensor, list[int]], Choice]
) -> Iterator[TokenStep]:
    """One token per forward pass: `choose(logits (vocab,), context_ids)` picks each next token."""
    session = model.session()
    logits = session.forward(list(prompt_ids), all_logits=False).logits[-1]  # (vocab,)
    context = list(prompt_ids)
    step = 0
    while True:
        choice = choose(logits, context)
        yield commit_token(model, step, len(context), choice.token_id, logits, choice.kept_logits,
                           details=choice.details)
        context.append(choice.token_id)
        step += 1
        logits = session.forward([choice.token_id]).logits[-1]
