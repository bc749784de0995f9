"""Tasks that can be checked offline: a strategy's accuracy on them, with 95 % intervals.

Four built-in tasks are generated from a seed (item i from `random.Random(f"{name}/{seed}/{i}")` alone, so the
first N items do not depend on how many are taken), and any GSM8K-style file loads as a fifth kind:

- `arithmetic` (50 items): word problems of one to three operations (+, -, x, exact /) on a count, with integer
  answers. Checked by `check_number`.
- `extract` (30): a short order record holding two dates, two names and a price, and a question about one of
  them. Checked by `check_extract`.
- `json` (30): a JSON object with named fields of given types, one of them a fixed value. Checked by
  `check_json` against a schema.
- `code` (20): a small Python function, checked by `check_code`: its tests run in a subprocess.
- A file (`load_task_file`): JSON lines `{"question": ..., "answer": ...}` as in GSM8K (Cobbe et al. 2021,
  arXiv:2110.14168), the reference being what follows "####" in the answer (a rationale may precede it), or a
  bare number. Checked by `check_number`.

The checkers, exactly:
- `check_number(output, reference)`: the predicted number is the first number after the first "####" of the
  output that has one after it before the next "####" (openai/grade-school-math's `extract_answer`: the first
  "#### N", commas dropped), else the last number of the output (lm-evaluation-harness's gsm8k
  "flexible-extract": the last match). A number is `-?` then digits in groups of three separated by commas, or
  plain digits, then an optional decimal part (`NUMBER`), so "1,234" is 1234 and "3, 4" is two numbers.
  Correct when it equals the reference as a decimal (42 == 42.0); no number at all is wrong.
- `check_extract(output, reference)`: the answer is the rest of the line after the first "Answer:" (any case),
  else the output's first non-blank line; correct when it equals the reference after SQuAD v1.1's
  normalisation (Rajpurkar et al. 2016, its evaluate script's `normalize_answer`: lower case, punctuation
  removed, the articles a/an/the removed, whitespace collapsed): an exact match, so "$1,250.00" matches
  "1250.00" but not "1250".
- `check_json(output, schema)`: the first JSON object in the output (the first "{" from which
  `json.JSONDecoder.raw_decode` reads an object; text around it is ignored) must satisfy the schema: a JSON
  Schema subset implemented here (`validate`: type, enum, required, properties, additionalProperties, items,
  with JSON Schema's meanings: 1.0 is an integer, true is not a number).
- `check_code(output, tests)`: the code is the first fenced block labelled python/py/python3, else the first
  fenced block, else the whole output (an unclosed fence runs to the end); it and the tests run as one file
  (as module "solution", so an `if __name__ == "__main__":` block does not run) in a fresh, limited process
  (`run_python`); correct when the file runs to its end within the time limit (5 s): no failed assert, no
  exception, no early exit.

Accuracy per method is pooled over items and seeds with a Wilson score interval (Wilson 1927); with several
seeds also the mean of the per-seed accuracies with a Student-t interval. Runs carry their task, item, checker
and reference in their tags (`item_tags`), so the report checks stored outputs without the task at hand.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import string
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from statistics import NormalDist, fmean
from typing import Any

from explorer.export import latex_escape
from explorer.metrics import method_label
from explorer.paths import read_lines
from explorer.quality import mean_interval
from explorer.trace import Trace

NUMBER_INSTRUCTION = "Solve the problem. End your answer with a line '#### N', where N is the final number."
EXTRACT_INSTRUCTION = ("Read the passage and answer the question with the value exactly as it is written in the "
                       "passage. Reply in the form 'Answer: <value>'.")
# The tags a task's runs carry (RunStarted.tags): what the report needs to check a stored output.
TASK, TASK_ITEM, TASK_CHECK, TASK_ANSWER = "task", "task_item", "task_check", "task_answer"


@dataclass(frozen=True)
class TaskItem:
    """One item: the whole prompt the model sees (instruction included), the reference `answer` (a number, a
    value, a JSON Schema as JSON text, or test code) and the name of its checker in `CHECKS`."""

    id: str
    prompt: str
    answer: str
    check: str

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"unknown checker {self.check!r}: one of {', '.join(CHECKS)}")

    def is_correct(self, output: str) -> bool:
        return CHECKS[self.check](output, self.answer)


@dataclass(frozen=True)
class Task:
    name: str
    items: tuple[TaskItem, ...]


# ------------------------------------------------------------------------------------------------ numbers
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def extract_number(text: str) -> Decimal | None:
    """The predicted number of an output (see the module docstring), or None where it has none."""
    for part in text.split("####")[1:]:
        found = NUMBER.search(part)
        if found:
            return Decimal(found.group().replace(",", ""))
    found_all = NUMBER.findall(text)
    return Decimal(found_all[-1].replace(",", "")) if found_all else None


def check_number(output: str, reference: str) -> bool:
    predicted = extract_number(output)
    try:
        return predicted is not None and predicted == Decimal(reference.replace(",", ""))
    except InvalidOperation:
        return False


# ------------------------------------------------------------------------------------------------ extract
def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def answer_span(output: str) -> str:
    found = re.search(r"answer:([^\n]*)", output, flags=re.IGNORECASE)
    if found:
        return found.group(1)
    return next((line for line in output.splitlines() if line.strip()), "")


def check_extract(output: str, reference: str) -> bool:
    return normalize_answer(answer_span(output)) == normalize_answer(reference)


# --------------------------------------------------------------------------------------------------- json
def first_json_object(text: str) -> dict[str, Any] | None:
    decoder = json.JSONDecoder()
    for start in (m.start() for m in re.finditer(r"\{", text)):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _is_type(value: Any, kind: str) -> bool:
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    types = {"string": str, "boolean": bool, "object": dict, "array": list, "null": type(None)}
    if kind not in types:
        raise ValueError(f"unknown JSON Schema type {kind!r}")
    return isinstance(value, types[kind])


def _json_equal(a: Any, b: Any) -> bool:
    """JSON's equality: true is not 1, 1 is 1.0, arrays and objects compare member by member."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    numbers = isinstance(a, int | float) and isinstance(b, int | float)
    return (numbers or type(a) is type(b)) and a == b


def validate(instance: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """What is wrong with `instance` under a JSON Schema subset (type, enum, required, properties,
    additionalProperties, items), one message per error; [] when it is valid."""
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is_type(instance, kind) for kind in kinds):
            return [f"{path}: expected {' or '.join(kinds)}, got {type(instance).__name__}"]
    errors = []
    if "enum" in schema and not any(_json_equal(instance, option) for option in schema["enum"]):
        errors.append(f"{path}: {instance!r} is not one of {schema['enum']!r}")
    if isinstance(instance, dict):
        errors += [f"{path}: missing {key!r}" for key in schema.get("required", ()) if key not in instance]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            if key in properties:
                errors += validate(value, properties[key], f"{path}.{key}")
            elif extra is False:
                errors.append(f"{path}: unexpected field {key!r}")
            elif isinstance(extra, dict):
                errors += validate(value, extra, f"{path}.{key}")
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(instance):
            errors += validate(value, schema["items"], f"{path}[{i}]")
    return errors


def check_json(output: str, schema: str) -> bool:
    found = first_json_object(output)
    return found is not None and not validate(found, json.loads(schema))


# --------------------------------------------------------------------------------------------------- code
FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", flags=re.DOTALL)
OUTPUT_BYTES = 2**20  # the largest file (its output included) the code may write
MEMORY_BYTES = 2**30  # its address space
PASSED = 86  # the runner's exit status once the file ran to its end: an early sys.exit(0) is not a pass
# The child sets its limits on itself before the code runs (preexec_fn would do it in the parent's fork, which
# is unsafe with threads), as hard limits the code cannot raise again. The file runs under the name "solution",
# not "__main__": an `if __name__ == "__main__":` block of the answer (a demo, an input()) does not run, as in
# HumanEval's harness, which execs the program without a __name__ of "__main__".
RUNNER = """import os, runpy, sys
try:
    import resource
except ImportError:
    resource = None
if resource is not None:
    for name, value in {limits!r}:
        kind = getattr(resource, name)
        hard = resource.getrlimit(kind)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))
runpy.run_path("solution.py", run_name="solution")
sys.stdout.flush()
sys.stderr.flush()
os._exit({passed})
"""


def extract_code(output: str) -> str:
    blocks = FENCE.findall(output)
    python = [code for label, code in blocks if label.lower() in ("python", "py", "python3")]
    if python or blocks:
        return (python or [code for _, code in blocks])[0]
    return output


@dataclass(frozen=True)
class CodeRun:
    returncode: int | None  # None: killed at the time limit
    output: str  # stdout and stderr together, truncated

    @property
    def passed(self) -> bool:
        """It ran to its end (the runner's own exit status): no exception, no early exit, in time."""
        return self.returncode == PASSED


def minimal_env() -> dict[str, str]:
    """The child's whole environment: nothing of ours (no tokens, no HOME), only what Python needs to start."""
    env = {"PATH": os.defpath}
    if os.name == "nt":
        env["SYSTEMROOT"] = os.environ.get("SYSTEMROOT", r"C:\Windows")
    return env


def run_python(source: str, *, timeout_s: float = 5.0, output_chars: int = 4000) -> CodeRun:
    """Run `source` as the file solution.py with `python -I` (no user site, no PYTHON* variables, no script
    directory on the path) in a fresh temporary directory as its working directory, with `minimal_env()`, no
    stdin, and (POSIX) hard limits on CPU time, address space and file size; its whole process group is killed
    at `timeout_s` of wall time, and when it ends (whatever it left running). Output past `output_chars` is cut."""
    with tempfile.TemporaryDirectory(prefix="explorer-task-") as workdir:
        Path(workdir, "solution.py").write_text(source, encoding="utf-8")
        limits = [("RLIMIT_CPU", math.ceil(timeout_s) + 1), ("RLIMIT_AS", MEMORY_BYTES),
                  ("RLIMIT_FSIZE", OUTPUT_BYTES), ("RLIMIT_CORE", 0)]
        command = [sys.executable, "-I", "-c", RUNNER.format(limits=limits, passed=PASSED)]
        with open(Path(workdir, "output.txt"), "w+b") as sink:  # a file, not a pipe: its size is limited
            process = subprocess.Popen(command, cwd=workdir, env=minimal_env(), stdin=subprocess.DEVNULL,
                                       stdout=sink, stderr=subprocess.STDOUT, start_new_session=os.name == "posix")
            try:
                returncode: int | None = process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill_group(process)
            sink.seek(0)
            output = sink.read(output_chars * 4).decode("utf-8", errors="replace")[:output_chars]
    return CodeRun(returncode, output)


def _kill_group(process: subprocess.Popen) -> None:
    if os.name == "posix":
        import signal

        try:
            os.killpg(process.pid, signal.SIGKILL)  # the session's group: the code and anything it started
        except (ProcessLookupError, PermissionError):
            pass
    else:
        process.kill()
    process.wait()


def check_code(output: str, tests: str, timeout_s: float = 5.0) -> bool:
    return run_python(extract_code(output) + "\n\n" + tests + "\n", timeout_s=timeout_s).passed


CHECKS: dict[str, Callable[[str, str], bool]] = {
    "number": check_number, "extract": check_extract, "json": check_json, "code": check_code}


# ------------------------------------------------------------------------------------------ built-in tasks
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kofi", "Lena", "Mateo",
         "Nora", "Omar", "Priya"]
THINGS = ["apples", "marbles", "stickers", "pencils", "stamps", "shells", "cards", "coins"]


def arithmetic_item(rng: random.Random, item_id: str) -> TaskItem:
    """A count changed by 1-3 operations, each a sentence of a fixed form; the answer is an integer >= 1."""
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    value = rng.randint(2, 60)
    sentences = [f"{name} has {value} {things}."]
    for _ in range(rng.randint(1, 3)):
        divisors = [k for k in range(2, 10) if value % k == 0]
        options = ["add"] + (["sub"] if value > 1 else []) + (["mul"] if value <= 100 else []) + (
            ["div"] if divisors else [])
        operation = rng.choice(options)
        if operation == "add":
            amount = rng.randint(1, 40)
            sentences.append(f"{name} gets {amount} more {things}.")
            value += amount
        elif operation == "sub":
            amount = rng.randint(1, value - 1)
            sentences.append(f"{name} gives away {amount} {things}.")
            value -= amount
        elif operation == "mul":
            factor = rng.randint(2, 5)
            sentences.append(f"Then the number of {things} {name} has becomes {factor} times as large.")
            value *= factor
        else:
            parts = rng.choice(divisors)
            sentences.append(f"{name} splits the {things} into {parts} equal piles and keeps one pile.")
            value //= parts
    sentences.append(f"How many {things} does {name} have now?")
    return TaskItem(item_id, " ".join(sentences) + "\n\n" + NUMBER_INSTRUCTION, str(value), "number")


FIRST = ["Marta", "Jonas", "Aiko", "Tomas", "Leila", "Samuel", "Ingrid", "Rafael", "Noor", "Pavel"]
LAST = ["Okafor", "Lindqvist", "Tanaka", "Moreau", "Haddad", "Novak", "Fischer", "Silva", "Kowalski", "Mensah"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Lyon", "Tallinn", "Quito", "Perth", "Krakow"]
GOODS = ["laptops", "desk chairs", "monitors", "printers", "lamps", "bookcases"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
QUESTIONS = {"ordered_on": "On what date were the goods ordered?",
             "delivered_on": "On what date were the goods delivered?",
             "buyer": "Who ordered the goods?", "approver": "Who approved the order?",
             "price": "What was the invoice total?"}


def extract_item(rng: random.Random, item_id: str, index: int) -> TaskItem:
    """An order record with two dates, two people and a price; the question asks for one (in turn by index)."""
    buyer, approver = (f"{first} {last}" for first, last in zip(rng.sample(FIRST, 2), rng.sample(LAST, 2),
                                                                strict=True))
    year, month = rng.randint(2015, 2024), rng.randrange(12)
    ordered = rng.randint(1, 14)
    values = {"ordered_on": f"{ordered} {MONTHS[month]} {year}",
              "delivered_on": f"{ordered + rng.randint(3, 14)} {MONTHS[month]} {year}",
              "buyer": buyer, "approver": approver,
              "price": f"${rng.randint(120, 98000):,}.{rng.randrange(100):02d}"}
    passage = (f"Order {rng.randint(1000, 9999)}: {rng.randint(2, 40)} {rng.choice(GOODS)} for the "
               f"{rng.choice(CITIES)} office were ordered by {buyer} on {values['ordered_on']} and approved by "
               f"{approver}. The invoice total was {values['price']}, and the goods were delivered on "
               f"{values['delivered_on']}.")
    field = list(QUESTIONS)[index % len(QUESTIONS)]
    prompt = f"{EXTRACT_INSTRUCTION}\n\nPassage: {passage}\n\nQuestion: {QUESTIONS[field]}"
    return TaskItem(item_id, prompt, values[field], "extract")


SUBJECTS: dict[str, dict[str, dict[str, Any]]] = {
    "book": {"title": {"type": "string"}, "year": {"type": "integer"}, "rating": {"type": "number"},
             "in_print": {"type": "boolean"}, "genres": {"type": "array", "items": {"type": "string"}},
             "format": {"enum": ["hardcover", "paperback", "ebook"]}},
    "user": {"name": {"type": "string"}, "age": {"type": "integer"}, "verified": {"type": "boolean"},
             "roles": {"type": "array", "items": {"type": "string"}}, "plan": {"enum": ["free", "pro", "team"]}},
    "product": {"name": {"type": "string"}, "price": {"type": "number"}, "stock": {"type": "integer"},
                "available": {"type": "boolean"}, "category": {"enum": ["tools", "garden", "kitchen"]}},
    "event": {"title": {"type": "string"}, "attendees": {"type": "integer"}, "online": {"type": "boolean"},
              "hours": {"type": "number"}, "level": {"enum": ["beginner", "advanced"]}},
}


def _describe(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        options = schema["enum"]
        return f"the integer {options[0]}" if len(options) == 1 else "one of " + ", ".join(
            json.dumps(o) for o in options)
    return {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
            "array": "a list of strings"}[schema["type"]]


def json_item(rng: random.Random, item_id: str) -> TaskItem:
    """A JSON object with 3-5 named fields of given types and a fixed `id`; the answer is its schema."""
    subject = rng.choice(sorted(SUBJECTS))
    fields = rng.sample(sorted(SUBJECTS[subject]), rng.randint(3, 5))
    properties = {name: SUBJECTS[subject][name] for name in fields} | {"id": {"enum": [rng.randint(1, 999)]}}
    schema = {"type": "object", "properties": properties, "required": list(properties),
              "additionalProperties": False}
    lines = "\n".join(f'- "{name}": {_describe(field)}' for name, field in properties.items())
    prompt = (f"Write a JSON object describing a {subject} with exactly these fields:\n{lines}\n"
              "Reply with the JSON object only.")
    return TaskItem(item_id, prompt, json.dumps(schema, sort_keys=True), "json")


def _words(rng: random.Random) -> str:
    return " ".join("".join(rng.choice("abcdeiou" + "lmnrst") for _ in range(rng.randint(2, 6)))
                    for _ in range(rng.randint(1, 4)))


def _ints(rng: random.Random, low: int = -20, high: int = 20, least: int = 1) -> list[int]:
    return [rng.randint(low, high) for _ in range(rng.randint(least, 7))]


# (function, parameters, what it returns, a reference solution, one call's arguments drawn from an rng)
CodeProblem = tuple[str, str, str, str, Callable[[random.Random], tuple[Any, ...]]]
CODE_PROBLEMS: list[CodeProblem] = [
    ("add", "a, b", "the sum of the integers a and b", "return a + b",
     lambda r: (r.randint(-99, 99), r.randint(-99, 99))),
    ("is_even", "n", "True when the integer n is even, else False", "return n % 2 == 0",
     lambda r: (r.randint(-50, 50),)),
    ("factorial", "n", "n! for an integer n >= 0 (0! is 1)", "import math\n    return math.factorial(n)",
     lambda r: (r.randint(0, 10),)),
    ("reverse_string", "s", "the string s reversed", "return s[::-1]", lambda r: (_words(r),)),
    ("count_vowels", "s", "how many of the characters of s are one of a, e, i, o, u",
     "return sum(c in 'aeiou' for c in s)", lambda r: (_words(r),)),
    ("largest", "xs", "the largest element of the non-empty list of integers xs", "return max(xs)",
     lambda r: (_ints(r),)),
    ("sum_of_squares", "xs", "the sum of the squares of the integers in the list xs",
     "return sum(x * x for x in xs)", lambda r: (_ints(r, least=0),)),
    ("fizzbuzz", "n", '"FizzBuzz" if the integer n is divisible by 15, "Fizz" if by 3, "Buzz" if by 5, else str(n)',
     "return 'FizzBuzz' if n % 15 == 0 else 'Fizz' if n % 3 == 0 else 'Buzz' if n % 5 == 0 else str(n)",
     lambda r: (r.choice([3, 5, 15, 1]) * r.randint(1, 20),)),
    ("is_palindrome", "s", "True when the string s reads the same backwards, else False", "return s == s[::-1]",
     lambda r: ((w := _words(r).replace(" ", "")) + (w[::-1] if r.random() < 0.5 else ""),)),
    ("gcd", "a, b", "the greatest common divisor of the positive integers a and b",
     "import math\n    return math.gcd(a, b)",
     lambda r: (r.randint(1, 30) * (k := r.randint(1, 12)), r.randint(1, 30) * k)),
    ("fibonacci", "n", "the n-th Fibonacci number, where fibonacci(0) is 0 and fibonacci(1) is 1",
     "a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a", lambda r: (r.randint(0, 25),)),
    ("unique_sorted", "xs", "the distinct elements of the list of integers xs in increasing order",
     "return sorted(set(xs))", lambda r: (_ints(r, -5, 5, 0),)),
    ("second_largest", "xs", "the second largest distinct value in the list of integers xs (it has at least two)",
     "return sorted(set(xs))[-2]", lambda r: (_ints(r, -9, 9) + [10, -10],)),
    ("flatten", "xss", "the elements of the lists in the list xss, in order, as one list",
     "return [x for xs in xss for x in xs]", lambda r: ([_ints(r, least=0) for _ in range(r.randint(0, 3))],)),
    ("is_prime", "n", "True when the integer n is a prime number, else False",
     "return n > 1 and all(n % k for k in range(2, int(n ** 0.5) + 1))", lambda r: (r.randint(-3, 100),)),
    ("digit_sum", "n", "the sum of the decimal digits of the integer n >= 0", "return sum(map(int, str(n)))",
     lambda r: (r.randint(0, 10**6),)),
    ("capitalize_words", "s", "s with the first letter of each word in upper case (words are separated by single "
     "spaces and are lower case)", "return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))",
     lambda r: (_words(r),)),
    ("running_sum", "xs", "the list of running totals of the integers in xs (the i-th is xs[0] + ... + xs[i])",
     "import itertools\n    return list(itertools.accumulate(xs))", lambda r: (_ints(r, least=0),)),
    ("count_char", "s, c", "how many times the character c occurs in the string s", "return s.count(c)",
     lambda r: ((s := _words(r)), r.choice(s))),
    ("dedupe", "xs", "the list xs without repeated elements, each kept where it first occurs",
     "return list(dict.fromkeys(xs))", lambda r: (_ints(r, -4, 4),)),
]


def code_item(rng: random.Random, item_id: str, index: int) -> TaskItem:
    """Problem `index` of CODE_PROBLEMS; its tests assert the reference's results on three drawn calls."""
    function, parameters, returns, body, draw = CODE_PROBLEMS[index % len(CODE_PROBLEMS)]
    namespace: dict[str, Any] = {}
    exec(f"def {function}({parameters}):\n    {body}\n", namespace)  # our own reference, to compute the asserts
    calls = [draw(rng) for _ in range(3)]
    tests = "\n".join(f"assert {function}({', '.join(map(repr, args))}) == {namespace[function](*args)!r}"
                      for args in calls)
    prompt = (f"Write a Python function `{function}({parameters})` that returns {returns}. Reply with the code "
              "in a ```python block.")
    return TaskItem(item_id, prompt, tests, "code")


BUILTIN_SIZES = {"arithmetic": 50, "extract": 30, "json": 30, "code": len(CODE_PROBLEMS)}


def builtin_task(name: str, seed: int = 0) -> Task:
    """A built-in task, generated: the same name and seed give the same items."""
    if name not in BUILTIN_SIZES:
        raise ValueError(f"unknown task {name!r}: one of {', '.join(BUILTIN_SIZES)}, or a JSON-lines file")
    items = []
    for index in range(BUILTIN_SIZES[name]):
        rng, item_id = random.Random(f"{name}/{seed}/{index}"), f"{name}-{index:03d}"
        if name == "arithmetic":
            items.append(arithmetic_item(rng, item_id))
        elif name == "extract":
            items.append(extract_item(rng, item_id, index))
        elif name == "json":
            items.append(json_item(rng, item_id))
        else:
            items.append(code_item(rng, item_id, index))
    return Task(name, tuple(items))


# ------------------------------------------------------------------------------------------------- files
def load_task_file(path: str | Path) -> Task:
    """A GSM8K-style JSON-lines file: `{"question": ..., "answer": ...}` per line, the answer a rationale ending
    in "#### N" or a bare number. The task is named after the file; item ids are "line-N". A bad line is refused
    with one line naming the file and line."""
    path = Path(path)
    lines = read_lines(path, "task file", "JSON lines with question and answer")
    items = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            question, reference = _question_answer(line, f"{path}:{number}")
            items.append(TaskItem(f"line-{number}", f"{question}\n\n{NUMBER_INSTRUCTION}", reference, "number"))
    if not items:
        raise ValueError(f"{path} has no questions")
    return Task(path.name, tuple(items))


def _question_answer(line: str, where: str) -> tuple[str, str]:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not JSON ({error.msg}): expected {{\"question\": ..., \"answer\": ...}}") from None
    if not isinstance(data, dict) or not isinstance(data.get("question"), str) or not data["question"].strip():
        raise ValueError(f'{where}: expected a JSON object with a "question" string and an "answer"')
    answer = data.get("answer")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise ValueError(f'{where}: expected an "answer": a string ending in "#### N", or a number')
    tail = answer.rsplit("####", 1)[1] if "####" in answer else answer
    found = NUMBER.fullmatch(tail.strip())
    if not found:
        raise ValueError(f'{where}: the answer must end in "#### N" with N a number (or be a number), '
                         f"got {tail.strip()[:40]!r}")
    return data["question"].strip(), found.group().replace(",", "")


def load_task(spec: str, limit: int | None = None) -> Task:
    """A built-in task by name, else a task file by path; with `limit`, its first `limit` items."""
    if limit is not None and limit < 1:
        raise ValueError("--limit must be >= 1")
    if spec in BUILTIN_SIZES:
        task = builtin_task(spec)
    elif Path(spec).is_file():
        task = load_task_file(spec)
    else:
        raise ValueError(f"unknown task {spec!r}: one of {', '.join(BUILTIN_SIZES)}, or a JSON-lines file of "
                         '{"question": ..., "answer": ...} (no such file)')
    return Task(task.name, task.items[:limit])


def item_tags(task: Task, item: TaskItem) -> dict[str, str]:
    """What a run of the item carries, so that its output can be checked from the stored run alone."""
    return {TASK: task.name, TASK_ITEM: item.id, TASK_CHECK: item.check, TASK_ANSWER: item.answer}


# ------------------------------------------------------------------------------------------------ accuracy
Z95 = NormalDist().inv_cdf(0.975)

def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion: (p + z²/2n ± z √(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    if not 0 <= correct <= n or n < 1:
        raise ValueError(f"need 0 <= correct <= n and n >= 1, got {correct}/{n}")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class TaskRow:
    """One method's accuracy on one task: pooled over items and seeds, with the Wilson interval; with several
    seeds also the mean of the per-seed accuracies with its t interval (None with one seed)."""

    task: str
    method: str
    n: int
    correct: int
    accuracy: float
    low: float
    high: float
    seeds: int
    seed_mean: float | None = None
    seed_low: float | None = None
    seed_high: float | None = None


def task_report(traces: Iterable[Trace]) -> list[TaskRow]:
    """Check every finished run that carries a task's tags (a failed or cancelled run has no answer and is left
    out) and tabulate accuracy per task and method, sorted by both."""
    verdicts: dict[tuple[str, str], dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for trace in traces:
        tags = trace.started.tags
        if trace.status != "ok" or TASK not in tags or tags.get(TASK_CHECK) not in CHECKS:
            continue
        correct = CHECKS[tags[TASK_CHECK]](trace.text, tags.get(TASK_ANSWER, ""))
        verdicts[tags[TASK], method_label(trace)][trace.started.seed].append(correct)
    rows = []
    for (task, method), per_seed in sorted(verdicts.items()):
        pooled = [v for seed in sorted(per_seed) for v in per_seed[seed]]
        low, high = wilson_interval(sum(pooled), len(pooled))
        spread: tuple[float | None, ...] = (None, None, None)
        if len(per_seed) > 1:
            spread = mean_interval([fmean(per_seed[seed]) for seed in sorted(per_seed)])  # explorer.quality's
        rows.append(TaskRow(task, method, len(pooled), sum(pooled), sum(pooled) / len(pooled), low, high,
                            len(per_seed), *spread))
    return rows


def task_runs(traces: Iterable[Trace], task: Task, methods: Sequence[str], seeds: int, max_new_tokens: int,
              model_id: str | None = None) -> list[Trace]:
    """The runs of one sweep over `task`: for each item x method x seed the last (in the given order) that
    finished ok with this length (and model, where given)."""
    ids, labels = {item.id for item in task.items}, set(methods)
    chosen: dict[tuple[str, str, int], Trace] = {}
    for trace in traces:
        started = trace.started
        if (trace.status == "ok" and started.tags.get(TASK) == task.name and started.tags.get(TASK_ITEM) in ids
                and method_label(trace) in labels and 0 <= started.seed < seeds
                and started.max_new_tokens == max_new_tokens and model_id in (None, started.model_id)):
            chosen[started.tags[TASK_ITEM], method_label(trace), started.seed] = trace
    return list(chosen.values())


def _percent(value: float | None) -> str:
    return "--" if value is None else f"{100 * value:.1f}"


def _seed_cell(row: TaskRow, dash: str) -> str:
    if row.seed_mean is None:
        return dash
    return f"{_percent(row.seed_mean)} [{_percent(row.seed_low)}, {_percent(row.seed_high)}]"


def tasks_markdown(rows: Sequence[TaskRow]) -> str:
    lines = ["| task | method | n | correct | accuracy % | 95 % Wilson interval | seeds | "
             "per-seed mean % [95 % t] |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.task} | {row.method} | {row.n} | {row.correct} | {_percent(row.accuracy)} | "
                     f"[{_percent(row.low)}, {_percent(row.high)}] | {row.seeds} | {_seed_cell(row, '--')} |")
    return "\n".join(lines) + "\n"


def tasks_latex(rows: Sequence[TaskRow]) -> str:
    lines = [r"\begin{tabular}{llrrrcrc}", r"\toprule",
             r"Task & Method & $n$ & Correct & Acc.\ (\%) & 95\,\% Wilson & Seeds & Per-seed mean [95\,\% $t$] \\",
             r"\midrule"]
    for row in rows:
        lines.append(f"{latex_escape(row.task)} & {latex_escape(row.method)} & {row.n} & {row.correct} & "
                     f"{_percent(row.accuracy)} & [{_percent(row.low)}, {_percent(row.high)}] & {row.seeds} & "
                     f"{_seed_cell(row, '--')}" + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def summary_lines(rows: Sequence[TaskRow]) -> list[str]:
    """One line per method, as the sweep prints them at its end."""
    lines = []
    for row in rows:
        line = (f"task {row.task}: {row.method}: {row.correct}/{row.n} correct = {_percent(row.accuracy)} % "
                f"(95 % Wilson interval {_percent(row.low)}-{_percent(row.high)} %)")
        if row.seed_mean is not None:
            line += (f"; per-seed mean over {row.seeds} seeds {_percent(row.seed_mean)} % "
                     f"(95 % t interval {_percent(row.seed_low)}-{_percent(row.seed_high)} %)")
        lines.append(line)
    return lines
