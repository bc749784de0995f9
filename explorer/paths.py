"""Where the explorer keeps its files (no model libraries imported here)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Directory for converted models and the default database (`$DECODING_EXPLORER_CACHE`)."""
    env = os.environ.get("DECODING_EXPLORER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "decoding-explorer"
