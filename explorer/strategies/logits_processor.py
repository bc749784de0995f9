"""A transformers `LogitsProcessor` as a lane: name a processor class and its keyword arguments, decode with it.

No paper of its own: it runs the processor you name (transformers' docstring of each class cites its paper, e.g.
`TypicalLogitsWarper`: Meister et al. 2023, arXiv:2202.00666). Each step, as transformers' `GenerationMixin._sample`
does: scores = processor(input_ids (1, context), raw logits (1, vocab)), then our sampling filters (temperature,
top-k, top-p, ...; neutral by default), then a draw from softmax(scores) with the run's seeded generator (rule
"sample") or their argmax (rule "greedy"). The TokenStep records the raw distribution and the processed one it was
drawn from (its top-k and kept set).

What may be named: a subclass of `LogitsProcessor` defined in `transformers.generation.logits_process` (the full
path, `transformers.Name` or the bare name), less those JSON cannot configure (`EXCLUDED`: they take a model, a
function or a config object), or a class a plugin registered with `register_logits_processor`. The text is looked
up in those two places only: nothing is imported by the name given. The keyword arguments are one JSON object of
plain values, bounded (`parse_kwargs`); a `device` argument is the model's. A class that cannot run on one sequence
with them (a trial call before the run is stored) is refused in one line.
Departure from transformers' order: our sampling filters, the repetition penalty among them, act after the named
processor; transformers applies its own repetition penalty before a user's processors.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from explorer.events import Event
from explorer.params import one_line, param
from explorer.sampling import SamplingFilters, sample
from explorer.strategies.base import Choice, autoregressive, register

PROCESSOR_MODULE = "transformers.generation.logits_process"
PREFIXES = ("", "transformers", "transformers.generation", PROCESSOR_MODULE)  # where a shipped class may be named
# Shipped classes that JSON cannot configure: the abstract base, and those taking a model, a function or a
# GenerationConfig.
EXCLUDED = frozenset({"LogitsProcessor", "UnbatchedClassifierFreeGuidanceLogitsProcessor",
                      "PrefixConstrainedLogitsProcessor", "WhisperTimeStampLogitsProcessor"})
PLUGIN_PROCESSORS: dict[str, type] = {}  # "module.Name" -> class, filled by register_logits_processor
MAX_KEYS, MAX_ITEMS, MAX_DEPTH, MAX_STRING = 16, 256, 3, 64
MAX_INT, MAX_FLOAT = 2**24, 1e6  # memory a processor allocates grows with its integer arguments (sizes, widths)
RULES = ("sample", "greedy")


def register_logits_processor(cls: type) -> type:
    """Allow a LogitsProcessor subclass of your own in the `logits_processor` lane, named "module.ClassName" (a
    plugin calls this when it is imported; usable as a class decorator)."""
    from transformers.generation.logits_process import LogitsProcessor

    if not (inspect.isclass(cls) and issubclass(cls, LogitsProcessor)):
        raise ValueError(f"register_logits_processor takes a subclass of transformers' LogitsProcessor, got {cls!r}")
    name = f"{cls.__module__}.{cls.__qualname__}"
    if PLUGIN_PROCESSORS.get(name, cls) is not cls:
        raise ValueError(f"logits processor {name!r} is already registered: give this one another name")
    PLUGIN_PROCESSORS[name] = cls
    return cls


def resolve_processor(path: str) -> type:
    """The class a processor path names, looked up among the allowed ones only; ValueError otherwise."""
    text = path.strip()
    if text in PLUGIN_PROCESSORS:
        return PLUGIN_PROCESSORS[text]
    prefix, _, name = text.rpartition(".")
    if prefix in PREFIXES and name not in EXCLUDED:
        module = importlib.import_module(PROCESSOR_MODULE)  # a fixed module: never one named by the input
        found = vars(module).get(name)
        if inspect.isclass(found) and issubclass(found, module.LogitsProcessor) \
                and found.__module__ == PROCESSOR_MODULE:
            return found
    raise ValueError(f"processor must name a LogitsProcessor of {PROCESSOR_MODULE} (e.g. TypicalLogitsWarper) or one "
                     f"a plugin registered; {path[:80]!r} is neither")


def parse_kwargs(text: str) -> dict[str, Any]:
    """The processor's keyword arguments: one JSON object of plain values (numbers, flags, short strings, nulls
    and lists of them), bounded in size; ValueError naming what to fix."""
    def refuse_constant(name: str) -> None:
        raise ValueError(f"processor_kwargs must hold finite numbers, not {name}")

    try:
        value = json.loads(text or "{}", parse_constant=refuse_constant)
    except json.JSONDecodeError as error:
        raise ValueError(f"processor_kwargs must be a JSON object, e.g. {{\"mass\": 0.9}} ({error.msg})") from None
    if not isinstance(value, dict):
        raise ValueError("processor_kwargs must be a JSON object, e.g. {\"mass\": 0.9}")
    if len(value) > MAX_KEYS:
        raise ValueError(f"processor_kwargs may hold at most {MAX_KEYS} arguments")
    for key, item in value.items():
        if not key.isidentifier() or key.startswith("_"):
            raise ValueError(f"processor_kwargs: {key[:32]!r} is not an argument name")
        if key == "device":
            raise ValueError("processor_kwargs: device is the model's; leave it out")
        _check_value(key, item, 0)
    return value


def _check_value(key: str, item: Any, depth: int) -> None:
    if item is None or isinstance(item, bool):
        return
    if isinstance(item, int):
        if abs(item) > MAX_INT:
            raise ValueError(f"processor_kwargs: {key} must be an integer within ±{MAX_INT}")
    elif isinstance(item, float):
        if not math.isfinite(item) or abs(item) > MAX_FLOAT:
            raise ValueError(f"processor_kwargs: {key} must be a finite number within ±{MAX_FLOAT:g}")
    elif isinstance(item, str):
        if len(item) > MAX_STRING:
            raise ValueError(f"processor_kwargs: {key} must be a string of at most {MAX_STRING} characters")
    elif isinstance(item, list):
        if depth >= MAX_DEPTH or len(item) > MAX_ITEMS:
            raise ValueError(f"processor_kwargs: {key} must be a list of at most {MAX_ITEMS} items, nested at most "
                             f"{MAX_DEPTH} deep")
        for element in item:
            _check_value(key, element, depth + 1)
    else:
        raise ValueError(f"processor_kwargs: {key} must be a number, a flag, a string, null or a list of them")


def build_processor(processor: str, processor_kwargs: str, device: str | torch.device = "cpu") -> Any:
    """An instance of the named processor with these arguments (a `device` argument gets `device`)."""
    cls = resolve_processor(processor)
    kwargs = parse_kwargs(processor_kwargs)
    try:
        if "device" in inspect.signature(cls).parameters:
            kwargs["device"] = str(device)
        return cls(**kwargs)
    except Exception as error:  # TypeError (missing, unknown arguments), ValueError (out of range), ...
        raise ValueError(f"{cls.__name__} refused these arguments: {one_line(error, 160)}") from None


@dataclass(frozen=True)
class LogitsProcessorConfig(SamplingFilters):
    processor: str = param(f"{PROCESSOR_MODULE}.TypicalLogitsWarper",
                           "a LogitsProcessor class: transformers.generation.logits_process.Name, or one a plugin "
                           "registered", max_length=160)
    processor_kwargs: str = param('{"mass": 0.9}', "its keyword arguments as a JSON object of plain values",
                                  max_length=512)
    rule: str = param("sample", "sample: draw from the processed distribution; greedy: take its argmax",
                      choices=RULES)

    def __post_init__(self) -> None:
        super().__post_init__()
        build_processor(self.processor, self.processor_kwargs)  # a bad class or bad arguments: refused here


def prepare(model: Any, config: LogitsProcessorConfig) -> None:
    """One trial call on this model's vocabulary before the run is stored: a processor that cannot run on one
    sequence (a batch-pairing guidance processor, an argument of the wrong shape) is refused in one line."""
    processor = build_processor(config.processor, config.processor_kwargs, model.device)
    vocab = model.model.get_output_embeddings().weight.shape[0]
    ids = torch.zeros((1, 2), dtype=torch.long, device=model.device)
    try:
        out = processor(ids, torch.zeros((1, vocab), device=model.device))
    except Exception as error:
        raise ValueError(f"{type(processor).__name__} cannot run on one sequence with these arguments: "
                         f"{one_line(error, 160)}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, vocab):
        raise ValueError(f"{type(processor).__name__} must return scores of shape (1, vocab)")


@register("logits_processor", LogitsProcessorConfig,
          "a transformers LogitsProcessor by class path and JSON arguments, then sample or argmax",
          family="sampling", prepare=prepare,
          paper="the named processor's (transformers' docstring cites it), e.g. Meister et al. 2023, arXiv:2202.00666",
          reference_code=("huggingface/transformers: src/transformers/generation/logits_process.py: the named class; "
                          "utils.py: GenerationMixin._sample"),
          departures=("our sampling filters (the repetition penalty among them) act after the named processor; "
                      "transformers applies its repetition penalty before a user's processors",))
def run(model: Any, prompt_ids: Sequence[int], config: LogitsProcessorConfig, rng: torch.Generator
        ) -> Iterator[Event]:
    processor = build_processor(config.processor, config.processor_kwargs, model.device)

    def choose(logits: torch.Tensor, context: list[int]) -> Choice:
        ids = torch.tensor([context], device=logits.device)  # (1, context)
        processed = processor(ids, logits[None].clone())[0]  # (vocab,); the clone: some processors write in place
        kept = config.apply(processed, context)
        token = int(torch.argmax(kept)) if config.rule == "greedy" else sample(kept, rng)
        return Choice(token, kept)

    yield from autoregressive(model, prompt_ids, choose)
