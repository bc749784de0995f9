"""Traces as a Hugging Face dataset folder: one Parquet file per table (runs, steps, draft rounds, unmask steps) and
a dataset card (README.md) whose YAML `configs` make `datasets.load_dataset(folder, "<table>")` load each table;
`push_to_hub` uploads such a folder with the token huggingface_hub finds in the environment.

Every table has a fixed pyarrow schema, so an empty table has the same features as a full one; a strategy's own
per-step values (`details`) and the run's config, tags and versions are JSON strings for the same reason.
Prompts, outputs and errors are untrusted text: they go into the Parquet files only, never into the card. The
card names models, strategies and package versions only where they match a plain pattern.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from explorer.events import STATUSES, DraftRound, to_dict
from explorer.export import STEP_SCHEMA, UNMASK_SCHEMA, reproduce_command, step_rows, unmask_rows
from explorer.params import one_line
from explorer.trace import Trace

DATASET_FORMAT = "decoding-explorer-dataset/1"
MARKER = f"<!-- {DATASET_FORMAT}: written by explorer.dataset; exporting into this folder again overwrites it -->"
CARD_MAX_BYTES = 2**20  # a card we wrote is far smaller; a larger README.md is not ours
DEFAULT_TABLE = "runs"
# what the card may name: a model id, strategy name, package name or version that cannot break Markdown or YAML
SAFE_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/:+=,\[\] ]{0,199}")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-+]{0,99}")
SAFE_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-+!]{0,63}")

# (column, pyarrow type, meaning); a type is a pyarrow factory name, or "list:<name>" for a list of them
Columns = list[tuple[str, str, str]]
RUN_COLUMNS: Columns = [
    ("run_id", "string", "the run's id (12 hex digits)"),
    ("strategy", "string", "decoding strategy"),
    ("model_id", "string", "model (Hub id, local path or embedded model)"),
    ("weights_hash", "string", "hash of the model's weights"),
    ("dtype", "string", "weights' dtype"),
    ("device", "string", "device the run ran on"),
    ("seed", "int64", "seed of the run's random generator"),
    ("prompt", "string", "the prompt as typed"),
    ("chat", "bool_", "whether the prompt went through the chat template"),
    ("system_prompt", "string", "system prompt (chat only)"),
    ("prompt_ids", "list:int64", "the prompt's token ids as the model saw them"),
    ("max_new_tokens", "int64", "token limit"),
    ("stop_strings", "list:string", "strings that stop the run"),
    ("config", "string", "the strategy's full config (JSON object)"),
    ("tags", "string", "labels such as a sweep's prompt category (JSON object)"),
    ("history", "string", "earlier [user, assistant] turns of a conversation (JSON list)"),
    ("status", "string", f"how the run ended: {', '.join(STATUSES)}"),
    ("stop_reason", "string", "why it stopped (eos, a stop string, the token limit, ...)"),
    ("error", "string", "the error of a failed run"),
    ("text", "string", "the decoded output"),
    ("new_tokens", "int64", "tokens generated"),
    ("wall_time_s", "float64", "seconds the run spent computing"),
    ("prefill_time_s", "float64", "seconds of those spent on the prompt"),
    ("target_forward_passes", "int64", "forward passes of the target model"),
    ("created_at", "string", "when the run started (ISO 8601)"),
    ("versions", "string", "library versions of the process that ran it (JSON object)"),
    ("parent_run", "string", "a branch: the run it branched from"),
    ("parent_step", "int64", "a branch: the step where it differs"),
    ("reproduce", "string", "a POSIX shell command that reruns the run"),
]
STEP_MEANINGS = {
    "run_id": "the run", "strategy": "its strategy", "step": "index of the committed token",
    "position": "position in the sequence (the prompt counts from 0)", "token_id": "the committed token",
    "token_text": "its text", "logprob": "log-probability under the raw model (natural log)",
    "prob": "exp(logprob)", "rank": "rank under the raw model (0 = most likely)",
    "entropy": "entropy of the raw distribution (nats)", "kept_count": "support size after the strategy's transforms",
    "origin": "plain | draft | bonus | prefix | forced",
    "round": "draft round that committed it (draft-verify strategies)",
    "draft_p": "target probability of the accepted draft token", "draft_q": "draft probability of it",
    "draft_u": "the uniform draw that accepted it (null under the greedy rule)",
    "verdict": "accepted, or the round's bonus kind",
}
STEP_COLUMNS: Columns = [(name, kind, STEP_MEANINGS[name]) for name, kind in STEP_SCHEMA] + [
    ("kept_logprob", "float64", "log-probability in the distribution the strategy drew from"),
    ("top_ids", "list:int64", "raw top-k token ids"),
    ("top_logprobs", "list:float64", "their log-probabilities"),
    ("top_texts", "list:string", "their texts"),
    ("kept_top_ids", "list:int64", "top-k of the distribution the strategy drew from"),
    ("kept_top_logprobs", "list:float64", "their log-probabilities"),
    ("details", "string", "the strategy's own per-step values (JSON object)"),
]
ROUND_COLUMNS: Columns = [
    ("run_id", "string", "the run"),
    ("strategy", "string", "its strategy"),
    ("round", "int64", "index of the propose -> verify -> accept round"),
    ("position", "int64", "sequence position of the first draft token"),
    ("drafter", "string", "what proposed the draft"),
    ("rule", "string", "verification rule"),
    ("draft_tokens", "list:int64", "draft tree's tokens"),
    ("draft_texts", "list:string", "their texts"),
    ("parents", "list:int64", "each node's parent (-1: the committed prefix); a chain is [-1, 0, 1, ...]"),
    ("q", "list:float64", "draft probability of each node's token"),
    ("p", "list:float64", "target probability of it (null: not reached)"),
    ("u", "list:float64", "uniform draw of the sampling rule (null: greedy or not reached)"),
    ("verdicts", "list:string", "accepted | rejected | unreached"),
    ("accepted_count", "int64", "draft tokens committed"),
    ("bonus_token", "int64", "the target's token after the accepted ones"),
    ("bonus_text", "string", "its text"),
    ("bonus_kind", "string", "a correction after a rejection, or a free token"),
    ("draft_time_s", "float64", "seconds spent drafting"),
    ("verify_time_s", "float64", "seconds spent verifying"),
    ("details", "string", "the strategy's own per-round values (JSON object)"),
]
UNMASK_MEANINGS = {
    "run_id": "the run", "step": "denoising step", "position": "canvas position (0 = first generated one)",
    "block_start": "start of the open block", "block_end": "its end (exclusive)",
    "predicted_id": "token the position would take now", "confidence": "score the commit rule ranks by",
    "margin": "top-1 minus top-2 probability", "entropy": "entropy of the position's distribution (nats)",
    "score": "the schedule's own score, where it has one", "committed": "whether this step committed it",
    "committed_id": "the token it was committed to", "all_in": "whether the step committed every position left",
}
UNMASK_COLUMNS: Columns = [(name, kind, UNMASK_MEANINGS[name]) for name, kind in UNMASK_SCHEMA]

TABLES: dict[str, tuple[str, Columns]] = {
    "runs": ("one row per run: model, strategy, config, prompt, output, timings", RUN_COLUMNS),
    "steps": ("one row per committed token, with the raw and the kept top-k", STEP_COLUMNS),
    "draft_rounds": ("one row per draft round of a draft-verify strategy (per-node lists)", ROUND_COLUMNS),
    "unmask_steps": ("one row per (denoising step, position still masked before it) of a diffusion run",
                     UNMASK_COLUMNS),
}


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def run_rows(traces: Iterable[Trace]) -> list[dict[str, Any]]:
    rows = []
    for trace in traces:
        started, finished = trace.started, trace.finished
        rows.append({
            **{name: getattr(started, name) for name in (
                "run_id", "strategy", "model_id", "weights_hash", "dtype", "device", "seed", "prompt", "chat",
                "system_prompt", "prompt_ids", "max_new_tokens", "stop_strings", "created_at", "parent_run",
                "parent_step")},
            "config": _json(started.config), "tags": _json(started.tags), "history": _json(started.history),
            "versions": _json(started.versions), "status": trace.status, "reproduce": reproduce_command(trace),
            **({name: getattr(finished, name) for name in (
                "stop_reason", "error", "text", "new_tokens", "wall_time_s", "prefill_time_s",
                "target_forward_passes")} if finished else {}),
        })
    return rows


def token_rows(traces: list[Trace]) -> list[dict[str, Any]]:
    """explorer.export's step rows, each with its token's top-k lists and details."""
    steps = [step for trace in traces for step in trace.token_steps]
    return [{**row, "kept_logprob": step.kept_logprob, "top_ids": step.top_ids, "top_logprobs": step.top_logprobs,
             "top_texts": step.top_texts, "kept_top_ids": step.kept_top_ids,
             "kept_top_logprobs": step.kept_top_logprobs, "details": _json(step.details)}
            for row, step in zip(step_rows(traces), steps, strict=True)]


def round_rows(traces: Iterable[Trace]) -> list[dict[str, Any]]:
    return [{**to_dict(round_), "run_id": trace.run_id, "strategy": trace.started.strategy,
             "details": _json(round_.details)}
            for trace in traces for round_ in trace.events if isinstance(round_, DraftRound)]


ROW_BUILDERS: dict[str, Callable[[list[Trace]], list[dict[str, Any]]]] = {
    "runs": run_rows, "steps": token_rows, "draft_rounds": round_rows, "unmask_steps": unmask_rows,
}


def arrow_schema(columns: Columns) -> Any:
    import pyarrow as pa

    def arrow_type(kind: str) -> Any:
        return pa.list_(getattr(pa, kind[5:])()) if kind.startswith("list:") else getattr(pa, kind)()

    return pa.schema([(name, arrow_type(kind)) for name, kind, _ in columns])


# ------------------------------------------------------------------------------------------------ writing
def is_our_export(folder: Path) -> bool:
    """Whether `folder` holds a dataset this module wrote: a README.md (a file, not a link) with our marker."""
    card = folder / "README.md"
    if card.is_symlink() or not card.is_file():
        return False
    with card.open("rb") as handle:
        head = handle.read(CARD_MAX_BYTES + 1)
    return len(head) <= CARD_MAX_BYTES and MARKER.encode() in head


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ValueError(f"{out_dir} is a link or not a folder: give a new or empty folder for the dataset")
    if out_dir.exists() and any(out_dir.iterdir()) and not is_our_export(out_dir):
        raise ValueError(f"{out_dir} is not empty and holds no dataset exported by this program: give a new or "
                         "empty folder")
    data = out_dir / "data"
    if data.is_symlink() or (data.exists() and not data.is_dir()):
        raise ValueError(f"{data} is a link or not a folder: remove it or give another folder")


def _replace(path: Path, write: Callable[[Path], None]) -> Path:
    """Write a file through a fresh temporary file beside it and rename it over `path` (a link at `path` is
    replaced, never followed; a half-written file is never left under the final name)."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # new, never a link; umask applies
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_dataset(traces: Iterable[Trace], out_dir: str | Path, command: str | None = None) -> list[Path]:
    """Write the traces as a Hugging Face dataset folder: data/<table>.parquet for every table of TABLES (empty
    ones too) and README.md, the dataset card, whose `configs` list the tables that have rows (`datasets` cannot
    load a split without rows; an empty table's file still holds its columns). `command` is the command line that
    made it (shown in the card). Refuses a folder that is not empty unless it holds an earlier export of this
    module, which it overwrites. Returns the files written, the card first."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ValueError("a dataset export needs pyarrow: pip install pyarrow") from error
    traces = list(traces)
    if not traces:
        raise ValueError("there are no runs to export: record or select at least one run")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    tables = {name: pa.Table.from_pylist(ROW_BUILDERS[name](traces), schema=arrow_schema(columns))
              for name, (_, columns) in TABLES.items()}
    card = dataset_card(traces, {name: table.num_rows for name, table in tables.items()}, command)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    written = [_replace(out_dir / "README.md", lambda path: path.write_text(card, encoding="utf-8"))]
    for name, table in tables.items():
        written.append(_replace(out_dir / "data" / f"{name}.parquet",
                                lambda path, table=table: pq.write_table(table, path)))
    return written


# --------------------------------------------------------------------------------------------------- card
def _fence(text: str) -> str:
    """`text` as a fenced code block that nothing inside it can close, control characters made visible."""
    text = "".join(c if c in "\n\t" or c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _counted(values: Iterable[str], pattern: re.Pattern[str], what: str) -> str:
    counts = Counter(values)
    shown = [f"`{value}` ({count})" for value, count in counts.most_common() if pattern.fullmatch(value)]
    hidden = sum(count for value, count in counts.items() if not pattern.fullmatch(value))
    if hidden:
        shown.append(f"{hidden} runs with {what} not shown here (see the runs table)")
    return ", ".join(shown) or "none"


def _type_name(kind: str) -> str:
    return kind.replace("list:", "list of ").replace("bool_", "bool")


def _versions(traces: list[Trace]) -> list[str]:
    seen: dict[str, set[str]] = {}
    for trace in traces:
        for package, version in trace.started.versions.items():
            if isinstance(version, str) and SAFE_NAME.fullmatch(package) and SAFE_VERSION.fullmatch(version):
                seen.setdefault(package, set()).add(version)
    return [f"| {package} | {', '.join(sorted(versions))} |" for package, versions in sorted(seen.items())]


def _dates(traces: list[Trace]) -> str:
    dates = []
    for trace in traces:
        try:
            dates.append(datetime.fromisoformat(trace.started.created_at).date().isoformat())
        except (TypeError, ValueError):
            continue
    return f"{min(dates)} to {max(dates)}" if dates else "unknown dates"


def card_metadata(tables: Iterable[str]) -> dict[str, Any]:
    """The card's YAML front matter, a config per table in `tables`: only fixed values (nothing from a trace)."""
    return {
        "configs": [{"config_name": name, "data_files": [{"split": "train", "path": f"data/{name}.parquet"}],
                     **({"default": True} if name == DEFAULT_TABLE else {})} for name in tables],
        "license": "other",
        "tags": ["decoding-explorer", "llm-decoding", "speculative-decoding"],
        "pretty_name": "Decoding Explorer traces",
    }


def dataset_card(traces: list[Trace], counts: dict[str, int], command: str | None = None) -> str:
    """The dataset card of `traces`, whose tables have `counts` rows."""
    try:
        exporter = importlib.metadata.version("decoding-explorer")
    except importlib.metadata.PackageNotFoundError:
        exporter = "unknown"
    statuses = Counter(t.status if t.status in STATUSES else "other" for t in traces)
    lines = [
        "---", yaml.safe_dump(card_metadata(name for name in TABLES if counts[name]), sort_keys=False).rstrip("\n"),
        "---", "", MARKER, "",
        "# Decoding Explorer traces", "",
        "Decoding traces recorded by [Decoding Explorer](https://pypi.org/project/decoding-explorer/): for every "
        "run, each committed token with the distribution it came from, and where the strategy had them its draft "
        "rounds and denoising steps.", "",
        "## How it was made", "",
        f"- exported on {datetime.now(UTC).date().isoformat()} by decoding-explorer {exporter}",
        f"- {len(traces)} runs, recorded {_dates(traces)}; status: "
        + (", ".join(f"{status} ({count})" for status, count in statuses.most_common()) or "none"),
        f"- models: {_counted((t.started.model_id for t in traces), SAFE_MODEL, 'other model ids')}",
        f"- strategies: {_counted((t.started.strategy for t in traces), SAFE_NAME, 'other strategy names')}",
        "- each run's full config, seed and a command that reruns it are in the `runs` table", "",
    ]
    if command:
        lines += ["The command that exported it:", "", _fence(command), ""]
    versions = _versions(traces)
    if versions:
        lines += ["Library versions of the processes that recorded the runs:", "", "| package | versions |",
                  "|---|---|", *versions, ""]
    lines += ["## Tables", "",
              "Each table with rows is a config with one split, `train`. Lists are Parquet lists; `config`, `tags`, "
              "`history`, `versions` and `details` are JSON strings, so that every run has the same columns.", ""]
    for name, (description, columns) in TABLES.items():
        rows = (f"{counts[name]} row{'s' if counts[name] != 1 else ''}" if counts[name] else
                f"no rows in this export, so no config (`data/{name}.parquet` holds the empty table's columns)")
        title = f"### `{name}`{' (default)' if name == DEFAULT_TABLE else ''}"
        lines += [title, "", f"{description[0].upper()}{description[1:]}; {rows}.", "",
                  "| column | type | meaning |", "|---|---|---|",
                  *(f"| `{column}` | {_type_name(kind)} | {meaning.replace('|', '/')} |"
                    for column, kind, meaning in columns), ""]
    lines += [
        "## Loading", "",
        "```python",
        "import json",
        "",
        "import datasets",
        "",
        'runs = datasets.load_dataset("PATH_OR_REPO", split="train")  # the default config: runs',
        'steps = datasets.load_dataset("PATH_OR_REPO", "steps", split="train")',
        'details = [json.loads(d) for d in steps["details"]]  # a strategy\'s own values per token',
        "```", "",
        "## Licence", "",
        "The licence is `other`: prompts were written by the people who ran the explorer, and the model outputs "
        "in `text`, `token_text` and the top-k texts follow the licence of the model that produced them (see "
        "`model_id`).", "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the Hub
def push_to_hub(out_dir: str | Path, repo_id: str) -> str:
    """Upload a folder written by `write_dataset` to the Hub dataset repository `repo_id` (created if missing) and
    return its URL. The token is huggingface_hub's own (HF_TOKEN, or `hf auth login`); nothing here stores it."""
    out_dir = Path(out_dir)
    if not is_our_export(out_dir):
        raise ValueError(f"{out_dir} holds no dataset exported by this program: export with --format hf-dataset "
                         "first")
    try:
        import huggingface_hub
        import huggingface_hub.errors
        from huggingface_hub import constants
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
        from huggingface_hub.utils import validate_repo_id
    except ImportError as error:
        raise ValueError("pushing to the Hub needs huggingface_hub: pip install huggingface_hub") from error
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"{repo_id[:100]!r} is not a Hub repository id: give it as owner/name") from None
    if "/" not in repo_id:
        raise ValueError(f"{repo_id[:100]!r} names no owner: give the repository as owner/name")
    if constants.is_offline_mode():
        raise RuntimeError("the Hub cannot be reached: offline mode is on (HF_HUB_OFFLINE); unset it to push")
    if huggingface_hub.get_token() is None:
        raise ValueError("no Hugging Face token found: set HF_TOKEN to a token with write access (or run "
                         "`hf auth login`)")
    # the HTTP library's own errors (no connection, timeouts); huggingface_hub 1.x+ re-exports their base
    transport_error = getattr(huggingface_hub.errors, "HTTPError", OSError)
    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
        api.upload_folder(folder_path=str(out_dir), repo_id=repo_id, repo_type="dataset",
                          allow_patterns=["README.md", "data/*.parquet"],
                          commit_message="Upload decoding traces (Decoding Explorer)")
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise RuntimeError(f"the Hub refused the token for {repo_id} (HTTP {status}): set HF_TOKEN to a token "
                               "with write access to it") from None
        raise RuntimeError(f"the Hub refused the upload: {one_line(error, 300)}") from None
    except (OfflineModeIsEnabled, OSError, transport_error) as error:
        raise RuntimeError(f"the Hub cannot be reached: {one_line(error, 300)}") from None
    return str(url)
