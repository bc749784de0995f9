"""A run's output as HTML: one span per token, coloured by probability or entropy, with its top-k alternatives
on hover. Model output is untrusted: every piece of text is escaped here, before it becomes HTML."""

from __future__ import annotations

import html
import math

from explorer.events import CANVAS_AUTOREGRESSIVE
from explorer.trace import Trace
from explorer.trees import node_positions
from viz.summary import speedup_against
from viz.theme import readable_text_color, sequential_rgb

COLOR_MODES = ("probability", "entropy", "origin")
ORIGIN_COLORS = {"plain": (221, 221, 221), "draft": (86, 180, 233), "bonus": (230, 159, 0)}
ORIGIN_NAMES = {"plain": "plain step", "draft": "accepted draft token", "bonus": "target's token after a round"}


def round_notes(trace: Trace) -> dict[int, list[str]]:
    """Per position: what the draft-verify rounds said there (accepted drafts, rejected drafts with p, q, u)."""
    notes: dict[int, list[str]] = {}
    for round_ in trace.rounds:
        positions = node_positions(round_.position, round_.parents)
        for i, (text, verdict) in enumerate(zip(round_.draft_texts, round_.verdicts, strict=True)):
            if verdict == "unreached":
                continue
            u = "–" if round_.u[i] is None else f"{round_.u[i]:.3f}"
            notes.setdefault(positions[i], []).append(
                f"round {round_.round}: draft {text!r} {verdict} (p={round_.p[i]:.3f}, q={round_.q[i]:.3f}, u={u})")
    return notes


def token_popover(trace: Trace, index: int, notes: dict[int, list[str]] | None = None) -> str:
    """The popover of one token (HTML, every text escaped): its probability, rank and entropy, the top-10
    alternatives as probability bars with the chosen one marked, and what draft-verify rounds said there."""
    step = trace.token_steps[index]
    head = (f"<strong>step {step.step}</strong> · {html.escape(repr(step.token_text))} · "
            f"p = {math.exp(step.logprob):.3f} · rank {step.rank} · entropy {step.entropy:.3f} nats · "
            f"kept {step.kept_count}")
    lines = [head]
    if step.origin != "plain":
        lines.append(html.escape(ORIGIN_NAMES.get(step.origin, step.origin)))
    lines += [html.escape(note) for note in (notes or {}).get(step.position, [])]
    lines += [html.escape(f"{k}: {v:.3f}") for k, v in step.details.items()]
    bars = []
    for token_id, logprob, text in zip(step.top_ids, step.top_logprobs, step.top_texts, strict=True):
        p = math.exp(logprob)
        chosen = " chosen" if token_id == step.token_id else ""
        bars.append(f'<div class="bar-row{chosen}"><span class="bar-text">{html.escape(repr(text))}</span>'
                    f'<span class="bar" style="width: {100 * p:.1f}%"></span><span>{p:.3f}</span></div>')
    return ('<span class="pop" role="tooltip">' + "<br>".join(lines)
            + f'<span class="bars">{"".join(bars)}</span></span>')


def tokens_html(trace: Trace | None, color_by: str = "probability", popovers: bool = True) -> str:
    """The tokens, coloured; with `popovers`, clicking (or tabbing to) a token opens its popover, which stays
    open while it has focus, so it can be read, copied and used on touch screens."""
    if color_by not in COLOR_MODES:
        raise ValueError(f"color_by must be one of {', '.join(COLOR_MODES)}")
    if trace is not None and trace.engine_record is not None:  # an imported record: its text, no distributions
        engine = html.escape(str(trace.started.tags.get("external", "an engine")))
        text = html.escape(trace.text).replace("\n", "↵<br>") or "<i>(the record holds no text)</i>"
        return (f'<div class="run-status">imported from {engine}: the text only (engines report no per-token '
                f'distributions)</div><div class="tokens" style="white-space: pre-wrap">{text}</div>')
    if trace is None or not trace.token_steps:
        return '<div class="tokens empty">No tokens yet.</div>'
    steps = trace.token_steps
    top_entropy = max((s.entropy for s in steps), default=1.0) or 1.0
    notes = round_notes(trace)
    spans = []
    for index, step in enumerate(steps):
        if color_by == "origin":
            rgb = ORIGIN_COLORS.get(step.origin, ORIGIN_COLORS["plain"])
        else:  # how sure the model was: bright for likely tokens / low entropy
            value = math.exp(step.logprob) if color_by == "probability" else 1.0 - step.entropy / top_entropy
            rgb = sequential_rgb(value)
        text = html.escape(step.token_text).replace("\n", "↵<br>")
        popover = token_popover(trace, index, notes) if popovers else ""
        spans.append(
            f'<span class="tok" tabindex="0" data-step="{step.step}" style="background: rgb{rgb}; '
            f'color: {readable_text_color(rgb)}">{text}{popover}</span>'
        )
    status = ""
    if trace.finished is not None and trace.finished.status != "ok":
        status = (f'<div class="run-status">{html.escape(trace.finished.status)} at step {len(steps)}: '
                  f"{html.escape(trace.finished.error or '')}</div>")
    return f'<div class="tokens" style="white-space: pre-wrap; line-height: 1.9">{"".join(spans)}</div>{status}'


def color_legend_html(color_by: str) -> str:
    """The key to token colours: a low-to-high ramp for probability and entropy, swatches for origin."""
    if color_by == "origin":
        swatches = "".join(
            f'<span class="key-swatch" style="background: rgb{ORIGIN_COLORS[origin]}; color: '
            f'{readable_text_color(ORIGIN_COLORS[origin])}">{html.escape(ORIGIN_NAMES[origin])}</span>'
            for origin in ("plain", "draft", "bonus"))
        return f'<div class="color-key">{swatches}</div>'
    low, high = ("low probability", "high probability") if color_by == "probability" else (
        "high entropy (unsure)", "low entropy (sure)")
    stops = ", ".join(f"rgb{sequential_rgb(i / 4)}" for i in range(5))
    return (f'<div class="color-key"><span>{low}</span><span class="key-ramp" style="background: '
            f'linear-gradient(to right, {stops})"></span><span>{high}</span></div>')


def metrics_html(trace: Trace | None, baseline: Trace | None = None, live: tuple[float, int] | None = None) -> str:
    """A lane's numbers. While it runs, `live` = (compute seconds, target passes) so far keeps tokens/s and the
    pass count current, with the step reached out of the run's maximum."""
    if trace is None:
        return ""
    m = trace.metrics()

    def number(value: object, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "–"

    tokens_per_s, passes = m["tokens_per_s"], m["target_forward_passes"]
    if trace.finished is None and live is not None:
        busy, passes = live
        tokens_per_s = m["new_tokens"] / busy if busy > 0 else float("nan")
    cells = [
        ("tokens", str(m["new_tokens"])),
        ("tokens/s", number(tokens_per_s, ".1f")),
        ("forward passes", str(passes)),
        ("mean entropy", number(m["mean_entropy"], ".3f")),
        ("perplexity", number(m["perplexity"], ".3f")),
    ]
    if trace.finished is None:
        cells.insert(0, ("step", f"{m['new_tokens']} / {trace.started.max_new_tokens}"))
    if trace.rounds or (trace.engine_record is not None and trace.engine_record.steps):
        cells.append(("mean accepted", number(m["mean_accepted_tokens"], ".2f")))
    speedup = speedup_against(trace, baseline)
    if speedup is not None:
        cells.append(("speedup vs greedy", f"{speedup:.2f}x"))
    cells.append(("run", html.escape(trace.run_id)))
    body = "".join(f'<div class="metric"><b>{html.escape(k)}</b><br>{v}</div>' for k, v in cells)
    config = trace.started.config
    warning = ""
    drafts_with_itself = "draft_model" in config and str(config["draft_model"]).strip() in ("", "target")
    if drafts_with_itself and not str(config.get("skip", "")).strip():
        warning = ('<div class="lane-warning">⚠ the draft is the target itself: every draft is accepted and no '
                   "time is saved. Use draft_model 'auto' (the model's shipped EAGLE head, else layer-skip) or a "
                   "smaller model with the same vocabulary.</div>")
    if trace.started.tags.get("canvas") == CANVAS_AUTOREGRESSIVE:
        warning += ('<div class="lane-warning">⚠ an autoregressive model read as a canvas: expect one token per '
                    "step, from left to right. This is not how the method behaves on a diffusion LM: load one "
                    "(a masked LM, LLaDA, Dream, dllm's AR-to-diffusion models) to see real unmasking.</div>")
    return f'<div class="lane-metrics">{body}</div>{warning}'
