"""Command line: `python -m explorer run|branch|runs|show|strategies|export|import|figure|sweep|report|
drafter-data|train-drafter|check`.

run decodes one prompt and stores its trace; branch continues a stored run from a step with another token;
runs lists stored runs and show prints one's per-step table;
strategies lists the strategies and their parameters; export writes runs as CSV, Parquet, JSONL or bundles, and
import loads a bundle; figure exports a view for a paper; sweep runs prompts x strategies x seeds (resumable)
and report writes its tables and figures; drafter-data writes a draft head's training data (the model's own answers)
and train-drafter trains an EAGLE or Medusa head on it; check runs the tests' harness on a strategy (explorer/check.py)
and prints a verdict table (status 1 when a check fails). Bad input exits with status 2 and one line saying what to
fix; a run that fails is stored as failed and exits with status 1. Plugins (explorer/plugins.py: the global
`--plugin PATH_OR_MODULE`, $DECODING_EXPLORER_PLUGINS, installed entry points) load before the command; one that
fails is one warning line, and the command goes on.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from explorer.metrics import jsonable


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
    parser.add_argument("--plugin", action="append", default=[], metavar="PATH_OR_MODULE",
                        help="load a plugin (a .py file or a module) before the command, after those "
                             "$DECODING_EXPLORER_PLUGINS names (repeatable; give it before the command)")
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
    run.add_argument("--trust-remote-code", action="store_true",
                     help="let a model that ships its own code (LLaDA, Dream) run it: only for models you trust")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument("--max-new-tokens", type=int, default=128)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    run.add_argument("--db", default=None, help="SQLAlchemy URL (default: $DECODING_EXPLORER_DB or the cache)")
    run.add_argument("--no-store", action="store_true", help="do not write the run to the database")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--lens", action="store_true", help="also record the logit lens (a second pass per token)")
    run.add_argument("--attention", action="store_true",
                     help="also record each token's most attended positions (a second pass, eager attention)")
    run.add_argument("--attention-layers", default="", help="with --attention: e.g. 0-11 (default: every layer)")

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

    branch = sub.add_parser("branch", help="what if: continue a stored run from STEP with another TOKEN there")
    branch.add_argument("run_id")
    branch.add_argument("--step", type=int, required=True, help="the step (0 = the first generated token)")
    branch.add_argument("--token", required=True,
                        help="the token to force there: a recorded alternative's text, any text that is one token, "
                             "or a token id")
    branch.add_argument("--strategy", default=None, help="decode on with this strategy (default: the parent's)")
    branch.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    branch.add_argument("--model", default=None, help="default: the parent's model")
    branch.add_argument("--dtype", default="auto")
    branch.add_argument("--device", default="auto")
    branch.add_argument("--max-new-tokens", type=int, default=None, help="default: the parent's")
    branch.add_argument("--db", default=None)
    branch.add_argument("--json", action="store_true")
    branch.add_argument("--quiet", action="store_true")
    branch.add_argument("--no-store", action="store_true", help=argparse.SUPPRESS)
    branch.add_argument("--lens", action="store_true")
    branch.add_argument("--attention", action="store_true")

    listing = sub.add_parser("strategies", help="list strategies and their parameters (--fidelity: the ledger)")
    listing.add_argument("--fidelity", action="store_true",
                         help="print the fidelity ledger: each strategy's paper, the authors' code it follows, "
                              "and every departure from them")
    listing.add_argument("--markdown", action="store_true", help="with --fidelity: as one Markdown table")

    export = sub.add_parser("export", help="export runs: per-step table (csv, parquet), events (jsonl), bundles, "
                                           "Spec-Bench answer files (specbench), the engines' per-request records "
                                           "(vllm, sglang, aiperf), a Hugging Face dataset folder (hf-dataset)")
    export.add_argument("run_ids", nargs="*", help="run ids (default with --all: every stored run)")
    export.add_argument("--all", action="store_true", help="export every stored run")
    export.add_argument("--format", required=True, choices=["csv", "parquet", "jsonl", "bundle", "specbench", "lens",
                                                            "attention", "unmask", "vllm", "sglang", "aiperf",
                                                            "hf-dataset"])
    export.add_argument("--out", required=True,
                        help="output file (a directory for several bundles, Spec-Bench answer files and hf-dataset)")
    export.add_argument("--push-to-hub", default=None, metavar="REPO",
                        help="hf-dataset: also upload the folder to this Hub dataset repository (a token from the "
                             "environment, e.g. HF_TOKEN; never stored)")
    export.add_argument("--db", default=None)

    imp = sub.add_parser("import", help="load a run bundle (zip), or an engine's per-request records (vllm, sglang, "
                                        "aiperf) or Spec-Bench answers as external runs, into a database")
    imp.add_argument("bundle", metavar="FILE")
    imp.add_argument("--format", default="bundle", choices=["bundle", "vllm", "sglang", "aiperf", "specbench"],
                     help="bundle (default): a run exported with --format bundle; the others: an engine's records")
    imp.add_argument("--method", default=None, help="label the imported runs (default: the engine's name; "
                                                   "Spec-Bench: the answer file's method)")
    imp.add_argument("--model", default=None, help="the model id, where the records do not name it")
    imp.add_argument("--category", default=None, help="the prompt category of every record in the file (e.g. one "
                                                     "SPEED-Bench category per AIPerf run), for the report's matrix")
    imp.add_argument("--db", default=None)

    figure = sub.add_parser("figure", help="export a view of stored runs as SVG, PDF or PNG (paper theme)")
    figure.add_argument("run_ids", nargs="+", help="one run per lane")
    figure.add_argument("--view", required=True, help="view name, e.g. heatmap, entropy, beam-tree")
    figure.add_argument("--out", required=True, help="file name ending in .svg, .pdf or .png")
    figure.add_argument("--width", default="one", choices=["one", "two"], help="one- or two-column width")
    figure.add_argument("--lane", type=int, default=1, help="lane shown by per-lane views")
    figure.add_argument("--db", default=None)

    sweep = sub.add_parser("sweep", help="run prompts x strategies x seeds into a database (resumable)")
    sweep.add_argument("--prompts", default=None,
                       help="JSON lines {category, name, prompt}, a Spec-Bench or SPEED-Bench question file (JSON "
                            "lines, or SPEED-Bench's .parquet), or one prompt per line "
                            "(default: ../shared/spec_bench/question.jsonl beside the repository, when there)")
    sweep.add_argument("--per-category", type=int, default=None, metavar="N",
                       help="only the first N prompts of each category (a stratified subset)")
    sweep.add_argument("--task", default=None, metavar="NAME|FILE",
                       help="instead of --prompts, a task checked offline (explorer/tasks.py): arithmetic, extract, "
                            "json or code (built in), or a GSM8K-style JSON-lines file of {question, answer}; "
                            "prints accuracy per method at the end, and `report` writes tasks.md")
    sweep.add_argument("--limit", type=int, default=None, metavar="N", help="with --task: its first N items")
    sweep.add_argument("--strategies", required=True, help="e.g. 'greedy; sample:top_p=0.9; prompt_lookup'")
    sweep.add_argument("--seeds", type=int, default=1)
    sweep.add_argument("--model", default=None)
    sweep.add_argument("--max-new-tokens", type=int, default=64)
    sweep.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None)
    sweep.add_argument("--db", default=None)
    sweep.add_argument("--quiet", action="store_true")
    sweep.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="run the matrix on Ray actors (pip install 'decoding-explorer[ray]'): a local Ray "
                            "without ADDRESS, else a cluster (HOST:6379 or auto)")
    sweep.add_argument("--workers", type=int, default=2,
                       help="with --ray: actors, each holding one loaded model (one per GPU or CPU slot)")
    sweep.add_argument("--gpus-per-worker", type=float, default=0.0, help="with --ray: GPUs each actor takes")
    sweep.add_argument("--device", default="auto", help="auto, cpu or cuda")

    train = sub.add_parser("train-drafter", help="train an EAGLE-style draft head for a model (resumable)")
    train.add_argument("--kind", default="eagle", choices=["eagle", "medusa"], help="the head to train")
    train.add_argument("--heads", type=int, default=3, help="medusa: number of heads K")
    train.add_argument("--model", default=None, help="HF model id or local path (default: the embedded model)")
    train.add_argument("--out", required=True, help="directory for the head, its manifest and the checkpoint")
    train.add_argument("--corpus-tokens", type=int, default=20000, help="tokens of local text, teacher-forced")
    train.add_argument("--answers", type=int, default=0, help="self-generated chat answers to add")
    train.add_argument("--vocab", type=int, default=8192, help="draft vocabulary size K")
    train.add_argument("--data", default=None, help="self-distillation files from `drafter-data` (.npz, comma-"
                       "separated) to train on instead of local text and fresh answers")
    train.add_argument("--fraction", type=float, default=1.0, help="with --data: the share of it to train on")
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--batch", type=int, default=1, help="sequences per step")
    train.add_argument("--minutes", type=float, default=None, help="stop after this much training time")
    train.add_argument("--unroll", type=int, default=1, help="eagle: draft steps trained on the head's own "
                       "predicted features (1: EAGLE's teacher forcing only)")
    train.add_argument("--labels", default="soft", choices=["soft", "hard"], help="eagle: the classification "
                       "target, the target's next-token distribution over V_d (soft, EAGLE's) or its argmax (hard)")
    train.add_argument("--lr", type=float, default=3e-4)
    train.add_argument("--device", default="auto", help="auto, cpu or cuda")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    distill = sub.add_parser("drafter-data", help="write a draft head's training data: the model's own answers to "
                             "prompts made on this machine (.npz)")
    distill.add_argument("--model", default=None, help="HF model id or local path (default: the embedded model)")
    distill.add_argument("--out", required=True, help="the .npz file to write")
    distill.add_argument("--prompts", type=int, default=2000, help="about this many prompts")
    distill.add_argument("--samples", type=int, default=1, help="sampled answers per prompt, beside the greedy one")
    distill.add_argument("--temperature", type=float, default=0.7, help="for the sampled answers")
    distill.add_argument("--max-new-tokens", type=int, default=256)
    distill.add_argument("--batch", type=int, default=64, help="prompts generated at once")
    distill.add_argument("--questions", default=None, help="also every turn of a question file in Spec-Bench's "
                         "format (one JSON object with `turns` per line)")
    distill.add_argument("--seed", type=int, default=0, help="another seed gives other questions, texts and picks")
    distill.add_argument("--device", default="auto", help="auto, cpu or cuda")
    distill.add_argument("--dtype", default="float32", help="float32 or bfloat16 (stored features are the "
                         "generation's: with bfloat16 add --no-features, so training recomputes them in float32)")
    distill.add_argument("--no-features", action="store_true", help="store tokens only (training then recomputes "
                         "the features per batch: the choice on a GPU, where the file stays small)")
    distill.add_argument("--quiet", action="store_true", help="no progress bar")
    distill.add_argument("--text", default=None, help="instead of answers: teacher-forced chunks of local text "
                         "(files or folders of .txt/.md/.rst, comma-separated); the head learns the target's own "
                         "distribution on them (soft labels)")
    distill.add_argument("--text-tokens", type=int, default=1_000_000, help="with --text: tokens in all")
    distill.add_argument("--licence", default="", help="with --text: the text's licence, kept in the data's record")

    report = sub.add_parser("report", help="write LaTeX/Markdown tables and figures of a sweep's runs")
    report.add_argument("--db", default=None)
    report.add_argument("--out", required=True, help="output directory")
    report.add_argument("--formats", default="svg,pdf,png", help="figure formats, comma-separated")
    report.add_argument("--mauve-reference", default=None, metavar="FILE",
                        help="reference texts (one JSON string or {\"text\": ...} per line, or plain lines) to "
                             "score each method's outputs against with MAUVE, on the features of --model")
    report.add_argument("--model", default=None, help="with --mauve-reference: the model whose features MAUVE "
                                                      "compares (default: the embedded model)")

    check = sub.add_parser("check", help="check a strategy's claims with the tests' harness: parameter bounds, "
                                         "greedy identity, exact sampling, store round trip")
    check.add_argument("--strategy", required=True, help="registry name (a plugin's too), see `strategies`")
    check.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="a strategy parameter (repeatable)")
    check.add_argument("--lossless", action="store_true",
                       help="claim: under the greedy rule its tokens equal greedy decoding's")
    check.add_argument("--exact-sampling", action="store_true",
                       help="claim: under the sampling rule its output is distributed as the target's")
    check.add_argument("--model", default=None,
                       help="with --lossless: the real model to check on (default: the embedded model, if installed)")
    check.add_argument("--architectures", default=None,
                       help="with --lossless: tiny model families, comma-separated (default: llama, mistral, qwen3, "
                            "gemma3_text, gpt2, gpt_neox)")
    check.add_argument("--runs", type=int, default=2000, help="with --exact-sampling: seeds sampled")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as typed (a dataset card names it)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    from explorer.plugins import load_plugins, specs_from_env

    for failure in load_plugins([*specs_from_env(), *args.plugin]):  # one line each; the command goes on
        print(f"warning: {one_line(failure)}", file=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is enough
    from sqlalchemy.exc import SQLAlchemyError

    from store.repository import database_error

    previous = signal.signal(signal.SIGTERM, _interrupt)  # a kill stores the run as cancelled, as Ctrl-C does
    try:
        commands = {"run": cmd_run, "runs": cmd_runs, "show": cmd_show, "strategies": cmd_strategies,
                    "export": cmd_export, "import": cmd_import, "figure": cmd_figure, "sweep": cmd_sweep,
                    "report": cmd_report, "branch": cmd_branch, "train-drafter": cmd_train_drafter,
                    "drafter-data": cmd_drafter_data, "check": cmd_check}
        return commands[args.command](args)
    except ValueError as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except SQLAlchemyError as error:
        print(f"error: the database refused: {database_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def one_line(text: str) -> str:
    """Errors print as one line: control characters (from files, prompts, model names) are escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def cmd_train_drafter(args: argparse.Namespace) -> int:
    from explorer.models import load_model
    from explorer.train_drafter import train

    for name in ("corpus_tokens", "vocab", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not 1 <= args.heads <= 8:
        raise ValueError("--heads must be between 1 and 8")
    if not 0 < args.fraction <= 1:
        raise ValueError("--fraction must be in (0, 1]")
    if not 1 <= args.batch <= 4096 or not 1 <= args.unroll <= 8:
        raise ValueError("--batch must be between 1 and 4096, --unroll between 1 and 8")
    for name in args.data.split(",") if args.data else ():  # several files: comma-separated
        if not Path(name).is_file():
            raise ValueError(f"--data {name}: no such file (write one with `python -m explorer drafter-data`)")
    model = load_model(args.model, dtype="float32", device=args.device)
    record = train(model, args.out, kind=args.kind, heads=args.heads, corpus_tokens=args.corpus_tokens,
                   answers=args.answers, data=args.data, fraction=args.fraction, vocab=args.vocab,
                   steps=args.steps, batch=args.batch, minutes=args.minutes, unroll=args.unroll, lr=args.lr,
                   labels=args.labels, progress=not args.quiet, command=_command_line())
    last = record["curve"][-1] if record["curve"] else {}
    print(f"head written to {args.out}: {record['train_tokens']} training tokens, held-out top-1 agreement "
          f"{last.get('agreement', float('nan')):.3f}; use it with --strategy {args.kind} --param drafter={args.out}")
    return 0


def _command_line() -> str:
    """This command as typed (recorded with a draft head and its data, so both can be made again)."""
    import shlex

    return "python -m explorer " + shlex.join(sys.argv[1:])


def cmd_drafter_data(args: argparse.Namespace) -> int:
    from explorer.drafter_data import self_distill
    from explorer.models import load_model

    if not 1 <= args.prompts <= 1_000_000 or not 0 <= args.samples <= 16 or not 1 <= args.batch <= 4096:
        raise ValueError("--prompts must be between 1 and 1000000, --samples between 0 and 16, --batch between 1 "
                         "and 4096")
    if not 1 <= args.max_new_tokens <= 4096 or not 0 < args.temperature <= 4:
        raise ValueError("--max-new-tokens must be between 1 and 4096, --temperature in (0, 4]")
    if args.questions and not Path(args.questions).is_file():
        raise ValueError(f"--questions {args.questions}: no such file")
    if args.text:
        return _text_data(args)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    record = self_distill(model, args.out, prompts=args.prompts, samples=args.samples, temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, batch=args.batch, questions=args.questions,
                          seed=args.seed, features=not args.no_features, progress=not args.quiet,
                          command=_command_line())
    print(f"wrote {args.out}: {record['sequences']} sequences, {record['tokens']} tokens "
          f"({record['answer_tokens']} answer tokens) from {record['prompts']} prompts; train a head on it with "
          f"`python -m explorer train-drafter --data {args.out} --out DIR`")
    return 0


def _text_data(args: argparse.Namespace) -> int:
    from explorer.drafter_data import text_data, text_files
    from explorer.models import load_model

    if not 256 <= args.text_tokens <= 100_000_000:
        raise ValueError("--text-tokens must be between 256 and 100000000")
    if not args.licence.strip():
        raise ValueError("--text needs --licence: say under which licence the text may be used")
    if args.no_features:
        raise ValueError("--text stores features (teacher-forced at prefill speed): drop --no-features")
    sources = [s.strip() for s in args.text.split(",") if s.strip()]
    text_files(sources)  # refuse a bad path before loading the model
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    record = text_data(model, args.out, sources, tokens=args.text_tokens, licence=args.licence,
                       batch=min(args.batch, 64), seed=args.seed, progress=not args.quiet, command=_command_line())
    print(f"wrote {args.out}: {record['sequences']} chunks, {record['tokens']} tokens of text from "
          f"{record['text_files']} files; train a head on it with `python -m explorer train-drafter --data "
          f"{args.out} --out DIR`")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from explorer.models import load_model
    from explorer.request import RunRequest
    from store import Store

    request = RunRequest.build(args.strategy, _parse_params(args.param), args.prompt, chat=args.chat,
                               system_prompt=args.system, max_new_tokens=args.max_new_tokens, seed=args.seed,
                               stop_strings=tuple(args.stop), lens=args.lens, attention=args.attention,
                               attention_layers=args.attention_layers)  # validated before a model is loaded
    store = None if args.no_store else Store(args.db)
    model = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    return _run_and_report(model, request, store, args)


def cmd_branch(args: argparse.Namespace) -> int:
    from explorer.branch import branch_request
    from explorer.models import load_model
    from store import Store

    if args.param and not args.strategy:
        raise ValueError("--param needs --strategy (without it the branch keeps the parent's strategy)")
    store = Store(args.db, create=False)
    parent = store.load_trace(args.run_id)
    model = load_model(args.model or parent.started.model_id, dtype=args.dtype, device=args.device)
    options = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens is not None else {}
    request = branch_request(model, parent, args.step, args.token, args.strategy,
                             _parse_params(args.param) if args.strategy else None, lens=args.lens,
                             attention=args.attention, **options)
    args.strategy = request.strategy
    return _run_and_report(model, request, store, args)


def _run_and_report(model: Any, request: Any, store: Any, args: argparse.Namespace) -> int:
    from explorer.events import STATUS_OK, RunStarted, TokenStep
    from explorer.recorder import Recorder
    from explorer.runner import run_strategy

    args.max_new_tokens = request.max_new_tokens
    recorder = Recorder(store)
    progress = _progress(args.max_new_tokens, disable=True)  # shown once the run has started
    failure: Exception | None = None
    try:
        for event in run_strategy(model, request, recorder=recorder):
            if isinstance(event, RunStarted):
                progress = _progress(args.max_new_tokens, disable=args.quiet)
            elif isinstance(event, TokenStep):
                progress.update(1)
    except KeyboardInterrupt:
        progress.close()
        where = f" (stored as cancelled in {store.url})" if recorder.trace is not None and store else ""
        print(f"interrupted{where}", file=sys.stderr)
        return 130
    except Exception as error:  # a started run is already stored as failed; report it in one line
        if recorder.trace is None:
            raise ValueError(f"the run could not start: {error}") from None
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
            "error": trace.finished.error if trace.finished else None, "metrics": jsonable(metrics),
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

    try:
        store = Store(args.db, create=False)
    except ValueError as error:
        if "there is no database" not in str(error):
            raise
        print("(no stored runs: the database does not exist yet)")
        return 0
    rows = store.list_runs(strategy=args.strategy, model=args.model, text=args.search, limit=args.limit)
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], ensure_ascii=False))
        return 0
    print(f"{'run_id':12}  {'created (UTC)':19}  {'strategy':12}  {'status':11}  {'tokens':>6}  prompt")
    for row in rows:
        prompt = one_line(row.prompt.replace("\n", " "))
        prompt = prompt[:50] + "…" if len(prompt) > 50 else prompt
        created = one_line(row.created_at[:19].replace("T", " "))
        print(f"{one_line(row.run_id):12}  {created:19}  {one_line(row.strategy):12}  {row.status:11}  "
              f"{row.new_tokens:>6}  {prompt}")
    if not rows:
        print("(no stored runs)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from store import Store

    try:
        store = Store(args.db, create=False)
    except ValueError as error:
        raise ValueError(f"no run with id {args.run_id!r}: {error}") from None
    trace = store.load_trace(args.run_id)
    if args.json:
        from explorer.engines import engine_metrics
        from explorer.quality import run_quality

        print(json.dumps({"run_id": trace.run_id, "metrics": jsonable(trace.metrics()),
                          "quality": jsonable(run_quality(trace)), "steps": trace.table(),
                          "engines": engine_metrics(trace)}, ensure_ascii=False))
        return 0
    started = trace.started
    print(one_line(f"run {trace.run_id}: {started.strategy} {started.config} on {started.model_id}, "
                   f"seed {started.seed}, status {trace.status}"))
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

    if args.fidelity:
        from explorer.fidelity import ledger_markdown, ledger_text

        print(ledger_markdown() if args.markdown else ledger_text(), end="")
        return 0
    if args.markdown:
        raise ValueError("--markdown goes with --fidelity")
    for name, spec in sorted(REGISTRY.items()):
        print(f"{name}: {spec.summary}" + (f" (plugin {spec.plugin})" if spec.plugin else ""))
        for field in dataclasses.fields(spec.config):
            print(f"    {field.name} = {field.default!r}  {field.metadata.get('help', '')}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from store import Store

    store = Store(args.db, create=False)
    ids = store.run_ids() if args.all else list(args.run_ids)
    if not ids:
        raise ValueError("name the runs to export (run ids) or pass --all")
    traces = store.load_traces(ids)
    out = Path(args.out)
    try:
        paths = _write_export(args.format, traces, out, args.push_to_hub, args.argv)
    except OSError as error:
        raise ValueError(f"cannot write {out}: {error.strerror or error}") from None
    for path in paths:
        print(path)
    return 0


def _write_export(kind: str, traces: list[Any], out: Path, push_to_hub: str | None = None,
                  argv: Sequence[str] = ()) -> list[Path]:
    from explorer import export

    if push_to_hub and kind != "hf-dataset":
        raise ValueError("--push-to-hub goes with --format hf-dataset")
    if kind == "hf-dataset":
        from explorer.dataset import push_to_hub as push
        from explorer.dataset import write_dataset

        paths = write_dataset(traces, out, command=shlex.join(["python", "-m", "explorer", *argv]))
        if push_to_hub:
            print(f"uploaded to {push(out, push_to_hub)}")
        return paths
    if kind in ("vllm", "sglang", "aiperf"):
        from explorer.engine_records import write_records

        return [write_records(kind, traces, out)]
    if kind in ("csv", "parquet", "jsonl") and out.is_dir():
        raise ValueError(f"{out} is a directory: give a file name for the {kind} export")
    if kind == "specbench":
        from explorer.specbench import write_answers

        return write_answers(traces, out)
    if kind == "bundle":
        if len(traces) == 1 and out.suffix == ".zip":
            return [export.write_bundle(traces[0], out)]
        out.mkdir(parents=True, exist_ok=True)
        return [export.write_bundle(t, out / f"{export.safe_name(t.run_id)}.zip") for t in traces]
    writer = {"csv": export.write_csv, "parquet": export.write_parquet, "jsonl": export.write_jsonl,
              "lens": export.write_lens_parquet, "attention": export.write_attention_parquet,
              "unmask": export.write_unmask_parquet}[kind]
    return [writer(traces, out)]


def cmd_import(args: argparse.Namespace) -> int:
    from explorer.export import read_bundle
    from store import Store

    if args.format != "bundle":
        from explorer.engine_records import read_records

        traces = read_records(args.format, args.bundle, method=args.method, model=args.model,
                              category=args.category)  # all read, then
        store = Store(args.db)
        store.save_traces(traces)  # stored in one transaction: a bad file stores nothing
        print(f"imported {len(traces)} {args.format} records as external runs into {store.url}: "
              f"{', '.join(t.run_id for t in traces[:10])}{' ...' if len(traces) > 10 else ''}")
        return 0
    if args.method or args.model or args.category:
        raise ValueError("--method, --model and --category go with an engine's records "
                         "(--format vllm|sglang|aiperf|specbench)")
    trace = read_bundle(args.bundle)
    store = Store(args.db)
    if trace.run_id in set(store.run_ids()):
        raise ValueError(f"run {trace.run_id} is already in {store.url}: delete it there first or use another --db")
    store.save_trace(trace)
    print(f"imported run {trace.run_id} ({trace.started.strategy}, {len(trace.token_steps)} tokens) into {store.url}")
    return 0


def cmd_figure(args: argparse.Namespace) -> int:
    from store import Store
    from viz.catalog import get_view
    from viz.paper import save_figure

    view = get_view(args.view)
    store = Store(args.db, create=False)
    traces = store.load_traces(args.run_ids)
    figure = view.render(traces, args.lane - 1)
    if view.name == "branch-tree":  # the runs' whole stored branch families, not only the runs named
        from viz.whatif import branch_tree_figure

        family = [i for i in store.family(args.run_ids) if i not in args.run_ids]
        figure = branch_tree_figure(traces, store.load_traces(family))
    print(save_figure(figure, args.out, width=args.width))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from explorer.models import load_model
    from explorer.request import check_max_new_tokens
    from explorer.specbench import default_question_file
    from explorer.sweep import load_prompts, parse_strategies, per_category, run_sweep, sweep_cells, task_items
    from store import Store

    task = _sweep_task(args)
    prompts = args.prompts or (default_question_file() if task is None else None)
    if prompts is None and task is None:
        raise ValueError("give a prompt file with --prompts (Spec-Bench's question.jsonl, see the README)")
    items = task_items(task) if task is not None else load_prompts(prompts)
    methods = parse_strategies(args.strategies)
    if args.per_category is not None:
        items = per_category(items, args.per_category)
    check_max_new_tokens(args.max_new_tokens)  # before a model is loaded
    store = Store(args.db)
    cells = sweep_cells(items, methods, args.seeds, args.chat)  # refuses bad input before any model loads
    with tqdm(total=len(cells), unit="cell", desc="sweep", disable=args.quiet, file=sys.stderr) as bar:
        if args.ray is not None:
            from explorer.ray_sweep import run_sweep_on_ray

            report = run_sweep_on_ray(args.model, cells, store, address=args.ray or None, workers=args.workers,
                                      gpus_per_worker=args.gpus_per_worker, device=args.device,
                                      max_new_tokens=args.max_new_tokens, chat=args.chat,
                                      progress=lambda what: bar.update(1))
        else:
            model = load_model(args.model, device=args.device)
            report = run_sweep(model, items, methods, args.seeds, store, max_new_tokens=args.max_new_tokens,
                               chat=args.chat, progress=lambda what: bar.update(1))
    print(f"sweep: {report.done} runs done, {report.skipped} already done (skipped), {len(report.failed)} failed; "
          f"stored in {store.url}")
    for what, error in report.failed:
        print(f"failed: {what}: {error}", file=sys.stderr)
    if task is not None:
        _print_task_accuracy(store, task, [m.label for m in methods], args,
                             None if args.ray is not None else model.info.model_id)
    return 1 if report.failed else 0


def _sweep_task(args: argparse.Namespace) -> Any:
    """The sweep's task (--task, cut to --limit), or None; refused with --prompts."""
    if args.task is None:
        if args.limit is not None:
            raise ValueError("--limit goes with --task (for a prompt file: --per-category)")
        return None
    if args.prompts is not None:
        raise ValueError("give --task or --prompts, not both")
    from explorer.tasks import load_task

    return load_task(args.task, args.limit)


def _print_task_accuracy(store: Any, task: Any, methods: list[str], args: argparse.Namespace,
                         model_id: str | None) -> None:
    """Accuracy per method over this sweep's runs of the task (the latest ok run of each cell), checked now."""
    from explorer.tasks import summary_lines, task_report, task_runs

    traces = task_runs(store.load_traces(store.run_ids(sweep_only=True)), task, methods, args.seeds,
                       args.max_new_tokens, model_id)
    for line in summary_lines(task_report(traces)) or [f"task {task.name}: no run finished ok"]:
        print(one_line(line))


def cmd_check(args: argparse.Namespace) -> int:
    from explorer.check import check, verdict_table

    options = {"architectures": [a.strip() for a in args.architectures.split(",")]} if args.architectures else {}
    results = check(args.strategy, lossless=args.lossless, exact_sampling=args.exact_sampling, model=args.model,
                    params=_parse_params(args.param), runs=args.runs, **options)
    for line in verdict_table(results).splitlines():
        print(one_line(line))
    return 1 if any(result.passed is False for result in results) else 0


def cmd_report(args: argparse.Namespace) -> int:
    from explorer.sweep import write_report
    from store import Store

    store = Store(args.db, create=False)
    traces = store.load_traces(store.run_ids(sweep_only=True))
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    reference, model = None, None
    if args.mauve_reference:
        from explorer.models import load_model
        from explorer.quality import load_reference_texts

        reference = load_reference_texts(args.mauve_reference)
        model = load_model(args.model)
    elif args.model:
        raise ValueError("--model goes with --mauve-reference")
    for path in write_report(traces, args.out, formats, reference_texts=reference, model=model):
        print(path)
    return 0


def _summary_line(run_id: str, metrics: dict[str, Any], store: Any) -> str:
    where = f" (stored in {store.url})" if store is not None else ""
    return (f"run {run_id}: {metrics['new_tokens']} tokens, {metrics['tokens_per_s']:.1f} tok/s, "
            f"{metrics['target_forward_passes']} forward passes, mean entropy {metrics['mean_entropy']:.3f}, "
            f"perplexity {metrics['perplexity']:.3f}, status {metrics['status']}{where}")


def _progress(total: int, disable: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc="decoding", disable=disable, file=sys.stderr, leave=False)
