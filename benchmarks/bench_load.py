"""Many users at once: N concurrent gradio_client sessions, each running one short decode through the real app.

Usage: python benchmarks/bench_load.py [--sessions 8] [--new-tokens 32] [--strategy greedy] [--concurrency 1,4]
                                       [--model PATH] [--db URL]
Starts the app (loopback only) on a tiny random model (or --model) once per concurrency setting
(DECODING_EXPLORER_CONCURRENCY: runs decoding at once; the rest wait in Gradio's queue), starts every session
at the same moment, and prints p50/p95 time to first token (submit until the first progress message, which the
API sends at the run's first token) and total time per session, and the wall time of the whole batch. Each run
is then checked in the database: one run per session, its own prompt, steps numbered without gaps, the tokens the
client got, and SQLite's integrity check.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class Session:
    prompt: str
    first_token_s: float | None = None
    total_s: float = 0.0
    result: dict | None = None
    error: str | None = None


def run_sessions(url: str, count: int, new_tokens: int, strategy: str = "greedy") -> tuple[list[Session], float]:
    """`count` gradio_client sessions submitting at once; each records its time to first token and total."""
    from gradio_client import Client

    clients = [Client(url, verbose=False) for _ in range(count)]  # connected before the clock starts
    sessions = [Session(f"session {i}: tell me about the number {i}") for i in range(count)]
    barrier = threading.Barrier(count)

    def one(index: int) -> None:
        session = sessions[index]
        barrier.wait()
        start = time.perf_counter()
        try:
            job = clients[index].submit(session.prompt, strategy, "{}", "", index, new_tokens, True,
                                        api_name="/generate")
            while not job.done():
                if session.first_token_s is None and job.outputs():
                    session.first_token_s = time.perf_counter() - start
                time.sleep(0.005)
            session.result = job.result()
            if session.first_token_s is None:  # the whole run fitted between two polls
                session.first_token_s = time.perf_counter() - start
        except Exception as error:  # reported, and the check fails on it
            session.error = f"{type(error).__name__}: {error}"
        session.total_s = time.perf_counter() - start

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return sessions, time.perf_counter() - begin


def check_runs(sessions: list[Session], db: str) -> list[str]:
    """What is wrong with the stored runs (empty: nothing): one run per session, nothing mixed between them."""
    from store import Store

    problems = [f"{s.prompt!r}: {s.error}" for s in sessions if s.error]
    store = Store(db)
    ids = [s.result["run_id"] for s in sessions if s.result]
    if len(set(ids)) != len(ids):
        problems.append("two sessions got the same run")
    for session in sessions:
        if not session.result:
            continue
        trace = store.load_trace(session.result["run_id"])
        steps = [e.step for e in trace.token_steps]
        if trace.started.prompt != session.prompt:
            problems.append(f"run {trace.run_id} holds another session's prompt")
        if steps != list(range(len(steps))) or trace.token_ids != session.result["token_ids"]:
            problems.append(f"run {trace.run_id}: its steps are not its own")
        if trace.status != "ok":
            problems.append(f"run {trace.run_id} is {trace.status}")
    if db.startswith("sqlite:///"):
        with sqlite3.connect(db.removeprefix("sqlite:///")) as connection:
            verdict = connection.execute("PRAGMA integrity_check").fetchone()[0]
        if verdict != "ok":
            problems.append(f"integrity_check: {verdict}")
    return problems


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    from explorer.testing import running_app, save_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--strategy", default="greedy")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--model", default=None, help="default: a tiny random model saved for the run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    model = args.model or str(save_tiny_model(work / "tiny", seed=0, scale=20.0))
    print(f"{args.sessions} sessions at once, {args.new_tokens} new tokens each, {args.strategy}, model {model}")
    print("\n| concurrency | TTFT p50 s | TTFT p95 s | total p50 s | total p95 s | batch wall s | all stored ok |")
    print("|---|---|---|---|---|---|---|")
    failed = False
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        db = f"sqlite:///{work / f'load-{concurrency}.sqlite'}"
        env = {**os.environ, "DECODING_EXPLORER_MODEL": model, "DECODING_EXPLORER_DB": db,
               "DECODING_EXPLORER_CONCURRENCY": str(concurrency)}
        with running_app(env, work / f"app-{concurrency}.log") as url:
            run_sessions(url, 1, args.new_tokens, args.strategy)  # warm-up: the model loads, the queue starts
            alone, _ = run_sessions(url, 1, args.new_tokens, args.strategy)
            sessions, wall = run_sessions(url, args.sessions, args.new_tokens, args.strategy)
        print(f"| {concurrency}, one session alone | {alone[0].first_token_s:.2f} | | {alone[0].total_s:.2f} | | | |")
        problems = check_runs(sessions, db)
        failed |= bool(problems)
        ttft = [s.first_token_s for s in sessions if s.first_token_s is not None] or [float("nan")]
        total = [s.total_s for s in sessions]
        print(f"| {concurrency} | {statistics.median(ttft):.2f} | {percentile(ttft, 0.95):.2f} | "
              f"{statistics.median(total):.2f} | {percentile(total, 0.95):.2f} | {wall:.2f} | "
              f"{'yes' if not problems else 'NO: ' + '; '.join(problems[:3])} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
