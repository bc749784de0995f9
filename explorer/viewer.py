"""Who may see a stored run: the one place that decides (imports nothing of ours, and no torch).

Every run is owned by the browser session (or API client session, or signed-in user) that made it (`owner_of`).
A visitor sees its own runs and the runs it opened by id (a permalink is a share: knowing a run's id is leave to
open it, and opening it shares it), or everyone's where the server turns the public gallery on; it deletes only
its own. The app builds one `Viewer` per request (`ServerPolicy.viewer`, from the request's owner and its
`Shares`); the store takes it and filters its queries by it in SQL (`Store.list_runs`, `family`, `delete_run`),
where `None` is a trusted caller (the CLI) that sees every run.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_SHARED = 200  # runs a visitor remembers having opened by id


def owner_of(request: Any) -> str:
    """Who owns what this request (a `gr.Request`, or None) stores: its signed-in user, else its session."""
    username = getattr(request, "username", None)  # signed in (Hugging Face OAuth on a Space, or app auth)
    if username:
        return f"user:{username}"
    session = getattr(request, "session_hash", None)
    return f"session:{session}" if session else "session:anonymous"


@dataclass(frozen=True)
class Viewer:
    """One request's visitor: its `owner` (`owner_of`), the runs `shared` with it (opened by id), and whether the
    server's public `gallery` shows it everyone's runs. The store applies `may_see` in SQL (a test holds the two
    to the same answers)."""

    owner: str
    shared: frozenset[str] = frozenset()
    gallery: bool = False

    def may_see(self, run_owner: str | None, run_id: str) -> bool:
        """Whether this visitor may list, export and see in a branch tree the run `run_id` of `run_owner`."""
        return self.gallery or run_owner == self.owner or run_id in self.shared

    def may_delete(self, run_owner: str | None) -> bool:
        """Only the owner deletes, gallery or not."""
        return run_owner == self.owner

    def visible(self, owners: Mapping[str, str | None], run_ids: Iterable[str]) -> list[str]:
        """The ids among `run_ids` this visitor may see, given `owners` ({run id: owner} of those that exist)."""
        return [run_id for run_id in run_ids if self.may_see(owners.get(run_id), run_id)]


class Shares:
    """The runs each visitor has opened by id, its newest `keep` (in this process's memory: a restart forgets
    them, and the runs are their owners' alone again)."""

    def __init__(self, keep: int = MAX_SHARED) -> None:
        self.keep = keep
        self._runs: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def add(self, owner: str, run_ids: Iterable[str]) -> None:
        with self._lock:
            known = self._runs.setdefault(owner, [])
            known += [run_id for run_id in run_ids if run_id not in known]
            del known[:-self.keep]

    def of(self, owner: str) -> frozenset[str]:
        with self._lock:
            return frozenset(self._runs.get(owner, ()))
