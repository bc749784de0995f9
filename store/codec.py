"""Event <-> row encoding. Lists of numbers go into one packed BLOB per event (far smaller and faster than a
row per rank); everything else is JSON. Floats are stored as float64, so a round trip is exact."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from explorer.events import from_dict, to_dict

_DTYPES = {"i8": np.int64, "f8": np.float64}


def _array_dtype(values: list[Any]) -> str | None:
    if not values:
        return None
    if all(type(v) is int for v in values):
        return "i8" if all(-(2**63) <= v < 2**63 for v in values) else None
    if all(type(v) is float for v in values):
        return "f8"
    return None


def encode(event: Any) -> tuple[str, str, bytes | None]:
    """Return (kind, fields JSON, arrays blob) for one event."""
    plain: dict[str, Any] = {}
    layout: list[list[Any]] = []
    chunks: list[bytes] = []
    for name, value in to_dict(event).items():
        dtype = _array_dtype(value) if isinstance(value, list) else None
        if dtype is None:
            plain[name] = value
        else:
            layout.append([name, dtype, len(value)])
            chunks.append(np.asarray(value, dtype=_DTYPES[dtype]).tobytes())
    if layout:
        plain["__arrays__"] = layout
    return event.kind, dumps(plain), b"".join(chunks) if chunks else None


def decode(kind: str, fields: str, arrays: bytes | None) -> Any:
    data = json.loads(fields)
    offset = 0
    for name, dtype, count in data.pop("__arrays__", []):
        array = np.frombuffer(arrays or b"", dtype=_DTYPES[dtype], count=count, offset=offset)
        offset += array.nbytes
        data[name] = array.tolist()
    return from_dict(kind, data)


def dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, allow_nan=True)
