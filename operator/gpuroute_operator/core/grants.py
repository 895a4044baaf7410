"""Storage grant matching on normalised URIs, by whole path segment (pure, no I/O).

A grant is a prefix a cluster admin wrote in a Namespace annotation; a job names a URI.
Comparing the two as raw strings lets a URI say one thing to the matcher and another to
the storage or web server that serves it (`team-a` granting `team-ab`, `%2e%2e` walking
out of an https grant). Both sides are therefore reduced to the same parts first, and
anything that two readers could disagree about is refused instead of interpreted:

- backslashes, control characters and whitespace (some servers read `\\` as `/`);
- dot segments, also spelled `%2e`, `.%2E`, full-width dots or with a `;param` (`..;`
  is `..` to Java servers), and empty segments (`a//b`);
- https paths: each segment is percent-decoded once; an invalid escape, a result that
  still holds a `%` (double encoding, decoded twice by some proxies), an encoded `/`
  or `\\`, or a segment that is not UTF-8 is refused. User information and fragments too;
- s3:// and azure:// keys are used literally by the presigner (S3 and Blob storage do not
  decode them), so a `%` there is refused: decoding it for matching would make the
  matcher and the storage disagree.

Case rules per scheme: the S3 bucket and the Azure account and container are lower-case
(the services fold or refuse upper case), the https host is case-insensitive and its
default port dropped; every path is case-sensitive.

A grant matches a URI when the scheme and authority are equal and the grant's segments
are the URI's first segments. A grant ending in `/` is a folder: it matches what lies
inside it, not an object with the folder's own name. `s3://b/team-a` grants
`s3://b/team-a` and `s3://b/team-a/x`, never `s3://b/team-ab/x`.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urlsplit

from gpuroute_operator.core.spec import JobSpec, SpecError

SCHEMES = ("s3", "azure", "https")
"""Schemes a grant or a job URI may use."""

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class UnsafeURI(ValueError):
    """A URI (or grant) that cannot be normalised without guessing; it matches nothing."""


@dataclass(frozen=True)
class NormalisedURI:
    """A URI reduced to what grant matching compares."""

    scheme: str
    """s3, azure or https."""
    authority: str
    """S3 bucket, Azure `account/container` (both lower-case), or https `host[:port]` (lower-case, no :443)."""
    segments: tuple[str, ...]
    """Decoded path segments, none empty, none a dot segment."""
    folder: bool
    """The path ended in `/` (or was empty): a grant like this covers what is inside."""

    def __str__(self) -> str:
        path = "/".join(self.segments)
        tail = "/" if self.folder and path else ""
        return f"{self.scheme}://{self.authority}/{path}{tail}"


_UNSAFE_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f]|[^\S ]")
"""C0 and C1 controls, and whitespace other than a plain space (`\\s` in a str pattern is
str.isspace(): tabs, newlines, Unicode line and paragraph separators)."""


def _refuse_chars(text: str, what: str) -> None:
    if "\\" in text:
        raise UnsafeURI(f"{what} contains a backslash")
    # A plain space is a legal key character (and %20 in a URL path); tabs, newlines,
    # NUL and Unicode line separators are where parsers part ways.
    if _UNSAFE_CHAR.search(text):
        raise UnsafeURI(f"{what} contains control characters or whitespace other than a space")


def _check_segment(segment: str) -> None:
    _refuse_chars(segment, "path segment")
    # `..;jsessionid` is `..` to Servlet containers; full-width and other compatibility
    # dots fold to `.` under NFKC, which some servers apply.
    bare = unicodedata.normalize("NFKC", segment.split(";", 1)[0])
    if bare in (".", ".."):
        raise UnsafeURI("dot segments (. and ..) are not allowed")


def _split(path: str, *, decode: bool) -> tuple[tuple[str, ...], bool]:
    """Segments of a key (s3, azure) or of an https path without its one leading `/`."""
    if path == "":
        return (), True
    folder = path.endswith("/")
    # Exactly one trailing slash is the folder mark; any other empty segment is refused below.
    raw = (path[:-1] if folder else path).split("/")
    segments: list[str] = []
    for part in raw:
        if part == "":
            raise UnsafeURI("empty path segments (//) are not allowed")
        if decode:
            if _BAD_ESCAPE.search(part):
                raise UnsafeURI("invalid percent escape")
            try:
                text = unquote_to_bytes(part).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UnsafeURI("percent escapes that are not UTF-8") from exc
            # Any % left after one decoding (%25...) is read again by a second decoder
            # (a proxy, a framework): double encoding is refused, not guessed at.
            if "%" in text:
                raise UnsafeURI("double percent-encoding is not allowed")
            if "/" in text or "\\" in text:
                raise UnsafeURI("encoded / or \\ in a path segment is not allowed")
            part = text
        elif "%" in part:
            raise UnsafeURI("% in an object key is not allowed (storage reads it literally, other tools decode it)")
        _check_segment(part)
        segments.append(part)
    return tuple(segments), folder


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
_CONTAINER = re.compile(r"^[a-z0-9](?:[a-z0-9\-]{1,61}[a-z0-9])$")
_HOST = re.compile(r"^(?:[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?$|^\[[0-9a-f:.]+\]$")


def normalise(uri: str) -> NormalisedURI:
    """Reduce a grant or a job URI to its compared parts; raises UnsafeURI."""
    if not isinstance(uri, str):
        raise UnsafeURI("URI must be a string")
    _refuse_chars(uri, "URI")
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise UnsafeURI(f"scheme must be one of {', '.join(SCHEMES)}")
    if scheme == "https":
        return _normalise_https(uri)
    authority, _, path = rest.partition("/")
    if "?" in rest or "#" in rest:
        raise UnsafeURI("? and # are not allowed in storage URIs")
    authority = authority.lower()
    if scheme == "s3":
        if not _BUCKET.match(authority):
            raise UnsafeURI("not a valid S3 bucket name")
    else:
        container, _, path = path.partition("/")
        container = container.lower()
        if not _ACCOUNT.match(authority) or not _CONTAINER.match(container):
            raise UnsafeURI("not a valid Azure storage account and container")
        authority = f"{authority}/{container}"
    segments, folder = _split(path, decode=False)
    return NormalisedURI(scheme, authority, segments, folder)


def _normalise_https(uri: str) -> NormalisedURI:
    if " " in uri:
        raise UnsafeURI("a URL must not contain a raw space (write %20)")
    try:
        parts = urlsplit(uri)
    except ValueError as exc:  # an unbalanced `[`
        raise UnsafeURI("URL cannot be parsed") from exc
    if "@" in parts.netloc:
        raise UnsafeURI("user information (user@host) is not allowed")
    if parts.fragment or uri.endswith("#"):
        raise UnsafeURI("fragments are not allowed")
    host = (parts.hostname or "").lower()
    if not host or "%" in parts.netloc:
        raise UnsafeURI("URL has no valid host")
    try:
        port = parts.port
    except ValueError as exc:
        raise UnsafeURI("URL has an invalid port") from exc
    if ":" in host:
        host = f"[{host}]"
    if not _HOST.match(host):
        raise UnsafeURI("URL has no valid host")
    authority = host if port in (None, 443) else f"{host}:{port}"
    if parts.path and not parts.path.startswith("/"):
        raise UnsafeURI("URL path must start with /")
    segments, folder = _split(parts.path[1:], decode=True)
    return NormalisedURI("https", authority, segments, folder)


def covers(grant: NormalisedURI, uri: NormalisedURI) -> bool:
    """Whether `grant` covers `uri`: same scheme and authority, whole leading segments."""
    if (grant.scheme, grant.authority) != (uri.scheme, uri.authority):
        return False
    n = len(grant.segments)
    if uri.segments[:n] != grant.segments:
        return False
    if grant.folder and n and len(uri.segments) == n:
        # The folder itself: only its own folder marker (`team-a/`), not the object `team-a`.
        return uri.folder
    return True


def parse_grants(prefixes: Iterable[str]) -> tuple[tuple[NormalisedURI, ...], tuple[str, ...]]:
    """(normalised grants, refused grant texts): a grant that cannot be normalised grants nothing."""
    good: list[NormalisedURI] = []
    bad: list[str] = []
    for prefix in prefixes:
        try:
            good.append(normalise(prefix))
        except UnsafeURI:
            bad.append(prefix)
    return tuple(good), tuple(bad)


@functools.lru_cache(maxsize=256)
def _parsed(prefixes: tuple[str, ...]) -> tuple[NormalisedURI, ...]:
    # A namespace's grants are checked for every item of a batch: parsed once, not per item.
    return parse_grants(prefixes)[0]


def allowed(uri: str, prefixes: Iterable[str]) -> bool:
    """Whether `uri` lies under one of `prefixes`; False for any URI that cannot be normalised."""
    try:
        target = normalise(uri)
    except UnsafeURI:
        return False
    return any(covers(grant, target) for grant in _parsed(tuple(prefixes)))


READ_ANNOTATION = "gpuroute.io/storage-read"
WRITE_ANNOTATION = "gpuroute.io/storage-write"


@dataclass(frozen=True)
class StorageGrants:
    """The prefixes one namespace may use."""

    read: tuple[str, ...] = ()
    """Prefixes inputs may come from (s3://, azure://, https://)."""
    write: tuple[str, ...] = ()
    """Prefixes outputs may go to (s3://, azure://)."""

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str] | None) -> StorageGrants:
        annotations = annotations or {}

        def split(key: str) -> tuple[str, ...]:
            return tuple(p for p in re.split(r"[\s,]+", annotations.get(key, "")) if p)

        return cls(split(READ_ANNOTATION), split(WRITE_ANNOTATION))

    @staticmethod
    def _allowed(uri: str, prefixes: tuple[str, ...]) -> bool:
        # Normalised URIs, whole path segments: raw prefixes let `team-a` grant `team-ab`
        # and `%2e%2e` walk out of an https grant.
        return allowed(uri, prefixes)

    def may_read(self, uri: str) -> bool:
        """A normalised storage URI lies under a granted read prefix (batch inputs, one by one)."""
        return self._allowed(uri, self.read)

    def may_write(self, uri: str) -> bool:
        """A normalised storage URI lies under a granted write prefix."""
        return self._allowed(uri, self.write)

    def check(self, spec: JobSpec, namespace: str) -> None:
        """Raise SpecError (reason StorageNotGranted) if the job leaves its grants."""
        source = spec.input_uri.uri if spec.input_uri else spec.input_url
        if source is not None and not self._allowed(source, self.read):
            raise SpecError("spec.input.uri", f"{source} is outside the read prefixes granted to namespace "
                            f"{namespace!r} ({READ_ANNOTATION}: {', '.join(self.read) or 'none'})", "StorageNotGranted")
        if not self._allowed(spec.output.uri, self.write):
            raise SpecError("spec.output.uri", f"{spec.output.uri} is outside the write prefixes granted to namespace "
                            f"{namespace!r} ({WRITE_ANNOTATION}: {', '.join(self.write) or 'none'})", "StorageNotGranted")
