"""Command line: `python -m explorer run|runs|show|strategies`.

Bad input exits with status 2 and one line saying what to fix; a run that fails is stored as failed and exits
with status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any


def _parse_params(pairs: Sequence[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param takes key=value, got {pair!r} (e.g. --param top_p=0.9)")
        params[key.strip()] = value.strip()
    return params


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m explorer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="decode one prompt with one strategy and store the trace")
    run.add_argument("--strategy", required=True, help="registry name, see `strategies`")
    run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="a strategy parameter (repeatable)")
    run.add_argument("--prompt", required=True)
    run.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap the prompt in the model's chat template (default: when it has one)")
    run.add_argument("--system", default=None, help="system prompt (with --chat)")
    run.add_argument("--model", default=None, help="HF model id or local path (default: the embedded model)")
    run.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument("--max-new-tokens", type=int, default=128)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    run.add_argument("--db", default=None, help="SQLAlchemy URL (default: $DECODING_EXPLORER_DB or the cache)")
    run.add_argument("--no-store", action="store_true", help="do not write the run to the database")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    runs = sub.add_parser("runs", help="list stored runs")
    runs.add_argument("--db", default=None)
    runs.add_argument("--strategy", default=None)
    runs.add_argument("--model", default=None)
    runs.add_argument("--search", default=None, help="text in the prompt or output")
    runs.add_argument("--limit", type=int, default=50)
    runs.add_argument("--json", action="store_true")

    show = sub.add_parser("show", help="print a stored run's per-step table")
    show.add_argument("run_id")
    show.add_argument("--db", default=None)
    show.add_argument("--json", action="store_true")

    sub.add_parser("strategies", help="list strategies and their parameters")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        return {"run": cmd_run, "runs": cmd_runs, "show": cmd_show, "strategies": cmd_strategies}[args.command](
            args
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the run was stored as cancelled", file=sys.stderr)
        return 130


def cmd_run(args: argparse.Namespace) -> int:
    from explorer.events import STATUS_OK, TokenStep
    from explorer.models import load_model
    from explorer.recorder import Recorder
    from explorer.runner import run_strategy
    from explorer.strategies import make_config
    from store import Store

    config = make_config(args.strategy, _parse_params(args.param))  # validate before loading a model
    if not args.prompt.strip():
        raise ValueError("the prompt is empty: give some text with --prompt")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    store = None if args.no_store else Store(args.db)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    recorder = Recorder(store)
    progress = _progress(args.max_new_tokens, disable=args.quiet)
    failure: Exception | None = None
    try:
        for event in run_strategy(
            model, args.strategy, config, args.prompt, chat=args.chat, system_prompt=args.system,
            max_new_tokens=args.max_new_tokens, seed=args.seed, stop_strings=args.stop, recorder=recorder,
        ):
            if isinstance(event, TokenStep):
                progress.update(1)
    except ValueError:
        raise
    except Exception as error:  # the run is already stored as failed; report it in one line
        failure = error
    finally:
        progress.close()
    trace = recorder.trace
    metrics = trace.metrics()
    if args.json:
        print(json.dumps({
            "run_id": trace.run_id, "strategy": args.strategy, "status": trace.status, "text": trace.text,
            "token_ids": trace.token_ids, "prompt_token_ids": trace.started.prompt_ids,
            "stop_reason": trace.finished.stop_reason if trace.finished else None,
            "error": trace.finished.error if trace.finished else None, "metrics": _jsonable(metrics),
        }, ensure_ascii=False))
    else:
        print(trace.text)
        print(_summary_line(trace.run_id, metrics, store), file=sys.stderr)
    if failure is not None or trace.status != STATUS_OK:
        print(f"error: the run failed: {trace.finished.error if trace.finished else failure}", file=sys.stderr)
        return 1
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from store import Store

    rows = Store(args.db).list_runs(strategy=args.strategy, model=args.model, text=args.search, limit=args.limit)
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], ensure_ascii=False))
        return 0
    print(f"{'run_id':12}  {'created (UTC)':19}  {'strategy':12}  {'status':9}  {'tokens':>6}  prompt")
    for row in rows:
        prompt = row.prompt.replace("\n", " ")
        prompt = prompt[:50] + "…" if len(prompt) > 50 else prompt
        created = row.created_at[:19].replace("T", " ")
        print(f"{row.run_id:12}  {created:19}  {row.strategy:12}  {row.status:9}  {row.new_tokens:>6}  {prompt}")
    if not rows:
        print("(no stored runs)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from store import Store

    trace = Store(args.db).load_trace(args.run_id)
    if args.json:
        print(json.dumps({"run_id": trace.run_id, "metrics": _jsonable(trace.metrics()), "steps": trace.table()},
                         ensure_ascii=False))
        return 0
    started = trace.started
    print(f"run {trace.run_id}: {started.strategy} {started.config} on {started.model_id}, seed {started.seed}, "
          f"status {trace.status}")
    print(f"{'step':>4}  {'token':16}  {'id':>6}  {'prob':>7}  {'rank':>4}  {'entropy':>7}  {'kept':>6}")
    for row in trace.table():
        token = repr(row["token"])[1:-1][:16]
        print(f"{row['step']:>4}  {token:16}  {row['token_id']:>6}  {row['prob']:>7.4f}  {row['rank']:>4}  "
              f"{row['entropy']:>7.3f}  {row['kept_count']:>6}")
    print(_summary_line(trace.run_id, trace.metrics(), None))
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    import dataclasses

    from explorer.strategies import REGISTRY

    for name, spec in sorted(REGISTRY.items()):
        print(f"{name}: {spec.summary}")
        for field in dataclasses.fields(spec.config):
            print(f"    {field.name} = {field.default!r}  {field.metadata.get('help', '')}")
    return 0


def _summary_line(run_id: str, metrics: dict[str, Any], store: Any) -> str:
    where = f" (stored in {store.url})" if store is not None else ""
    return (f"run {run_id}: {metrics['new_tokens']} tokens, {metrics['tokens_per_s']:.1f} tok/s, "
            f"{metrics['target_forward_passes']} forward passes, mean entropy {metrics['mean_entropy']:.3f}, "
            f"perplexity {metrics['perplexity']:.3f}, status {metrics['status']}{where}")


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def _progress(total: int, disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc="decoding", disable=disable, file=sys.stderr, leave=False)
