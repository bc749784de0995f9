"""Persistent trace store (SQLAlchemy 2.0)."""

from store.repository import RunSummary, Store, default_url, delete_run, list_runs, load_trace, save_trace

__all__ = ["RunSummary", "Store", "default_url", "delete_run", "list_runs", "load_trace", "save_trace"]
