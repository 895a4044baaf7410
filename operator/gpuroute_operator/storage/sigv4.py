"""SigV4 query signing of S3 object URLs, learned from and checked against botocore (pure).

botocore's `generate_presigned_url` resolves the endpoint ruleset, serialises the
operation and emits a dozen hooks for every URL: about 0.1 ms of the operator's CPU per
URL, two URLs per image, which was most of what a batch item cost the operator. The
signature itself is a few HMACs.

So botocore still decides everything about *where* a request goes (endpoint, addressing
style, region, which headers are signed), once per bucket, operation and content type: the
first URL it signs becomes a `UrlTemplate`, and this module only signs further keys into
that template. A template is kept only when signing the very same request here gives
botocore's URL byte for byte (`learn`); anything botocore signs differently (SigV4a,
S3 Express sessions, an endpoint that moves the key) simply stays on botocore.

References: AWS "Authenticating Requests: Using Query Parameters (AWS Signature Version 4)";
botocore.auth.S3SigV4QueryAuth, which this mirrors (no path normalisation for S3, the
payload as UNSIGNED-PAYLOAD, the security token inside the signed query).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlsplit

log = logging.getLogger(__name__)

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_QUERY_SAFE = "-_.~"
_KEY_SAFE = "/~"
"""botocore's quoting of object keys in the path (percent_encode(key, safe='/~'))."""


@dataclass(frozen=True)
class Credentials:
    """Frozen AWS credentials, as botocore's get_frozen_credentials() hands them out."""

    access_key: str
    """Access key id."""
    secret_key: str
    """Secret access key."""
    token: str | None = None
    """Session token of temporary credentials (IRSA, STS), or None."""


@dataclass(frozen=True)
class UrlTemplate:
    """Where botocore sends one kind of request: everything in a presigned URL but the key,
    the time and the signature."""

    base: str
    """scheme://netloc plus the path up to the key (`http://127.0.0.1:9000/bucket/`)."""
    path_prefix: str
    """The path part of `base` (`/bucket/`), as it appears in the canonical request."""
    host: str
    """The Host header botocore signed (the netloc)."""
    region: str
    """Signing region, from botocore's credential scope."""
    service: str
    """Signing service name, from botocore's credential scope (`s3`)."""
    signed_headers: tuple[str, ...]
    """Lower-case header names botocore signed, sorted (`("content-type", "host")`)."""


class SigningKeys:
    """Derived SigV4 signing keys, one per (secret, date, region, service): four HMACs saved
    per URL. Holds at most a few entries (a key per day and region)."""

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str, str, str], bytes] = {}

    def get(self, secret_key: str, date: str, region: str, service: str) -> bytes:
        entry = (secret_key, date, region, service)
        key = self._keys.get(entry)
        if key is None:
            if len(self._keys) >= 16:  # old days, rotated secrets
                self._keys.clear()
            key = _hmac(f"AWS4{secret_key}".encode(), date)
            for part in (region, service, "aws4_request"):
                key = _hmac(key, part)
            self._keys[entry] = key
        return key


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def amz_date(epoch_s: float) -> str:
    """`20261130T081500Z`: the X-Amz-Date of a time."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch_s))


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.~/-]*")
"""Keys that quote() leaves as they are: most keys, so most skip its per-character work."""


def _quote_key(key: str) -> str:
    return key if _PLAIN_KEY.fullmatch(key) else quote(key, safe=_KEY_SAFE)


@functools.lru_cache(maxsize=64)
def _query_parts(access_key: str, token: str | None, scope: str, signed_headers: str) -> tuple[str, str, str]:
    """The encoded query values that stay the same for a day: credential, token, signed headers."""
    return (quote(f"{access_key}/{scope}", safe=_QUERY_SAFE), quote(token, safe=_QUERY_SAFE) if token else "",
            quote(signed_headers, safe=_QUERY_SAFE))


def presign(template: UrlTemplate, method: str, key: str, *, credentials: Credentials, timestamp: str,
            expires_s: int, headers: dict[str, str] | None = None, keys: SigningKeys | None = None) -> str:
    """The presigned URL of `method` on object `key`, as botocore would write it.

    `timestamp` is an X-Amz-Date; `headers` must hold a value for every signed header
    other than host (the content type of a PUT).
    """
    date = timestamp[:8]
    scope = f"{date}/{template.region}/{template.service}/aws4_request"
    signed = ";".join(template.signed_headers)
    credential, token, signed_encoded = _query_parts(credentials.access_key, credentials.token, scope, signed)
    # Already percent-encoded (the timestamp and the expiry are digits and letters). The
    # canonical query is sorted by name; the URL keeps botocore's order.
    head = f"X-Amz-Algorithm={ALGORITHM}&X-Amz-Credential={credential}&X-Amz-Date={timestamp}&X-Amz-Expires={expires_s}"
    token_param = f"&X-Amz-Security-Token={token}" if credentials.token is not None else ""
    canonical_query = f"{head}{token_param}&X-Amz-SignedHeaders={signed_encoded}"
    values = {name.lower(): " ".join(value.split()) for name, value in (headers or {}).items()}
    values["host"] = template.host
    canonical_headers = "".join(f"{name}:{values[name]}\n" for name in template.signed_headers)
    quoted_key = _quote_key(key)
    canonical = "\n".join((method.upper(), template.path_prefix + quoted_key, canonical_query, canonical_headers,
                           signed, UNSIGNED_PAYLOAD))
    to_sign = "\n".join((ALGORITHM, timestamp, scope, hashlib.sha256(canonical.encode()).hexdigest()))
    signing_key = (keys or SigningKeys()).get(credentials.secret_key, date, template.region, template.service)
    signature = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
    return (f"{template.base}{quoted_key}?{head}&X-Amz-SignedHeaders={signed_encoded}{token_param}"
            f"&X-Amz-Signature={signature}")


def learn(url: str, method: str, key: str, *, credentials: Credentials, expires_s: int,
          headers: dict[str, str] | None = None) -> UrlTemplate | None:
    """The template behind botocore's presigned `url` for `key`, or None when signing the same
    request here does not give the same URL (then botocore keeps signing that kind)."""
    parts = urlsplit(url)
    quoted = quote(key, safe=_KEY_SAFE)
    if not parts.path.endswith(quoted) or parts.fragment:
        return None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    scope = query.get("X-Amz-Credential", "").split("/")
    if query.get("X-Amz-Algorithm") != ALGORITHM or len(scope) != 5 or scope[4] != "aws4_request":
        return None
    prefix = parts.path[:len(parts.path) - len(quoted)]
    template = UrlTemplate(base=f"{parts.scheme}://{parts.netloc}{prefix}", path_prefix=prefix, host=parts.netloc,
                           region=scope[2], service=scope[3],
                           signed_headers=tuple(query.get("X-Amz-SignedHeaders", "").split(";")))
    if "host" not in template.signed_headers:
        return None
    wanted = {name.lower() for name in headers or {}} | {"host"}
    if set(template.signed_headers) != wanted:
        return None
    ours = presign(template, method, key, credentials=credentials, timestamp=query.get("X-Amz-Date", ""),
                   expires_s=expires_s, headers=headers)
    return template if hmac.compare_digest(ours, url) else None


Slot = tuple[str, str, str]
"""(bucket, HTTP method, content type or ""): one kind of request botocore may sign differently."""


class Templates:
    """Templates learned from one botocore client's URLs, by slot.

    `sign` answers from a template when one is held; otherwise the caller has botocore sign
    and `offer`s the URL. A URL this module cannot reproduce (credentials refreshed between
    the two signatures, a scheme it does not write) leaves that slot to botocore for
    `retry_s` before it is tried again.
    """

    def __init__(self, *, retry_s: float = 60.0, max_slots: int = 4096) -> None:
        self.retry_s = retry_s
        self.max_slots = max_slots
        self._by_slot: dict[Slot, UrlTemplate] = {}
        self._retry_at: dict[Slot, float] = {}
        self._source: object = None
        self._keys = SigningKeys()

    def _for(self, source: object) -> None:
        if source is not self._source:
            # Another client (rebuilt after a credentials problem) may resolve endpoints differently.
            self._by_slot, self._retry_at, self._source = {}, {}, source

    def sign(self, source: object, slot: Slot, key: str, *, credentials: Credentials, expires_s: int,
             headers: dict[str, str] | None, epoch_s: float) -> str | None:
        """The URL for `key` from the slot's template, or None when there is none yet."""
        self._for(source)
        template = self._by_slot.get(slot)
        if template is None:
            return None
        return presign(template, slot[1], key, credentials=credentials, timestamp=amz_date(epoch_s),
                       expires_s=expires_s, headers=headers, keys=self._keys)

    def offer(self, source: object, slot: Slot, url: str, key: str, *, credentials: Credentials, expires_s: int,
              headers: dict[str, str] | None, now: float) -> bool:
        """Learn the slot's template from botocore's `url` for `key`; False when it could not be
        reproduced (or learning is resting after such a failure). `now`: a monotonic clock."""
        self._for(source)
        if self._retry_at.get(slot, 0.0) > now:
            return False
        learned = learn(url, slot[1], key, credentials=credentials, expires_s=expires_s, headers=headers)
        if learned is None:
            self._retry_at[slot] = now + self.retry_s
            log.info("S3 URLs for bucket %s (%s) stay signed by botocore for %g s: its URL could not be reproduced",
                     slot[0], slot[1], self.retry_s)
            return False
        if len(self._by_slot) >= self.max_slots:
            self._by_slot.clear()
        self._by_slot[slot] = learned
        return True
