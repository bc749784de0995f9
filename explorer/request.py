"""`RunRequest`: everything one run needs, validated once, in one frozen object. The CLI, the app, the API,
lanes and sweeps build one and pass it down; the runner builds the run's RunStarted event from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from explorer.events import RunStarted
from explorer.params import check_prompt
from explorer.strategies import config_dict, get_strategy, make_config

MAX_NEW_TOKENS_LIMIT = 4096  # the hard ceiling; the app sets a lower cap of its own
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds
MAX_PROMPT_CHARS = 100_000  # the hard ceiling; the app caps prompt tokens lower


def _whole(value: Any, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
        if float(number) != float(value):  # 64.0 and "64" are fine, 64.5 is not
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name} must be a whole number between {low} and {high}, got {value!r}") from None
    if not low <= number <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {number}")
    return number


def check_seed(value: Any) -> int:
    return _whole(value, "seed", 0, MAX_SEED)


def check_max_new_tokens(value: Any, cap: int = MAX_NEW_TOKENS_LIMIT) -> int:
    """`value` as a whole number of new tokens in [1, cap], or a ValueError saying so."""
    return _whole(value, "max new tokens", 1, cap)


def parse_run_ids(text: str | Sequence[str] | None) -> list[str]:
    """Run ids from 'a,b c' (commas or spaces) or a list of such strings, in order, without repeats."""
    parts = [text] if isinstance(text, str) or text is None else list(text)
    ids: list[str] = []
    for part in parts:
        for run_id in (part or "").replace(",", " ").split():
            if run_id not in ids:
                ids.append(run_id)
    return ids


@dataclass(frozen=True)
class RunRequest:
    """One run: a strategy with its validated config, a prompt and the decoding budget. `chat=None` uses the
    model's chat template when it has one."""

    strategy: str
    config: Any
    prompt: str
    chat: bool | None = None
    system_prompt: str | None = None
    max_new_tokens: int = 128
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    history: tuple[tuple[str, str], ...] = ()  # earlier (user, assistant) turns: the prompt is the next user turn
    max_prompt_tokens: int | None = None  # per-request limits a server sets (None: only the hard ceilings)
    time_limit_s: float | None = None  # compute time after which the run is stopped and stored as "stopped"
    quality: bool = True  # once it ends, measure what needs the model (coherence: one extra pass, not timed)
    # A branch ("what if"): the first generated tokens are forced (a parent run's tokens up to a step, then the
    # token chosen instead of the parent's there); the strategy decodes on from them.
    prefix: tuple[int, ...] = ()
    parent_run: str | None = None
    parent_step: int | None = None
    # Optional records (explorer/probes.py), off by default: they cost a second pass per token.
    lens: bool = False
    attention: bool = False
    attention_layers: str = ""  # "first-last" (0-based, inclusive); empty: every layer
    attention_top: int = 8

    def __post_init__(self) -> None:
        spec = get_strategy(self.strategy)
        if not isinstance(self.config, spec.config):
            raise ValueError(f"strategy {self.strategy!r} needs a {spec.config.__name__}, "
                             f"got {type(self.config).__name__}")
        check_prompt(self.prompt)
        if len(self.prompt) + sum(len(a) + len(b) for a, b in self.history) > MAX_PROMPT_CHARS:
            raise ValueError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters: shorten it")
        object.__setattr__(self, "max_new_tokens", check_max_new_tokens(self.max_new_tokens))
        object.__setattr__(self, "seed", check_seed(self.seed))
        if self.time_limit_s is not None and not 0 < self.time_limit_s < float("inf"):
            raise ValueError("the time limit must be a positive number of seconds")
        self.config.check_cost(self.max_new_tokens)
        object.__setattr__(self, "system_prompt", self.system_prompt or None)
        object.__setattr__(self, "stop_strings", tuple(s for s in self.stop_strings if s))
        object.__setattr__(self, "tags", dict(self.tags))
        object.__setattr__(self, "history", tuple((str(user), str(answer)) for user, answer in self.history))
        if self.history and self.chat is False:
            raise ValueError("a multi-turn conversation needs the chat template: turn chat on")
        object.__setattr__(self, "prefix", tuple(int(t) for t in self.prefix))
        object.__setattr__(self, "attention_top", _whole(self.attention_top, "attention top", 1, 64))
        if len(str(self.attention_layers)) > 32:
            raise ValueError("attention layers must read like 0-11")
        if len(self.prefix) > self.max_new_tokens:
            raise ValueError(f"the branch starts at step {len(self.prefix) - 1}: max new tokens must be at least "
                             f"{len(self.prefix)}")

    @classmethod
    def build(cls, strategy: str, params: Mapping[str, Any], prompt: str, **options: Any) -> RunRequest:
        """From loosely typed strategy parameters (CLI strings, UI numbers, API JSON)."""
        return cls(strategy, make_config(strategy, dict(params)), prompt, **options)

    def replace(self, **changes: Any) -> RunRequest:
        return dataclasses.replace(self, **changes)

    def run_started(self, *, run_id: str, model_info: Any, chat: bool, prompt_ids: list[int],
                    versions: dict[str, str]) -> RunStarted:
        """The run's first event: everything needed to reproduce it."""
        return RunStarted(
            run_id=run_id, strategy=self.strategy, config=config_dict(self.config), model_id=model_info.model_id,
            weights_hash=model_info.weights_hash, dtype=model_info.dtype, device=model_info.device, seed=self.seed,
            versions=versions, prompt=self.prompt, chat=chat, system_prompt=self.system_prompt,
            prompt_ids=prompt_ids, max_new_tokens=self.max_new_tokens, stop_strings=list(self.stop_strings),
            created_at=datetime.now(UTC).isoformat(timespec="milliseconds"), tags=dict(self.tags),
            history=[[user, answer] for user, answer in self.history],
            defaults=config_dict(type(self.config)()),
            prefix_ids=list(self.prefix), parent_run=self.parent_run, parent_step=self.parent_step,
            probes=self.probes(),
        )

    def probes(self, layers: tuple[int, int] | None = None) -> dict[str, Any]:
        """What RunStarted records about the optional records (with the resolved attention layer range)."""
        found: dict[str, Any] = {}
        if self.lens:
            found["lens"] = True
        if self.attention:
            found["attention"] = {"layers": list(layers) if layers else self.attention_layers,
                                  "top": self.attention_top}
        return found
