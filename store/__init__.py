"""Persistent trace store (SQLAlchemy 2.0): `Store(url)` takes and returns `Trace` objects."""

from store.repository import RunSummary, Store, default_url

__all__ = ["RunSummary", "Store", "default_url"]
