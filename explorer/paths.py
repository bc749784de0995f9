"""Where the explorer keeps its files (no model libraries imported here)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Directory for converted models and the default database (`$DECODING_EXPLORER_CACHE`)."""
    env = os.environ.get("DECODING_EXPLORER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "decoding-explorer"


def read_lines(path: str | Path, what: str, expected: str) -> list[str]:
    """A text file's lines, for the readers of user files (prompts, tasks, reference texts): unreadable or not
    UTF-8 is one ValueError line naming the file, `what` it was meant to be and the format `expected`."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ValueError(f"cannot read the {what} {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: a {what} is {expected}") from None
