"""Branching ("what if"): continue a stored run from any step with another token there.

A branch of run R at step k with token t is a new run on R's prompt (same chat, system prompt, history, seed and
budget) whose first k generated tokens are R's, whose token at step k is t (origin "forced"), and which decodes
on from there with R's strategy or another one. It is stored with a link to R and k (`parent_run`,
`parent_step` in its RunStarted), so a run's branches form a tree (`branch_tree`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from explorer.trace import Trace  # torch-free at import: viz draws branch trees from traces alone


def resolve_token(model: Any, parent: Trace, step: int, token: str | int) -> int:
    """A token id from an id, or from a text: first among the alternatives recorded at that step, else the
    text's tokenisation when it is exactly one token. ValueError otherwise."""
    if isinstance(token, int) or (isinstance(token, str) and token.strip().isdigit() and token.strip() == token):
        token_id = int(token)
        vocab = len(model.tokenizer)
        if not 0 <= token_id < vocab:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0 to {vocab - 1})")
        return token_id
    if not isinstance(token, str) or token == "":
        raise ValueError("give the token to force: one of the recorded alternatives, a text or a token id")
    recorded = parent.token_steps[step]
    for token_id, text in zip(recorded.top_ids, recorded.top_texts, strict=False):
        if text == token:
            return token_id
    ids = model.tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids)} tokens for this model: give one token (or its id)")
    return ids[0]


def branch_request(model: Any, parent: Trace, step: int, token: str | int, strategy: str | None = None,
                   params: Mapping[str, Any] | None = None, **options: Any) -> Any:
    """The RunRequest of a branch of `parent` at `step` with `token`; ValueError with one line for a bad step,
    token or strategy. Without `strategy`, the parent's strategy and parameters."""
    from explorer.request import RunRequest
    from explorer.strategies import make_config

    tokens = parent.token_ids
    if not tokens:
        raise ValueError(f"run {parent.run_id} has no tokens to branch from")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < len(tokens):
        raise ValueError(f"step must be between 0 and {len(tokens) - 1} (run {parent.run_id} has {len(tokens)} "
                         "tokens)")
    token_id = resolve_token(model, parent, step, token)
    if token_id == tokens[step]:
        raise ValueError(f"the run chose {parent.token_steps[step].token_text!r} at step {step} already: pick "
                         "another token")
    started = parent.started
    if strategy is None:
        strategy, config = started.strategy, make_config(started.strategy, started.config)
    else:
        config = make_config(strategy, dict(params or {}))
    return RunRequest(strategy, config, started.prompt, chat=started.chat, system_prompt=started.system_prompt,
                      max_new_tokens=options.pop("max_new_tokens", started.max_new_tokens), seed=started.seed,
                      stop_strings=tuple(started.stop_strings), history=tuple(tuple(t) for t in started.history),
                      prefix=(*tokens[:step], token_id), parent_run=parent.run_id, parent_step=step, **options)


@dataclass
class BranchNode:
    """A run in a branch tree: where it left its parent, its text after that point, its mean log-probability."""

    trace: Trace
    children: list[BranchNode] = field(default_factory=list)

    @property
    def step(self) -> int | None:
        return self.trace.started.parent_step

    @property
    def mean_logprob(self) -> float:
        steps = self.trace.token_steps
        return sum(s.logprob for s in steps) / len(steps) if steps else float("nan")


def branch_tree(traces: Sequence[Trace]) -> list[BranchNode]:
    """The runs as a forest: each branch under its parent (when the parent is among `traces`), roots in order."""
    nodes = {t.run_id: BranchNode(t) for t in traces}
    roots = []
    for trace in traces:
        parent = nodes.get(trace.started.parent_run or "")
        if parent is not None and parent is not nodes[trace.run_id]:
            parent.children.append(nodes[trace.run_id])
        else:
            roots.append(nodes[trace.run_id])
    for node in nodes.values():
        node.children.sort(key=lambda n: (n.step or 0, n.trace.started.created_at))
    return roots
