"""What a JOB asks for, as a digest: the result cache answers a JOB only when both its
attempt id and this digest match the answer's.

The digest covers the steps, the input (URL, or the inline payload's bytes), the output
(URL, format, quality, options, headers) and, for an item group, every item. It leaves
out what a faithful re-send of the same attempt changes: the time left (timeoutS,
itemTimeoutS) and the query string of operator-signed storage URLs, which carries a
fresh signature and expiry each time the operator signs (after its restart, say). A
user's own URL (`untrusted`) is kept whole: there the query can name another image.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def _object(url: Any, *, signed: bool) -> str:
    """`url` as the object it addresses: without the query when the operator signed it."""
    text = str(url or "")
    if not signed:
        return text
    parts = urlsplit(text)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def request_digest(header: Mapping[str, Any], payload: bytes | None) -> str:
    """Hex SHA-256 of what the JOB in `header` (with its inline `payload`) asks for.

    Never raises on a malformed header: such a JOB is refused later, and its digest only
    has to differ from a well-formed one's."""
    source = header.get("input")
    source = source if isinstance(source, Mapping) else {}
    output = header.get("output")
    output = dict(output) if isinstance(output, Mapping) else {}
    output["url"] = _object(output.get("url"), signed=True)
    asked: dict[str, Any] = {"steps": header.get("steps"), "output": output}
    if payload is not None:
        asked["inline"] = hashlib.sha256(payload).hexdigest()
    else:
        untrusted = bool(source.get("untrusted"))
        asked["input"] = {"url": _object(source.get("url"), signed=not untrusted), "untrusted": untrusted}
    items = header.get("items")
    if isinstance(items, list):
        asked["items"] = [
            {**item, "input": _object(item.get("input"), signed=True), "output": _object(item.get("output"), signed=True)}
            if isinstance(item, Mapping) else item for item in items]
    encoded = json.dumps(asked, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(encoded.encode()).hexdigest()
