"""Strip credentials from any text before a user or a log can see it.

A presigned S3 URL (SigV4: X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token;
SigV2: Signature, AWSAccessKeyId), an Azure SAS (sig=) or a GCS signed URL stays
valid for hours: whoever reads it can read the tenant's input or overwrite its output.
`redact` is applied at every edge where text leaves a process: worker error messages
before they are sent, status messages and Events, log records (RedactFilter), the
status API and /metrics.

Two passes, so that a URL the first pass does not recognise (percent-encoded inside
another URL, JSON-escaped, without a scheme, cut short) still loses its secrets:

1. every scheme://... URL loses its userinfo, and its whole query and fragment when
   any parameter name (percent-decoded, any case) is a credential;
2. anywhere in the text, the value after a credential parameter name (also in its
   percent-encoded forms) is replaced.

Over-redaction is accepted: a redacted message is still useful ("download failed
with HTTP 403 for http://host/bucket/key?<redacted>"), a leaked signature is not.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote

REDACTED = "<redacted>"

# Parameter names (lowercase, decoded) that carry a credential or a signature.
_SECRET_PARAMS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token",
    "signature", "awsaccesskeyid",                    # S3 SigV2 query auth
    "sig",                                            # Azure SAS
    "x-goog-signature", "x-goog-credential", "googleaccessid",
    "token", "access_token", "sas", "code", "password", "secret",
})

# A URL: scheme://, then anything up to whitespace, a quote or an angle bracket.
_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]{0,30}:(?://|\\/\\/))([^\s\"'<>`]*)")

# A separator that may be literal or percent-encoded once or twice.
_DASH = r"(?:-|%2d|%252d)"
_EQ = r"(?:=|%3d|%253d)"
_NAMES = "|".join([
    rf"x{_DASH}amz{_DASH}(?:signature|credential|security{_DASH}token)",
    rf"x{_DASH}goog{_DASH}(?:signature|credential)",
    r"signature", r"credential", r"awsaccesskeyid", r"googleaccessid", r"sig",
])
# Pass 2: NAME= VALUE anywhere (not preceded by a letter, digit or _ so `xsig=` is not
# a hit; over-matching `signature=` in prose is harmless). The value runs to the
# next literal & or whitespace/quote; percent-encoded & (%26) is swallowed with it,
# which only redacts more.
_PARAM = re.compile(rf"(?i)(?<![a-z0-9_])({_NAMES}){_EQ}(?!<redacted>)([^&\s\"'<>`]*)")
# Bearer tokens (a ServiceAccount token in an Authorization header someone logged).
_BEARER = re.compile(r"(?i)\b(bearer)\s+[a-z0-9._~+/=\-]+")


def _decoded(name: str) -> str:
    # Up to three rounds: a URL nested in another URL's query is encoded twice or more.
    for _ in range(3):
        decoded = unquote(name)
        if decoded == name:
            break
        name = decoded
    return name.strip().lower()


def _redact_url(match: re.Match[str]) -> str:
    scheme, rest = match.group(1), match.group(2)
    slash = rest.find("/")
    authority_end = len(rest) if slash < 0 else slash
    for sep in ("?", "#"):
        at = rest.find(sep)
        if 0 <= at < authority_end:
            authority_end = at
    authority, tail = rest[:authority_end], rest[authority_end:]
    if "@" in authority:
        # user:password@host: keep the host, drop the credentials.
        authority = f"{REDACTED}@{authority.rpartition('@')[2]}"
    query_at = min((i for i in (tail.find("?"), tail.find("#")) if i >= 0), default=-1)
    if query_at >= 0:
        query = tail[query_at + 1:]
        names = (part.split("=", 1)[0] for part in re.split(r"[&;#?]", query))
        if any(_decoded(name) in _SECRET_PARAMS for name in names):
            tail = tail[:query_at] + "?" + REDACTED
    return scheme + authority + tail


def redact(text: str) -> str:
    """`text` with every credential-bearing URL query, URL userinfo and signature
    parameter value replaced by <redacted>. Pure; safe on any string."""
    if not text:
        return text
    text = _URL.sub(_redact_url, text)
    text = _PARAM.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


def redact_json(value: Any) -> Any:
    """A JSON-like value with `redact` applied to every string in it (keys included)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_json(k): redact_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_json(v) for v in value]
    return value


class RedactFilter(logging.Filter):
    """Redacts a record's message and exception text in place; never drops a record.

    Installed on a handler it sees every record that handler emits, whichever logger
    it came from (a filter on a logger sees only records logged on that very logger,
    not those propagated from its children)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            # A bad format string: logging would report it anyway; keep the raw text.
            message = str(record.msg)
        record.msg, record.args = redact(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_installed = False


def install_log_redaction() -> None:
    """Redact every log record of this process, whatever logger and handler it takes.

    The filter goes on the root logger and on each of its handlers (kopf's, basicConfig's,
    werkzeug's...), and the record factory redacts each record as it is made, so handlers
    attached later (kopf's Event poster is one) never see a secret either."""
    global _installed
    root = logging.getLogger()
    flt = RedactFilter()
    for target in (root, *root.handlers):
        if not any(isinstance(f, RedactFilter) for f in target.filters):
            target.addFilter(flt)
    if _installed:
        return
    _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        flt.filter(record)
        return record

    logging.setLogRecordFactory(factory)
