"""The fidelity ledger: for every built-in strategy (not a plugin's), the paper, the authors' code it follows, and
each way it departs from them, generated from the registry (`register(..., paper=, reference_code=, departures=)`),
never kept by hand. The strategy docstrings stay the source of the reasoning; the registry carries the structured
part.

Shown by `python -m explorer strategies --fidelity`, in the app (a lane's description line ends in its status,
which opens its entry), and in README.md between the `fidelity-ledger` markers (`python -m explorer.fidelity`
rewrites that section; a test fails when it is stale or when a registered strategy has no entry).
"""

from __future__ import annotations

import html
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from explorer.strategies import REGISTRY

README_START, README_END = "<!-- fidelity-ledger -->", "<!-- /fidelity-ledger -->"
ARXIV = re.compile(r"arXiv:(\d{4}\.\d{4,5})")


@dataclass(frozen=True)
class Entry:
    name: str
    family: str
    paper: str
    reference_code: str  # "owner/repo: path: function", or "none public"
    departures: tuple[str, ...]

    @property
    def status(self) -> str:
        return "departures" if self.departures else "faithful"

    @property
    def arxiv_ids(self) -> list[str]:
        return ARXIV.findall(self.paper)

    @property
    def repository(self) -> str:
        """The authors' repository ('owner/name'), '' when none is public."""
        head = self.reference_code.split(":", 1)[0].strip()
        return head if re.fullmatch(r"[\w.-]+/[\w.-]+", head) else ""


def ledger() -> list[Entry]:
    """Every built-in strategy's entry, by family then name (a plugin's strategies are not this project's)."""
    from explorer.strategies.base import FAMILIES

    specs = sorted((s for s in REGISTRY.values() if not s.plugin), key=lambda s: (FAMILIES.index(s.family), s.name))
    return [Entry(s.name, s.family, s.paper, s.reference_code, s.departures) for s in specs]


def missing_entries() -> list[str]:
    """Registered strategies without a paper or a reference_code: the ledger test fails on any."""
    return [e.name for e in ledger() if not e.paper.strip() or not e.reference_code.strip()]


def entry(name: str) -> Entry:
    for item in ledger():
        if item.name == name:
            return item
    raise ValueError(f"no ledger entry for {name!r}: choose one of {', '.join(e.name for e in ledger())}")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def ledger_markdown() -> str:
    """One table: strategy, family, paper, authors' code, status, departures (one per line)."""
    lines = ["| strategy | family | paper | authors' code | status | departures |",
             "|---|---|---|---|---|---|"]
    for item in ledger():
        departures = "<br>".join(f"• {_cell(d)}" for d in item.departures) or "—"
        lines.append(f"| `{item.name}` | {item.family} | {_cell(item.paper)} | {_cell(item.reference_code)} | "
                     f"{item.status} | {departures} |")
    return "\n".join(lines) + "\n"


def entry_markdown(name: str, heading: bool = True) -> str:
    """One strategy's entry (the app opens it under a lane's description line, without the heading)."""
    item = entry(name)
    head = (f"### `{item.name}` · {item.status}\n\n" if heading else "") + (
        f"**Paper**: {item.paper}\n\n**Authors' code**: {item.reference_code or 'not recorded'}\n\n")
    if not item.departures:
        return head + "No departures: this strategy follows the paper and the authors' code.\n"
    return head + "**Departures from the paper and the authors' code**:\n\n" + "".join(
        f"- {d}\n" for d in item.departures)


def ledger_html(highlight: str = "") -> str:
    """The ledger as an HTML table (escaped: the text is ours, but escaping costs nothing)."""
    rows = []
    for item in ledger():
        departures = "".join(f"<li>{html.escape(d)}</li>" for d in item.departures) or "—"
        if item.departures:
            departures = f"<ul>{departures}</ul>"
        mark = ' class="fidelity-chosen"' if item.name == highlight else ""
        rows.append(f'<tr id="fidelity-{html.escape(item.name)}"{mark}><td><code>{html.escape(item.name)}</code></td>'
                    f"<td>{html.escape(item.family)}</td><td>{html.escape(item.paper)}</td>"
                    f"<td>{html.escape(item.reference_code)}</td><td>{item.status}</td><td>{departures}</td></tr>")
    head = ("<tr><th>strategy</th><th>family</th><th>paper</th><th>authors' code</th><th>status</th>"
            "<th>departures</th></tr>")
    return f'<table class="fidelity-ledger">{head}{"".join(rows)}</table>'


def ledger_text() -> str:
    """The ledger for a terminal: one block per strategy."""
    out = []
    for item in ledger():
        out.append(f"{item.name} [{item.status}] ({item.family})")
        out.append(f"    paper: {item.paper}")
        out.append(f"    authors' code: {item.reference_code}")
        out += [f"    - {d}" for d in item.departures]
    return "\n".join(out) + "\n"


def readme_section(readme: str) -> str:
    """The text between the README's ledger markers ('' when it has none)."""
    start, end = readme.find(README_START), readme.find(README_END)
    return readme[start + len(README_START):end].strip("\n") + "\n" if 0 <= start < end else ""


def write_readme(path: Path) -> bool:
    """Rewrite the ledger section of README.md; True when it changed."""
    text = path.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if not 0 <= start < end:
        raise ValueError(f"{path} has no {README_START} ... {README_END} section")
    new = text[:start + len(README_START)] + "\n" + ledger_markdown() + text[end:]
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    changed = write_readme(Path(__file__).resolve().parents[1] / "README.md")
    print("README.md: fidelity ledger " + ("rewritten" if changed else "already current"), file=sys.stderr)
