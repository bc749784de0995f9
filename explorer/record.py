"""Recording a `model.generate(...)` call you write yourself as a run: stored, listed, exported and drawn like ours.

    from explorer.record import recording

    with recording(model, tokenizer, store=Store(), label="transformers greedy") as rec:
        out = model.generate(input_ids, max_new_tokens=32)                       # your call, unchanged
        out = model.generate(input_ids, max_new_tokens=32, assistant_model=draft)  # each call is one run
    rec.traces[0].token_ids, rec.run_ids

Inside the block `model.generate` is wrapped on that one model object: each call runs transformers' own decoding
(greedy, sampling, beam search, assisted decoding with `assistant_model=` or `prompt_lookup_num_tokens=`, a
`custom_generate`) with `return_dict_in_generate=True, output_scores=True, output_logits=True` added, and hands back
what the call asked for. From the output and from the rounds of its candidate generator
(explorer/strategies/generate_tap.py) the recording builds a normal run: a `RunStarted` (strategy
"transformers.generate", config = the call's keyword arguments that are plain values, tags: the decoding mode, the
label), a `TokenStep` per new token of row 0 (raw logits -> top-k, entropy; the processed scores -> the kept set),
a `DraftRound` per assisted round (candidates, q,
p, transformers' own `num_matches`), and a `RunFinished` (wall time of the call, target forward passes counted by a
hook). A call that raises is stored as failed and the error goes on to the caller.

Departures: only row 0 of a batch is recorded (a tag says how many rows there were); transformers samples with the
global generator, so `seed` is what you say you seeded it with (recorded, never set). A `custom_generate` function
may ignore the output flags: its scores are then recomputed from one pass of the model over prompt + output (tag
scores=recomputed).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import torch

from explorer.events import STATUS_FAILED, STATUS_OK, RunFinished, RunStarted, TokenStep
from explorer.models import LanguageModel, ModelInfo
from explorer.recorder import Recorder, RunSink
from explorer.runner import library_versions, new_run_id
from explorer.strategies.generate_tap import (
    FORCED_OUTPUTS,
    GenerateTap,
    first_row_prompt,
    generate_events,
    prompt_tensor,
)
from explorer.trace import Trace

STRATEGY = "transformers.generate"
_PROMPT_KEYS = ("inputs", "input_ids", "attention_mask")


class Recording:
    """The runs a `recording` block recorded, one per `generate` call, in order."""

    def __init__(self, lm: LanguageModel, *, store: RunSink | None, owner: str | None, label: str,
                 seed: int | None, tags: dict[str, str]):
        self.lm, self.store, self.owner, self.label, self.seed, self.tags = lm, store, owner, label, seed, tags
        self.traces: list[Trace] = []

    @property
    def trace(self) -> Trace:
        """The last run recorded."""
        if not self.traces:
            raise ValueError("nothing was recorded: call model.generate(...) inside the `with recording(...)` block")
        return self.traces[-1]

    @property
    def run_id(self) -> str:
        return self.trace.run_id

    @property
    def run_ids(self) -> list[str]:
        return [t.run_id for t in self.traces]

    def generate(self, generate: Any, custom: bool, *args: Any, **kwargs: Any) -> Any:
        """Run `generate(*args, **kwargs)` (transformers'), record it, return what the call asked for."""
        hf = self.lm.model
        ids = prompt_tensor(args, kwargs)
        prompt_ids = first_row_prompt(ids, kwargs.get("attention_mask"))
        custom = custom or isinstance(kwargs.get("custom_generate"), str)
        setting = functools.partial(_setting, hf, kwargs)
        asked = {name: bool(setting(name)) for name in FORCED_OUTPUTS}
        eos = self.lm.eos_token_ids | _ids(kwargs.get("eos_token_id"))
        recorder = Recorder(self.store, owner=self.owner)
        start = time.perf_counter()
        with GenerateTap(hf) as tap:
            try:  # a custom_generate function may not take the output flags: it gets the call as it was
                output = generate(*args, **(kwargs if custom else {**kwargs, **FORCED_OUTPUTS}))
            except Exception as error:
                wall = time.perf_counter() - start
                recorder.start(self._started(prompt_ids, kwargs, "failed", ids.shape[0], "none", setting))
                recorder.finish(RunFinished(STATUS_FAILED, "error", f"{type(error).__name__}: {error}", "", 0, wall,
                                            0.0, tap.forward_passes))
                self.traces.append(recorder.trace)
                raise
        wall = time.perf_counter() - start
        events, source = generate_events(self.lm, output, ids.shape[1], prompt_ids, tap.rounds, eos)
        mode = _mode(tap, output, custom, setting)
        recorder.start(self._started(prompt_ids, kwargs, mode, ids.shape[0], source, setting))
        for event in events:
            recorder.observe(event)
        tokens = [e.token_id for e in events if isinstance(e, TokenStep)]
        limit = recorder.trace.started.max_new_tokens
        reason = "eos" if tokens and tokens[-1] in eos else "max_new_tokens" if len(tokens) >= limit else "stopped"
        prefill = tap.first_pass_at - start if tap.first_pass_at is not None else 0.0
        recorder.finish(RunFinished(STATUS_OK, reason, None, self.lm.decode(tokens), len(tokens), wall, prefill,
                                    tap.forward_passes))
        self.traces.append(recorder.trace)
        return output if custom else _as_asked(output, asked)

    def _started(self, prompt_ids: list[int], kwargs: dict[str, Any], mode: str, rows: int, source: str,
                 setting: Any) -> RunStarted:
        info = self.lm.info
        limit = setting("max_new_tokens")
        if limit is None:
            max_length = setting("max_length")
            limit = max(int(max_length) - len(prompt_ids), 0) if max_length is not None else 0
        tags = {**self.tags, "source": STRATEGY, "mode": mode, "scores": source}
        if self.label:
            tags["label"] = self.label
        if rows > 1:
            tags["rows"] = f"row 0 of {rows} recorded"
        if self.seed is None:
            tags["seed"] = "not given"
        config = {k: plain(v) for k, v in kwargs.items() if k not in _PROMPT_KEYS and k not in FORCED_OUTPUTS}
        config["model_generation_config"] = plain(self.lm.model.generation_config.to_diff_dict())
        return RunStarted(
            run_id=new_run_id(), strategy=STRATEGY, config=config, model_id=info.model_id,
            weights_hash=info.weights_hash, dtype=info.dtype, device=info.device, seed=self.seed or 0,
            versions=library_versions(), prompt=self.lm.decode(prompt_ids), chat=False, system_prompt=None,
            prompt_ids=list(prompt_ids), max_new_tokens=int(limit), stop_strings=[],
            created_at=datetime.now(UTC).isoformat(timespec="milliseconds"), tags=tags)


@contextmanager
def recording(model: Any, tokenizer: Any = None, *, store: RunSink | None = None, label: str = "",
              seed: int | None = None, owner: str | None = None, model_id: str | None = None,
              tags: dict[str, str] | None = None) -> Iterator[Recording]:
    """Record every `model.generate(...)` call made inside the block as a run (into `store`, a `store.Store`, when
    given). `model`: a transformers causal LM (with its `tokenizer`) or an `explorer.models.LanguageModel`;
    `label` is kept as the run's tag "label"; `seed`: the seed you gave `torch.manual_seed` (only recorded)."""
    lm = adapter(model, tokenizer, model_id)
    hf = lm.model
    rec = Recording(lm, store=store, owner=owner, label=label, seed=seed, tags=dict(tags or {}))
    saved = hf.__dict__.get("generate")  # a custom generate that from_pretrained(trust_remote_code=True) set
    hf.generate = functools.partial(rec.generate, hf.generate, saved is not None)
    try:
        yield rec
    finally:
        if saved is None:
            del hf.generate
        else:
            hf.generate = saved


def record_generate(model: Any, tokenizer: Any = None, *args: Any, store: RunSink | None = None, label: str = "",
                    seed: int | None = None, owner: str | None = None, **generate_kwargs: Any) -> tuple[Any, Trace]:
    """One recorded call: `(model.generate(*args, **generate_kwargs), its Trace)`."""
    with recording(model, tokenizer, store=store, label=label, seed=seed, owner=owner) as rec:
        output = (model.model if isinstance(model, LanguageModel) else model).generate(*args, **generate_kwargs)
    return output, rec.trace


def adapter(model: Any, tokenizer: Any = None, model_id: str | None = None) -> LanguageModel:
    """Our `LanguageModel` over a transformers causal LM and its tokenizer (or the one given)."""
    if isinstance(model, LanguageModel):
        return model
    if tokenizer is None:
        raise ValueError("recording needs the model's tokenizer: recording(model, tokenizer, ...)")
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("recording follows decoder-only models: an encoder-decoder's output holds no prompt")
    commit = getattr(config, "_commit_hash", None)
    parameter = next(model.parameters())
    info = ModelInfo(model_id or getattr(config, "_name_or_path", "") or type(model).__name__,
                     f"commit:{commit}" if commit else "", str(parameter.dtype).removeprefix("torch."),
                     str(parameter.device))
    return LanguageModel(model=model, tokenizer=tokenizer, info=info)


def plain(value: Any, depth: int = 0) -> Any:
    """A JSON-able stand-in for a generate argument: plain values as they are, a model by its name, a tensor by its
    shape, a generation config by what it changes, anything else by its type."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if depth > 4:
        return type(value).__name__
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value[:64]]
    if isinstance(value, dict):
        return {str(k): plain(v, depth + 1) for k, v in list(value.items())[:64]}
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, torch.nn.Module):
        return getattr(getattr(value, "config", None), "_name_or_path", "") or type(value).__name__
    if hasattr(value, "to_diff_dict"):  # a GenerationConfig
        return plain(value.to_diff_dict(), depth + 1)
    return type(value).__name__


def _setting(hf: Any, kwargs: dict[str, Any], name: str) -> Any:
    """A generation setting as the call resolves it: the keyword, else the call's generation_config, else the
    model's."""
    if name in kwargs:
        return kwargs[name]
    for config in (kwargs.get("generation_config"), hf.generation_config):
        if config is not None and getattr(config, name, None) is not None:
            return getattr(config, name)
    return None


def _mode(tap: GenerateTap, output: Any, custom: bool, setting: Any) -> str:
    if custom:
        return "custom_generate"
    if tap.rounds:
        return f"assisted: {tap.rounds[0].drafter}"
    if getattr(output, "beam_indices", None) is not None:
        return "beam search"
    return "sampling" if setting("do_sample") else "greedy"


def _ids(value: Any) -> frozenset[int]:
    if isinstance(value, int):
        return frozenset({value})
    if isinstance(value, (list, tuple)):
        return frozenset(int(v) for v in value)
    return frozenset()


def _as_asked(output: Any, asked: dict[str, bool]) -> Any:
    """The output the call would have given without the added flags: the sequences, or a ModelOutput without the
    scores and logits it did not ask for."""
    if not asked["return_dict_in_generate"]:
        return output.sequences
    dropped = {"scores": not asked["output_scores"], "logits": not asked["output_logits"]}
    return type(output)(**{k: v for k, v in output.items() if not dropped.get(k, False)})
