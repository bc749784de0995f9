"""`python -m explorer`: run / runs / show, JSON output, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest


def cli(*args, db, check=True):
    env = {**os.environ, "DECODING_EXPLORER_DB": db, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "explorer", *args], capture_output=True, text=True, env=env,
                            timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def db(tmp_path):
    return f"sqlite:///{tmp_path / 'cli.sqlite'}"


def test_run_json_then_runs_and_show(tiny_dir, db):
    out = cli("run", "--strategy", "sample", "--param", "top_p=0.9", "--param", "temperature=0.8",
              "--prompt", "Hello", "--model", str(tiny_dir), "--max-new-tokens", "12", "--seed", "3", "--json",
              "--quiet", db=db)
    data = json.loads(out.stdout)
    assert data["status"] == "ok" and len(data["token_ids"]) == 12 and isinstance(data["text"], str)
    assert data["metrics"]["target_forward_passes"] == 12
    listed = cli("runs", db=db).stdout
    assert data["run_id"] in listed and "sample" in listed
    shown = cli("show", data["run_id"], "--json", db=db)
    assert [row["token_id"] for row in json.loads(shown.stdout)["steps"]] == data["token_ids"]
    table = cli("show", data["run_id"], db=db).stdout
    assert "entropy" in table and len(table.splitlines()) >= 14


@pytest.mark.parametrize("args, message", [
    (["--strategy", "nope"], "unknown strategy"),
    (["--strategy", "sample", "--param", "top_p=2"], "top_p must be in (0, 1]"),
    (["--strategy", "sample", "--param", "temperature=-1"], "temperature must be > 0"),
    (["--strategy", "sample", "--param", "bogus=1"], "has no parameter 'bogus'"),
    (["--strategy", "sample", "--param", "top_p"], "--param takes key=value"),
    (["--strategy", "greedy", "--prompt", "   "], "the prompt is empty"),
])
def test_bad_input_is_one_clear_line(tiny_dir, db, args, message):
    full = ["run", *args, "--model", str(tiny_dir)]
    if "--prompt" not in args:
        full += ["--prompt", "hi"]
    result = cli(*full, db=db, check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and message in lines[-1]
    assert "Traceback" not in result.stderr


def test_unknown_run_id(db):
    result = cli("show", "deadbeef", db=db, check=False)
    assert result.returncode == 2 and "no run with id" in result.stderr


def test_prompt_lookup_from_the_cli(tiny_dir, db):
    out = cli("run", "--strategy", "prompt_lookup", "--param", "min_ngram=1", "--prompt", "ab ab ab ab ab ab",
              "--no-chat", "--model", str(tiny_dir), "--max-new-tokens", "20", "--json", "--quiet", db=db)
    metrics = json.loads(out.stdout)["metrics"]
    assert metrics["mean_accepted_tokens"] >= 1.0 and metrics["target_forward_passes"] >= 1
    assert "acceptance_by_position" in metrics and "draft_rounds" in metrics


@pytest.mark.parametrize("args, message", [
    (["train-drafter", "--out", "h", "--data", "missing.npz"], "--data missing.npz: no such file"),
    (["train-drafter", "--out", "h", "--fraction", "0"], "--fraction must be in (0, 1]"),
    (["train-drafter", "--out", "h", "--batch", "0"], "--batch must be between 1 and 4096"),
    (["drafter-data", "--out", "d.npz", "--prompts", "0"], "--prompts must be between 1 and 1000000"),
    (["drafter-data", "--out", "d.npz", "--temperature", "0"], "--temperature in (0, 4]"),
    (["drafter-data", "--out", "d.npz", "--questions", "missing.jsonl"], "--questions missing.jsonl: no such file"),
])
def test_drafter_commands_refuse_bad_input_in_one_line(db, args, message):
    result = cli(*args, db=db, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and lines[-1].startswith("error:") and message in lines[-1]
    assert "Traceback" not in result.stderr
