"""RFC 3339 timestamps as the Kubernetes API writes them, from and to epoch seconds (pure)."""

from __future__ import annotations

import datetime as dt
from typing import Any


def now_rfc3339(epoch: float | None = None) -> str:
    moment = dt.datetime.fromtimestamp(epoch, dt.UTC) if epoch is not None else dt.datetime.now(dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
