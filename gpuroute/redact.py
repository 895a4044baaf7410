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
   any parameter name in it is a credential, after percent-encoding, JSON `\\uXXXX` and
   Python `\\xXX` escapes are undone to a fixed point (a URL nested in a URL nested in a
   URL is encoded three times: its names are still found);
2. anywhere in the text, the value after a credential name is replaced, whatever the
   separator is spelled like: `name=v`, `name: v` (a header), `"name": "v"` (JSON),
   `'name': ['v']` (the repr of a parsed query), `name\\u003dv`, `name%25253Dv`, or
   the value on the next line.

Over-redaction is accepted: a redacted message is still useful ("download failed
with HTTP 403 for http://host/bucket/key?<redacted>"), a leaked signature is not.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote

REDACTED = "<redacted>"

# Parameter names (lowercase, decoded) that carry a credential or a signature, or that
# only appear in a signed URL (an Azure user delegation SAS names its key's owner).
_SECRET_PARAMS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token",
    "signature", "awsaccesskeyid",                    # S3 SigV2 query auth
    "sig", "skoid", "sktid",                          # Azure SAS (user delegation)
    "x-goog-signature", "x-goog-credential", "googleaccessid",
    "token", "access_token", "refresh_token", "id_token", "sas", "sas_token",
    "code", "password", "passwd", "secret", "client_secret",
})
# Pass 2 looks for names in free text: `code` there is mostly an HTTP status code, and
# `credential` is how a SigV4 Authorization header spells the access key id.
_TEXT_NAMES = (_SECRET_PARAMS - {"code"}) | {"credential"}

# A URL: scheme://, then anything up to whitespace, a quote or an angle bracket.
_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]{0,30}:(?://|\\/\\/))([^\s\"'<>`]*)")

# Escapes undone before names are compared: %XX, \uXXXX (JSON), \xXX (Python repr), \/ (JSON).
_ESCAPE = re.compile(r"(?i)\\u([0-9a-f]{4})|\\x([0-9a-f]{2})|\\(/)")
_MAX_DECODE_ROUNDS = 32
"""Text still changing after this many rounds of decoding is treated as hiding a secret."""


def _decode_to_fixed_point(text: str) -> str | None:
    """`text` with percent-encoding and JSON/Python escapes undone until nothing changes;
    None when that takes more than _MAX_DECODE_ROUNDS rounds."""
    for _ in range(_MAX_DECODE_ROUNDS):
        decoded = _ESCAPE.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)) if m.group(3) is None else "/",
                              unquote(text))
        if decoded == text:
            return text
        text = decoded
    return None


# Separators that may be literal, percent-encoded any number of times or escaped.
_DASH = r"(?:-|%(?:25)*2d|\\u002d)"
_UNDERSCORE = r"(?:_|%(?:25)*5f|\\u005f)"
_EQ = r"(?:=|%(?:25)*3d|\\u003d|\\x3d|:)"
_QUOTE = r"(?:\\*[\"'])?"
# Between a name and its value: a closing quote (JSON, repr), `=` or `:` in any spelling,
# any whitespace including line breaks, a list's `[` (a parsed query's repr), an opening quote.
_SEP = rf"{_QUOTE}[ \t]*{_EQ}\s*(?:\[\s*)?{_QUOTE}"


def _name_pattern(name: str) -> str:
    return re.escape(name).replace(r"\-", _DASH).replace("_", _UNDERSCORE)


_NAMES = "|".join(_name_pattern(n) for n in sorted(_TEXT_NAMES, key=lambda n: (-len(n), n)))
# Pass 2: NAME SEP VALUE anywhere. The value runs to the next literal &, whitespace, quote,
# backslash (the start of an escaped quote or of \u0026) or `[`, a JSON-escaped slash `\/`
# being part of it; percent-encoded & (%26) is swallowed with it, which only redacts more.
# A value must not start with `<`, so an already redacted one is left alone.
_NAME_SEP = re.compile(rf"(?i)(?:{_NAMES}){_SEP}")
_VALUE = re.compile(r"(?:\\/|[^&\s\"'<>`\\\[])+")
# A name glued to a word before it (`xsig=`, `mysecret=`) is not a name, unless what
# precedes it is an escape (`%26sig=`, `\u0026sig=`).
_WORD_BEFORE = re.compile(r"(?i)[a-z0-9_]$")
_ESCAPE_BEFORE = re.compile(r"(?i)(?:%(?:25)*[0-9a-f]{2}|\\u[0-9a-f]{4}|\\x[0-9a-f]{2})$")
# Bearer tokens (a ServiceAccount token in an Authorization header someone logged).
_BEARER = re.compile(r"(?i)\b(bearer)\s+[a-z0-9._~+/=\-]+")


def _query_has_secret(query: str) -> bool:
    decoded = _decode_to_fixed_point(query)
    if decoded is None:
        return True
    names = (part.split("=", 1)[0] for part in re.split(r"[&;#?\s]", decoded))
    return any(name.strip().lower() in _SECRET_PARAMS for name in names)


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
    if query_at >= 0 and _query_has_secret(tail[query_at + 1:]):
        tail = tail[:query_at] + "?" + REDACTED
    return scheme + authority + tail


def _redact_params(text: str) -> str:
    out: list[str] = []
    done = pos = 0
    # The value is matched apart from the name, after the name is known to be one: a
    # name glued to a word is then passed over at the cost of its own length, not of
    # the value's (which would make `xsig:xsig:...` quadratic).
    while (match := _NAME_SEP.search(text, pos)) is not None:
        before = text[max(0, match.start() - 64):match.start()]
        glued = _WORD_BEFORE.search(before) and not _ESCAPE_BEFORE.search(before)
        value = None if glued else _VALUE.match(text, match.end())
        if value is None:
            pos = match.start() + 1
            continue
        out.append(text[done:value.start()])
        out.append(REDACTED)
        done = pos = value.end()
    out.append(text[done:])
    return "".join(out)


def redact(text: str) -> str:
    """`text` with every credential-bearing URL query, URL userinfo and credential
    value replaced by <redacted>. Pure; safe on any string."""
    if not text:
        return text
    text = _URL.sub(_redact_url, text)
    text = _redact_params(text)
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
