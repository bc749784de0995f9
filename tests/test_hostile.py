"""A public tool faces careless and hostile input: every case here is refused up front with one line (never a
traceback, never a half-written run), bounded in cost, or stored as what happened to it."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from explorer.check import field_problems
from explorer.cli import main
from explorer.events import STATUS_RUNNING, RunStarted, TokenStep
from explorer.export import read_bundle, write_bundle
from explorer.recorder import Recorder
from explorer.request import RunRequest
from explorer.runner import run_to_end
from explorer.serving import ServerPolicy
from explorer.strategies import REGISTRY, make_config
from explorer.strategies.base import field_type, register
from store import Store
from tests.fakes import fixed, zipf_logits

ROOT = Path(__file__).resolve().parents[1]


def numeric_fields():
    for name, spec in sorted(REGISTRY.items()):
        for field in dataclasses.fields(spec.config):
            kind = field_type(spec.config, field.name)
            if kind in (int, float) and "maximum" in field.metadata:
                yield name, field.name, kind, field.metadata


# ------------------------------------------------------------------------------------ 1. bounded requests
@pytest.mark.parametrize("strategy, name, kind, meta", list(numeric_fields()),
                         ids=[f"{s}.{n}" for s, n, _, _ in numeric_fields()])
def test_every_numeric_parameter_is_bounded_and_finite(strategy, name, kind, meta):
    """Just past its maximum and minimum, inf, -inf, nan, 1e400, ±1e30 and text: each refused with a one-line
    ValueError naming the parameter (the check `python -m explorer check` runs on any strategy)."""
    assert field_problems(strategy, name) == []


@pytest.mark.parametrize("strategy, params, limit", [
    ("tree_speculative", {"branching": 8, "depth": 8}, "the limit is 128"),
    ("token_recycling", {"tree": "widths", "widths": "8,8,8", "candidates": 8}, "the limit is 128"),
    ("cautious", {"n_max": 32, "max_trial_tokens": 128}, "the limit is 2048"),
    ("tree_speculative", {"skip": "1" * 300}, "longer than 256 characters"),
])
def test_costly_products_are_refused_with_the_limit_named(strategy, params, limit):
    with pytest.raises(ValueError, match=limit):
        make_config(strategy, params)


def test_beams_times_length_and_prompt_size_are_bounded():
    with pytest.raises(ValueError, match=r"16 beams x 4096 new tokens = 65536; the limit is 16384"):
        RunRequest.build("beam", {"num_beams": 16}, "hi", max_new_tokens=4096)
    with pytest.raises(ValueError, match="diverse|beams"):
        RunRequest.build("diverse_beam", {"num_beams": 16, "groups": 2}, "hi", max_new_tokens=2000)
    with pytest.raises(ValueError, match="longer than 100000 characters"):
        RunRequest.build("greedy", {}, "x" * 100_001)
    for seed in (2**70, -1, 1.5, "abc", float("inf")):
        with pytest.raises(ValueError, match="seed must be"):
            RunRequest.build("greedy", {}, "hi", seed=seed)
    with pytest.raises(ValueError, match="max new tokens must be"):
        RunRequest.build("greedy", {}, "hi", max_new_tokens=None)


def test_a_run_over_its_time_budget_is_stopped_and_stored_as_such(tiny, store):
    request = RunRequest.build("greedy", {}, "hi", max_new_tokens=4000, time_limit_s=0.05)
    trace = run_to_end(tiny, request, recorder=Recorder(store))
    stored = store.load_trace(trace.run_id)
    assert stored.status == "stopped" and stored.finished.stop_reason == "time_limit"
    assert 0 < len(stored.token_steps) < 4000
    with pytest.raises(ValueError, match="the prompt has .* tokens; the limit here is 3"):
        run_to_end(tiny, RunRequest.build("greedy", {}, "a longer prompt", max_prompt_tokens=3))


def test_the_worst_allowed_requests_stay_within_a_stated_memory_peak(tiny_dir, tmp_path):
    """Each worst allowed request, on a tiny model, in a fresh process: peak RSS under 1 GB (~0.4 GB measured,
    most of it torch itself). The peak is the process's own VmHWM: ru_maxrss carries over from the parent across
    the spawn, so it read the test process's size (1.5 GB once the embedded model is loaded), not the requests'."""
    script = f"""
from explorer.models import load_model
from explorer.request import RunRequest
from explorer.runner import run_to_end
lm = load_model({str(tiny_dir)!r})
worst = [("tree_speculative", {{"branching": 2, "depth": 6}}, 64),
         ("tree_speculative", {{"mode": "dynamic", "budget": 64}}, 64),
         ("token_recycling", {{"tree": "widths", "widths": "4,4,4", "candidates": 32}}, 64),
         ("token_recycling", {{}}, 64),
         ("lookahead", {{"window": 32, "ngram": 8, "guesses": 13}}, 64),
         ("beam", {{"num_beams": 16}}, 1024),
         ("cautious", {{"h_min": 0.0, "h_max": 0.01, "n_max": 8, "max_trial_tokens": 64}}, 16),
         ("jacobi", {{"window": 32}}, 128)]
for name, params, tokens in worst:
    run_to_end(lm, RunRequest.build(name, params, "hello " * 50, max_new_tokens=tokens, chat=False))
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    peak_mb = int(out.stdout.strip().splitlines()[-1])
    assert peak_mb < 1000, peak_mb


def test_a_strategy_that_commits_nothing_has_failed(store):
    @register("test_silent", type(make_config("greedy", {})), "commits nothing")
    def silent(model, prompt_ids, config, rng):
        yield from ()

    try:
        trace = run_to_end(fixed(zipf_logits(10)), RunRequest("test_silent", make_config("greedy", {}), "x"),
                           recorder=Recorder(store))
    finally:
        del REGISTRY["test_silent"]
    assert trace.status == "failed" and trace.finished.stop_reason == "no_tokens"


# ------------------------------------------------------------------------------------ 3. models visitors name
def test_the_allow_list_answers_the_same_for_every_refused_model(tmp_path):
    policy = ServerPolicy(allowed_models=("embedded", "tiny-model"), weight_bytes=lambda name: 10**12)
    assert policy.check_model("") == "embedded" and policy.check_model("tiny-model") == "tiny-model"
    messages = set()
    for refused in ("/etc", str(tmp_path), "/no/such/dir", "../../etc/passwd", "someone/some-model"):
        with pytest.raises(ValueError) as error:
            policy.check_model(refused)
        messages.add(str(error.value))
    assert len(messages) == 1 and "does not load that model" in messages.pop()
    open_hub = ServerPolicy(allow_any_model=True, max_model_bytes=10**9, weight_bytes=lambda name: 5 * 10**8)
    assert open_hub.check_model("someone/small-model") == "someone/small-model"
    with pytest.raises(ValueError, match="does not load"):
        open_hub.check_model(str(tmp_path))  # never a local path, even with any Hub id allowed
    too_big = ServerPolicy(allow_any_model=True, max_model_bytes=10**9, weight_bytes=lambda name: 5 * 10**9)
    with pytest.raises(ValueError, match="does not load"):
        too_big.check_model("someone/huge-model")
    with pytest.raises(ValueError, match="does not load"):
        policy.limit(RunRequest.build("speculative", {"draft_model": "/etc"}, "hi"))
    with pytest.raises(ValueError, match="30 nodes per round; the limit here is 20"):
        ServerPolicy(max_tree_nodes=20).limit(RunRequest.build("tree_speculative", {"branching": 2, "depth": 4}, "hi"))
    assert "draft trees up to 20 nodes" in ServerPolicy(max_tree_nodes=20).describe()
    for drafter in ("auto", "eagle-head", "layer-skip"):  # drafters that come with the model: nothing to load
        policy.limit(RunRequest.build("speculative", {"draft_model": drafter}, "hi"))
        policy.limit(RunRequest.build("eagle", {"drafter": "" if drafter == "layer-skip" else drafter}, "hi"))
    limited = policy.limit(RunRequest.build("speculative", {"draft_model": "target"}, "hi"))
    assert limited.time_limit_s == policy.time_limit_s and limited.max_prompt_tokens == policy.max_prompt_tokens


def test_a_space_refuses_state_that_crosses_visitors_runs():
    warm = RunRequest.build("token_recycling", {"keep_table": True}, "hi")
    space = ServerPolicy.from_env({"SPACE_ID": "someone/explorer"})
    with pytest.raises(ValueError, match="keep_table would let this run see what other visitors"):
        space.limit(warm)
    assert ServerPolicy.from_env({}).limit(warm)  # a server of one's own keeps the paper's setting
    space.limit(RunRequest.build("token_recycling", {}, "hi"))


def test_a_load_does_not_block_requests_for_loaded_models(monkeypatch, tiny):
    import threading

    from explorer.models import loading

    cache = loading.ModelCache()
    release = threading.Event()
    monkeypatch.setattr(loading, "load_model", lambda model_id, **kw: (release.wait(10), tiny)[1])
    monkeypatch.setattr(loading, "warm_up", lambda lm: None)
    release.set()
    cache.get("a")
    release.clear()
    slow = threading.Thread(target=cache.get, args=("b",))
    slow.start()
    time.sleep(0.1)
    t0 = time.perf_counter()
    assert cache.get("a") is tiny  # while "b" is loading
    assert time.perf_counter() - t0 < 1.0
    release.set()
    slow.join(10)


# ------------------------------------------------------------------------------------ 4. bundles
def good_bundle(tiny, tmp_path) -> Path:
    trace = run_to_end(tiny, RunRequest.build("greedy", {}, "x", max_new_tokens=3))
    return write_bundle(trace, tmp_path / "good.zip")


def rewrite(path: Path, out: Path, *, manifest=None, events=None, extra=None) -> Path:
    with zipfile.ZipFile(path) as bundle:
        meta = json.loads(bundle.read("manifest.json"))
        lines = bundle.read("events.jsonl").decode().splitlines()
    with zipfile.ZipFile(out, "w") as bundle:
        bundle.writestr("manifest.json", json.dumps(manifest(meta)) if manifest else json.dumps(meta))
        bundle.writestr("events.jsonl", "\n".join(events(lines) if events else lines))
        for name, data in (extra or {}).items():
            bundle.writestr(name, data)
    return out


def edit_event(kind, change):
    def apply(lines):
        out = []
        for line in lines:
            data = json.loads(line)
            if data["kind"] == kind:
                change(data)
            out.append(json.dumps(data))
        return out
    return apply


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


MALFORMED = {
    "manifest is a list": dict(manifest=lambda m: [1, 2]),
    "manifest format": dict(manifest=lambda m: {**m, "format": "other/9"}),
    "event without kind": dict(events=lambda ls: [json.dumps({k: v for k, v in json.loads(ls[1]).items()
                                                              if k != "kind"}), *ls]),
    "unknown kind": dict(events=edit_event("token_step", lambda d: d.update(kind="pwned"))),
    "missing field": dict(events=edit_event("token_step", lambda d: d.pop("logprob"))),
    "extra field": dict(events=edit_event("token_step", lambda d: d.update(evil=1))),
    "created_at null": dict(events=edit_event("run_started", lambda d: d.update(created_at=None))),
    "created_at junk": dict(events=edit_event("run_started", lambda d: d.update(created_at="yesterday"))),
    "seed is text": dict(events=edit_event("run_started", lambda d: d.update(seed="abc"))),
    "seed too large": dict(events=edit_event("run_started", lambda d: d.update(seed=2**70))),
    "status pwned": dict(events=edit_event("run_finished", lambda d: d.update(status="pwned"))),
    "token id is text": dict(events=edit_event("token_step", lambda d: d.update(token_id="7"))),
    "top ids hold text": dict(events=edit_event("token_step", lambda d: d.update(top_ids=["a"]))),
    "details nested": dict(events=edit_event("token_step", lambda d: d.update(details={"x": {"y": 1}}))),
    "run id is a path": dict(events=edit_event("run_started", lambda d: d.update(run_id="../../evil")),
                             manifest=lambda m: {**m, "run_id": "../../evil"}),
    "absolute run id": dict(events=lambda ls: [json.dumps({**json.loads(line), "run_id": "/abs/path"}) for line in ls],
                            manifest=lambda m: {**m, "run_id": "/abs/path"}),
    "line is not an object": dict(events=lambda ls: ["[1, 2]", *ls]),
    "deeply nested JSON": dict(events=lambda ls: [nested(100_000), *ls]),
    "deeply nested manifest": dict(manifest=lambda m: json.loads(nested(50))),
    "extra entry": dict(extra={"evil.sh": "rm -rf /"}),
    "two runs": dict(events=lambda ls: ls + [line.replace(json.loads(ls[0])["run_id"], "0123456789ab") for line in ls]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bundles_are_refused_whole(case, tiny, tmp_path):
    bad = rewrite(good_bundle(tiny, tmp_path), tmp_path / "bad.zip", **MALFORMED[case])
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with pytest.raises(ValueError):
        read_bundle(bad)
    assert main(["import", str(bad), "--db", db]) == 2
    assert Store(db).count_runs() == 0


def patched_zip(path: Path, out: Path, *, flag: int | None = None, method: int | None = None) -> Path:
    """Set the 'encrypted' flag or an unknown compression method in both headers of every entry."""
    data = bytearray(path.read_bytes())
    for signature, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            if flag is not None:
                data[start + flag_at] |= flag
            if method is not None:
                data[start + method_at:start + method_at + 2] = method.to_bytes(2, "little")
            start += 4
    out.write_bytes(bytes(data))
    return out


def test_encrypted_unknown_compression_bombs_and_junk_are_refused(tiny, tmp_path):
    good = good_bundle(tiny, tmp_path)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("manifest.json", "{}")
        bundle.writestr("events.jsonl", b"\n" * (70 * 2**20))
    junk = tmp_path / "junk.zip"
    junk.write_bytes(os.urandom(2048))
    cases = [patched_zip(good, tmp_path / "enc.zip", flag=1), patched_zip(good, tmp_path / "m99.zip", method=99),
             bomb, junk, tmp_path / "missing.zip", tmp_path]
    assert bomb.stat().st_size < 200_000  # a small file that unpacks past the cap
    for case in cases:
        with pytest.raises(ValueError):
            read_bundle(case)
    assert read_bundle(good).token_ids  # the good one still reads


def test_export_never_writes_outside_its_folder(tiny, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(db)
    trace = run_to_end(tiny, RunRequest.build("greedy", {}, "x", max_new_tokens=2))
    evil = type(trace)(dataclasses.replace(trace.started, run_id="../../evil"), trace.events, trace.finished)
    store.save_trace(evil)  # e.g. written by an older version that did not check ids
    out = tmp_path / "deep" / "er"
    assert main(["export", "--all", "--format", "bundle", "--out", str(out), "--db", db]) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert written and all(path.resolve().parent == out.resolve() for path in written)
    assert not (tmp_path / "evil.zip").exists()


# ------------------------------------------------------------------------------------ 6. one line, no traceback
def cli(*args: str, env: dict | None = None, input_bytes: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "explorer", *args], cwd=ROOT, capture_output=True,
                          env={**os.environ, **(env or {})}, timeout=300, input=input_bytes)


def assert_one_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    err = result.stderr.decode("utf-8", "replace").strip()
    assert result.returncode == code, err
    assert "Traceback" not in err and err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def test_bad_databases_give_one_line(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a database " * 100)
    zip_file = tmp_path / "data.zip"
    zipfile.ZipFile(zip_file, "w").close()
    foreign = tmp_path / "foreign.sqlite"
    import sqlite3

    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE runs (id INTEGER)")
    for url in ("not a url", "sqlite:/x", "nosuchdialect://x", "postgresql+nosuchdriver://u@h/db",
                f"sqlite:///{tmp_path}", f"sqlite:///{text_file}", f"sqlite:///{zip_file}", f"sqlite:///{foreign}"):
        err = assert_one_line(cli("runs", "--db", url))
        assert "SELECT" not in err and "INSERT" not in err
    assert_one_line(cli("run", "--strategy", "greedy", "--prompt", "hi", "--db", "sqlite:////proc/forbidden/x.sqlite"))


def test_reading_a_missing_database_does_not_create_it(tmp_path):
    missing = tmp_path / "nope.sqlite"
    assert_one_line(cli("show", "0123456789ab", "--db", f"sqlite:///{missing}"))
    result = cli("runs", "--db", f"sqlite:///{missing}")
    assert result.returncode == 0 and b"no stored runs" in result.stdout
    assert not missing.exists()


def test_bad_models_prompts_and_paths_give_one_line(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(tiny_dir):
        data = (Path(tiny_dir) / name).read_bytes()
        (broken / name).write_bytes(data[: len(data) // 2] if name.endswith(".safetensors") else data)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((Path(tiny_dir) / name).read_bytes())
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    for model in (broken, no_tokenizer):
        assert_one_line(cli("run", "--strategy", "greedy", "--prompt", "hi", "--model", str(model), "--db", db))
    assert_one_line(cli("run", "--strategy", "greedy", "--prompt", "hi", "--seed", str(2**70), "--db", db))
    assert_one_line(cli("run", "--strategy", "beam", "--param", "num_beams=1e400", "--prompt", "hi", "--db", db))
    assert_one_line(cli("run", "--strategy", "self_speculative", "--param", "skip=5", "--prompt", "hi", "--model",
                        str(tiny_dir), "--db", db))
    bad_utf8 = subprocess.run([sys.executable.encode(), b"-m", b"explorer", b"run", b"--strategy", b"greedy",
                               b"--prompt", b"caf\xe9 \xff", b"--model", str(tiny_dir).encode(), b"--db", db.encode()],
                              cwd=ROOT, capture_output=True, timeout=300)
    assert "UTF-8" in assert_one_line(bad_utf8)
    assert Store(db).count_runs() == 0  # nothing refused left a row
    assert main(["run", "--strategy", "greedy", "--prompt", "hi", "--model", str(tiny_dir), "--db", db,
                 "--max-new-tokens", "3", "--quiet"]) == 0
    for out in (tmp_path / "missing" / "dir" / "steps.csv", Path("/proc/steps.csv"), tmp_path):
        assert_one_line(cli("export", "--all", "--format", "csv", "--out", str(out), "--db", db))


def test_runs_escapes_control_characters(tiny, tmp_path):
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    run_to_end(tiny, RunRequest.build("greedy", {}, "a\x1b[31mred\x07", max_new_tokens=2), recorder=Recorder(Store(db)))
    result = cli("runs", "--db", db)
    assert result.returncode == 0 and b"\x1b" not in result.stdout and b"\\x1b[31mred" in result.stdout


# ------------------------------------------------------------------------------------ 7. interrupted runs
def test_a_run_whose_process_died_shows_as_interrupted_with_its_steps(tiny, tmp_path):
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(db)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trace = run_to_end(tiny, RunRequest.build("greedy", {}, "x", max_new_tokens=5))
    store.begin_run(trace.started)
    store.append_events(trace.run_id, 0, trace.events)
    from sqlalchemy import update

    from store.tables import RunRow

    with store._tx() as session:  # as if a process that has since died had written it
        session.execute(update(RunRow).where(RunRow.id == trace.run_id).values(pid=dead.pid,
                                                                               host=socket.gethostname()))
    assert store.load_trace(trace.run_id).status == STATUS_RUNNING
    reopened = Store(db)
    summary = reopened.list_runs()[0]
    assert summary.status == "interrupted" and summary.new_tokens == 5
    stored = reopened.load_trace(trace.run_id)
    assert stored.status == "interrupted" and len(stored.token_steps) == 5
    assert main(["export", trace.run_id, "--format", "jsonl", "--out", str(tmp_path / "e.jsonl"), "--db", db]) == 0


def started(path: Path) -> bool:
    """Whether the child process has stored its run (read without creating or locking anything)."""
    import sqlite3

    if not path.exists():
        return False
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            return connection.execute("SELECT count(*) FROM runs").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def test_sigterm_stores_the_run_as_cancelled(tiny_dir, tmp_path):
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    process = subprocess.Popen(
        [sys.executable, "-m", "explorer", "run", "--strategy", "cautious", "--param", "h_min=0", "--param",
         "h_max=0.01", "--param", "n_max=8", "--param", "max_trial_tokens=64", "--prompt", "hi", "--model",
         str(tiny_dir), "--max-new-tokens", "4000", "--db", db, "--quiet"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not started(tmp_path / "db.sqlite"):
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert b"stored as cancelled" in err and b"Traceback" not in err
    assert Store(db).list_runs()[0].status == "cancelled"


def test_interrupting_a_model_load_claims_no_stored_run(monkeypatch, capsys, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("explorer.models.load_model", interrupted)
    assert main(["run", "--strategy", "greedy", "--prompt", "hi", "--db", f"sqlite:///{tmp_path / 'x.sqlite'}"]) == 130
    assert "stored" not in capsys.readouterr().err


def test_event_types_are_checked_on_import_only_where_input_is_foreign():
    step = TokenStep(0, 0, 1, "a", -0.1, 0, 0.1, [1], [-0.1], ["a"], [1], [-0.1], 1, -0.1)
    from explorer.events import from_dict, to_dict

    assert from_dict("token_step", to_dict(step), strict=True) == step
    with pytest.raises(ValueError, match="wrong type"):
        from_dict("token_step", {**to_dict(step), "rank": "0"}, strict=True)
    started_fields = {f.name for f in dataclasses.fields(RunStarted)}
    assert {"run_id", "created_at", "seed"} <= started_fields
