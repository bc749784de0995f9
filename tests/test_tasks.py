"""Tasks checked offline: each checker on right, wrong and hostile outputs; the built-in tasks are deterministic
and their references right (recomputed here independently); Wilson and t intervals against known values; a
GSM8K-style file loads; a sweep over a task stores tagged runs and its report writes the accuracy table."""

import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import pytest

from explorer.cli import main
from explorer.quality import t_quantile
from explorer.tasks import (
    BUILTIN_SIZES,
    CODE_PROBLEMS,
    TASK,
    TASK_ANSWER,
    TASK_CHECK,
    TASK_ITEM,
    TaskItem,
    builtin_task,
    check_code,
    check_extract,
    check_json,
    check_number,
    extract_code,
    extract_number,
    first_json_object,
    load_task,
    load_task_file,
    mean_interval,
    run_python,
    task_report,
    tasks_latex,
    tasks_markdown,
    validate,
    wilson_interval,
)
from explorer.trace import Trace
from store import Store

DATA = Path(__file__).parent / "data" / "tasks"


# ------------------------------------------------------------------------------------------------ checkers
@pytest.mark.parametrize(("output", "reference", "correct"), [
    ("She has 12 + 30 = 42 apples.\n#### 42", "42", True),
    ("#### 1,234", "1234", True),
    ("The total is 1,234 dollars.", "1234", True),
    ("#### 42\nQuestion: and then?\n#### 7", "42", True),  # the first "####" with a number after it
    ("5 apples, then 7 apples", "7", True),  # no "####": the last number
    ("5 apples, then 7 apples", "5", False),
    ("####\nso it is 9", "9", True),  # "####" with no number after it: the last number
    ("#### 42.0", "42", True),
    ("It falls to -5 degrees. #### -5", "-5", True),
    ("3, 4", "34", False),  # a comma only groups thousands
    ("The answer is 42.", "42", True),
    ("no number here", "0", False),
    ("#### $1,500", "1500", True),
])
def test_number_check(output, reference, correct):
    assert check_number(output, reference) is correct


def test_extract_number_edges():
    assert extract_number("1,2345") == 2345  # not a thousands group: two numbers, the last one
    assert extract_number("x") is None


@pytest.mark.parametrize(("output", "correct"), [
    ("Answer: 10 September 2024", True),
    ("answer: the 10 September 2024.", True),  # case, article, punctuation
    ("Let me look.\nAnswer:  10   September 2024\nQuestion: next", True),
    ("10 September 2024\nsomething else", True),  # no "Answer:": the first non-blank line
    ("Answer: 14 September 2024", False),
    ("Answer: 10 September 2024 and approved", False),  # an exact match, not containment
    ("", False),
])
def test_extract_check(output, correct):
    assert check_extract(output, "10 September 2024") is correct


def test_extract_check_on_prices():
    assert check_extract("Answer: $85,668.01", "$85,668.01")
    assert check_extract("Answer: 85668.01", "$85,668.01")  # punctuation goes on both sides
    assert not check_extract("Answer: $85,668", "$85,668.01")


SCHEMA = {"type": "object", "required": ["name", "age", "plan", "id"], "additionalProperties": False,
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "plan": {"enum": ["free", "pro"]}, "id": {"enum": [7]},
                         "tags": {"type": "array", "items": {"type": "string"}}}}


@pytest.mark.parametrize(("output", "correct"), [
    ('{"name": "Ana", "age": 31, "plan": "pro", "id": 7}', True),
    ('Sure! Here it is:\n```json\n{"name": "Ana", "age": 31, "plan": "pro", "id": 7, "tags": ["a"]}\n```\n'
     'Hope this helps {"x": 1}', True),  # text around it, and a later object, are ignored
    ('{"name": } oops, again: {"name": "Ana", "age": 31.0, "plan": "free", "id": 7.0}', True),  # 31.0 is an integer
    ('{"name": "Ana", "age": 31, "plan": "pro"}', False),  # missing id
    ('{"name": "Ana", "age": "31", "plan": "pro", "id": 7}', False),  # a string is not an integer
    ('{"name": "Ana", "age": true, "plan": "pro", "id": 7}', False),  # nor is a boolean
    ('{"name": "Ana", "age": 31, "plan": "gold", "id": 7}', False),
    ('{"name": "Ana", "age": 31, "plan": "pro", "id": 7, "extra": 1}', False),
    ('{"name": "Ana", "age": 31, "plan": "pro", "id": 7, "tags": [1]}', False),
    ('{"name": "Ana", "age": 31, "plan": "pro", "id": true}', False),  # true is not 7 (nor 1)
    ('["name", "Ana"]', False),
    ("no JSON at all", False),
])
def test_json_check(output, correct):
    assert check_json(output, json.dumps(SCHEMA)) is correct


def test_validator_agrees_with_jsonschema_where_installed():
    jsonschema = pytest.importorskip("jsonschema")
    rng = random.Random(0)
    values = [0, 1, 1.0, 1.5, True, False, None, "pro", "free", "x", [], ["a"], [1], {}, {"a": 1}, 7, 7.0]
    for _ in range(300):
        instance = {key: rng.choice(values) for key in rng.sample(["name", "age", "plan", "id", "tags", "z"], 4)}
        ours = not validate(instance, SCHEMA)
        assert ours == jsonschema.Draft202012Validator(SCHEMA).is_valid(instance), instance


def test_first_json_object_takes_the_outer_object():
    assert first_json_object('x {"a": {"b": 1}} {"c": 2}') == {"a": {"b": 1}}


def test_code_is_taken_from_the_first_python_fence():
    text = "Here:\n```text\nnot code\n```\n```python\ndef f():\n    return 1\n```\n```python\nx = 2\n```"
    assert extract_code(text) == "def f():\n    return 1\n"
    assert extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut short: to the end
    assert extract_code("def f(): return 1") == "def f(): return 1"


TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"


@pytest.mark.parametrize(("output", "correct"), [
    ("```python\ndef add(a, b):\n    return a + b\n```", True),
    ("def add(a, b): return a + b", True),
    ("```python\ndef add(a, b):\n    return a - b\n```", False),
    ("```python\ndef add(a, b) return a + b\n```", False),  # a syntax error
    ("```python\nimport sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n```", False),  # an early exit is no pass
    ("```python\ndef add(a, b):\n    return a + b\nif __name__ == '__main__':\n    print(add(int(input()), 1))\n```",
     True),  # a demo block does not run (no stdin to read)
])
def test_code_check(output, correct):
    assert check_code(output, TESTS) is correct


def test_code_that_loops_forever_is_killed_and_wrong():
    start = time.monotonic()
    run = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert run.returncode is None and not run.passed
    assert time.monotonic() - start < 4
    assert not check_code("```python\ndef add(a, b):\n    while True:\n        pass\n```", TESTS, timeout_s=1.0)


def test_code_sees_no_secrets_and_runs_in_a_fresh_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("EXPLORER_TEST_SECRET", "hunter2")
    monkeypatch.chdir(tmp_path)
    probe = ("import os, sys\n"
             "assert 'EXPLORER_TEST_SECRET' not in os.environ and 'HOME' not in os.environ, dict(os.environ)\n"
             f"assert os.getcwd() != {str(tmp_path)!r} and sorted(os.listdir()) == ['output.txt', 'solution.py']\n"
             "assert sys.flags.isolated\n"
             "print(os.getcwd())\n")
    run = run_python(probe)
    assert run.passed, run.output
    assert not Path(run.output.strip()).exists()  # the directory is gone
    assert not run_python("import os\nassert os.environ.get('EXPLORER_TEST_SECRET') == 'hunter2'\n").passed


@pytest.mark.skipif(os.name != "posix", reason="resource limits are POSIX")
def test_code_is_limited_in_memory_and_output():
    assert not run_python("x = bytearray(4 * 2**30)\n").passed
    flood = run_python("import sys\nsys.stdout.write('x' * 10**7)\n")
    assert not flood.passed and len(flood.output) <= 4000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_processes_the_code_leaves_behind_are_killed():
    run = run_python("import subprocess, sys\n"
                     "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                     "print(child.pid)\n")
    assert run.passed, run.output
    stat = Path(f"/proc/{int(run.output.strip())}/stat")
    deadline = time.monotonic() + 5
    while stat.exists() and stat.read_text().split(") ")[-1][0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not stat.exists() or stat.read_text().split(") ")[-1][0] == "Z"  # gone, or dead and not yet reaped


# ------------------------------------------------------------------------------------------ built-in tasks
def test_builtin_tasks_are_deterministic_and_limited():
    for name, size in BUILTIN_SIZES.items():
        task = builtin_task(name)
        assert 20 <= len(task.items) == size <= 50
        assert task == builtin_task(name)
        assert len({item.id for item in task.items}) == size
        assert builtin_task(name, seed=1).items != task.items
        assert load_task(name, limit=3).items == task.items[:3]
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        load_task("arithmetic", 0)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_task("nope")


def recompute(problem: str) -> int:
    """The arithmetic problem's answer, from its sentences alone."""
    value = None
    for sentence in re.findall(r"[^.?]+[.?]", problem.split("\n")[0]):
        sentence = sentence.strip()
        if found := re.fullmatch(r"\w+ has (\d+) \w+\.", sentence):
            value = int(found[1])
        elif found := re.fullmatch(r"\w+ gets (\d+) more \w+\.", sentence):
            value += int(found[1])
        elif found := re.fullmatch(r"\w+ gives away (\d+) \w+\.", sentence):
            value -= int(found[1])
        elif found := re.fullmatch(r"Then the number of \w+ \w+ has becomes (\d+) times as large\.", sentence):
            value *= int(found[1])
        elif found := re.fullmatch(r"\w+ splits the \w+ into (\d+) equal piles and keeps one pile\.", sentence):
            assert value % int(found[1]) == 0
            value //= int(found[1])
        else:
            assert re.fullmatch(r"How many \w+ does \w+ have now\?", sentence), sentence
    return value


def test_arithmetic_answers_are_right():
    task = builtin_task("arithmetic")
    operations = []
    for item in task.items:
        assert item.check == "number" and item.prompt.endswith("'#### N', where N is the final number.")
        assert int(item.answer) == recompute(item.prompt) >= 1
        assert item.is_correct(f"Working...\n#### {item.answer}") and not item.is_correct(f"#### {item.answer}1")
        operations.append(len(re.findall(r"gets|gives|becomes|splits", item.prompt)))
    assert set(operations) == {1, 2, 3}


def test_extract_answers_are_in_the_passage():
    for item in builtin_task("extract").items:
        passage = item.prompt.split("Passage: ")[1].split("\n")[0]
        assert item.answer in passage
        assert item.is_correct(f"Answer: {item.answer}")
        others = re.findall(r"\d+ \w+ \d{4}|[A-Z][a-z]+ [A-Z][a-z]+(?= on| and|\.)", passage)
        assert any(not item.is_correct(f"Answer: {other}") for other in others)


def instance(schema: dict) -> object:
    """A value that satisfies one of our generated schemas."""
    if "enum" in schema:
        return schema["enum"][0]
    return {"string": "text", "integer": 3, "number": 2.5, "boolean": True, "array": ["a", "b"],
            "object": {k: instance(v) for k, v in schema.get("properties", {}).items()}}[schema["type"]]


def test_json_items_validate_their_own_instances():
    for item in builtin_task("json").items:
        schema = json.loads(item.answer)
        good = instance(schema)
        assert item.is_correct("Here you go:\n" + json.dumps(good))
        for name in schema["required"]:
            assert f'"{name}"' in item.prompt
            assert not item.is_correct(json.dumps({k: v for k, v in good.items() if k != name}))


def test_code_items_pass_with_the_reference_and_fail_without():
    for item, (function, parameters, _, body, _) in zip(builtin_task("code").items, CODE_PROBLEMS, strict=True):
        assert f"`{function}({parameters})`" in item.prompt and item.answer.count("assert") == 3
        assert item.is_correct(f"```python\ndef {function}({parameters}):\n    {body}\n```")
        assert not item.is_correct(f"```python\ndef {function}({parameters}):\n    return object()\n```")


# ---------------------------------------------------------------------------------------------- intervals
@pytest.mark.parametrize(("correct", "n", "low", "high"), [
    (8, 10, 0.490, 0.943), (0, 10, 0.0, 0.278), (10, 10, 0.722, 1.0), (50, 100, 0.404, 0.596)])
def test_wilson_interval(correct, n, low, high):
    assert wilson_interval(correct, n) == pytest.approx((low, high), abs=5e-4)


def test_wilson_interval_refuses_nonsense():
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def t_cdf(t: float, df: int) -> float:
    """Student's t distribution function by Simpson's rule on its density."""
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    steps = 20000
    h = t / steps
    total = sum((1 if i in (0, steps) else 4 if i % 2 else 2) * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2)
                for i in range(steps + 1))
    return 0.5 + norm * total * h / 3


def test_t_quantiles():
    for df in [*range(1, 31), 31, 45, 80, 200]:
        assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-4), df
    mean, low, high = mean_interval([0.5, 0.7, 0.6])
    assert (mean, high - mean) == pytest.approx((0.6, 4.302653 * 0.1 / math.sqrt(3)), rel=1e-6)
    assert low == pytest.approx(2 * mean - high)


# ------------------------------------------------------------------------------------------------- files
def test_gsm8k_style_file_loads():
    task = load_task_file(DATA / "gsm8k_sample.jsonl")
    assert task.name == "gsm8k_sample.jsonl"
    assert [(i.id, i.answer) for i in task.items] == [("line-1", "54"), ("line-2", "1500"), ("line-3", "90"),
                                                     ("line-5", "150"), ("line-6", "-5")]
    assert task.items[0].prompt.startswith("A baker makes 36 rolls") and "####" in task.items[0].prompt
    assert task.items[1].is_correct("150 * 12 = 1800, minus 300.\n#### 1,500")
    assert load_task(str(DATA / "gsm8k_sample.jsonl"), limit=2).items == task.items[:2]


@pytest.mark.parametrize(("lines", "message"), [
    ('{"question": "q", "answer": "#### 4"}\n{"question": "q", "answer": ', r":2: not JSON"),
    ('{"answer": "#### 4"}', r":1: expected a JSON object with a \"question\""),
    ('{"question": "q"}', r":1: expected an \"answer\""),
    ('{"question": "q", "answer": "so it is four\\n#### four"}', r':1: the answer must end in "#### N"'),
    ("[1, 2]", r":1: expected a JSON object"),
    ("\n\n", "has no questions"),
])
def test_bad_task_files_are_refused_in_one_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(lines)
    with pytest.raises(ValueError, match=message) as caught:
        load_task_file(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_a_number_answer_loads():
    item = TaskItem("x", "p", "12", "number")
    assert item.is_correct("#### 12") and not item.is_correct("#### 13")
    with pytest.raises(ValueError, match="unknown checker"):
        TaskItem("x", "p", "12", "nope")


# ----------------------------------------------------------------------------------------------- the sweep
def test_sweep_over_a_task_stores_tags_and_reports_accuracy(tiny_dir, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'tasks.sqlite'}"
    argv = ["sweep", "--task", "arithmetic", "--limit", "2", "--strategies", "greedy; sample:temperature=0.8",
            "--seeds", "2", "--model", str(tiny_dir), "--max-new-tokens", "6", "--db", db, "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "sweep: 8 runs done" in out
    assert re.search(r"task arithmetic: greedy: [0-4]/4 correct = [\d.]+ % \(95 % Wilson interval [\d.]+-[\d.]+ "
                     r"%\); per-seed mean over 2 seeds", out), out

    store = Store(db, create=False)
    traces = store.load_traces(store.run_ids(sweep_only=True))
    task = builtin_task("arithmetic")
    assert {t.started.tags[TASK_ITEM] for t in traces} == {"arithmetic-000", "arithmetic-001"}
    for trace in traces:
        item = next(i for i in task.items if i.id == trace.started.tags[TASK_ITEM])
        assert trace.started.tags[TASK] == "arithmetic" and trace.started.tags[TASK_CHECK] == "number"
        assert trace.started.tags[TASK_ANSWER] == item.answer and trace.started.tags["category"] == "arithmetic"
        assert item.prompt == trace.started.prompt

    # Outputs made right where the seed is 0 for greedy: 2/4 for greedy, 0/4 for sampling.
    def answered(trace: Trace) -> Trace:
        right = trace.started.seed == 0 and trace.started.tags["method"] == "greedy"
        text = f"#### {trace.started.tags[TASK_ANSWER]}" if right else "#### -1"
        return Trace(trace.started, trace.events, dataclasses.replace(trace.finished, text=text))

    rows = {row.method: row for row in task_report([answered(t) for t in traces])}
    greedy = rows["greedy"]
    assert (greedy.n, greedy.correct, greedy.accuracy, greedy.seeds) == (4, 2, 0.5, 2)
    assert (greedy.low, greedy.high) == pytest.approx(wilson_interval(2, 4))
    assert greedy.seed_mean == 0.5 and greedy.seed_low < 0 < 1 < greedy.seed_high  # per seed: 1.0 and 0.0
    assert rows["sample(temperature=0.8)"].correct == 0
    assert "| arithmetic | greedy | 4 | 2 | 50.0 |" in tasks_markdown(list(rows.values()))
    assert r"sample(temperature=0.8) & 4 & 0" in tasks_latex(list(rows.values()))

    again = main(argv)  # resumable: nothing new, the same accuracy
    assert again == 0 and "0 runs done, 8 already done" in capsys.readouterr().out
    assert main(["report", "--db", db, "--out", str(tmp_path / "report"), "--formats", "svg"]) == 0
    table = (tmp_path / "report" / "tasks.md").read_text()
    assert table == tasks_markdown(task_report(traces)) and len(table.splitlines()) == 4  # head, rule, 2 methods
    assert (tmp_path / "report" / "tasks.tex").read_text().startswith(r"\begin{tabular}")


def test_sweep_task_flags_are_checked(tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'x.sqlite'}"
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    cases = [(["--task", "arithmetic", "--prompts", str(prompts)], "give --task or --prompts, not both"),
             (["--prompts", str(prompts), "--limit", "2"], "--limit goes with --task"),
             (["--task", "nope"], "unknown task 'nope'"),
             (["--task", "code", "--limit", "0"], "--limit must be >= 1")]
    for extra, message in cases:
        assert main(["sweep", "--strategies", "greedy", "--db", db, *extra]) == 2
        assert message in capsys.readouterr().err
