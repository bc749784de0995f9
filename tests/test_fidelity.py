"""The fidelity ledger: every registered strategy has an entry, README carries the generated table, and the CLI
and the app show it."""

import subprocess
import sys
from pathlib import Path

from explorer import fidelity
from explorer.strategies import REGISTRY

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_registered_strategy_has_a_ledger_entry():
    assert fidelity.missing_entries() == [], "add paper= and reference_code= to their register(...) calls"
    names = [entry.name for entry in fidelity.ledger()]
    assert sorted(names) == sorted(REGISTRY)


def test_entries_name_a_repository_or_say_none_is_public():
    for entry in fidelity.ledger():
        code = entry.reference_code
        assert entry.repository or code.startswith("none public"), (entry.name, code)
        assert all(d.strip() and "\n" not in d for d in entry.departures), entry.name


def test_status_follows_the_departures():
    for entry in fidelity.ledger():
        assert entry.status == ("departures" if entry.departures else "faithful")
        assert REGISTRY[entry.name].fidelity == entry.status


def test_readme_carries_the_generated_ledger():
    section = fidelity.readme_section(README.read_text(encoding="utf-8"))
    assert section == fidelity.ledger_markdown(), "stale: run `python -m explorer.fidelity` to rewrite it"


def test_entry_markdown_lists_each_departure():
    named = next(e for e in fidelity.ledger() if e.departures)
    text = fidelity.entry_markdown(named.name)
    assert all(f"- {d}" in text for d in named.departures) and named.reference_code in text


def test_ledger_html_escapes_and_marks_the_chosen_row():
    html = fidelity.ledger_html(highlight="greedy")
    assert '<tr id="fidelity-greedy" class="fidelity-chosen">' in html
    assert html.count("<tr id=") == len(REGISTRY)


def test_cli_prints_the_ledger():
    result = subprocess.run([sys.executable, "-m", "explorer", "strategies", "--fidelity"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in REGISTRY:
        assert f"\n{name} [" in "\n" + result.stdout
    table = subprocess.run([sys.executable, "-m", "explorer", "strategies", "--fidelity", "--markdown"],
                           capture_output=True, text=True, timeout=120)
    assert table.stdout == fidelity.ledger_markdown()
    bad = subprocess.run([sys.executable, "-m", "explorer", "strategies", "--markdown"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "--fidelity" in bad.stderr
