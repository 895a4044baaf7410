"""Refuse user-supplied URLs that point inside the network (SSRF guard).

User inputs given as https:// URLs are fetched by workers that run next to a cloud's
metadata endpoint (169.254.169.254) and private services. Such a URL is admitted only
if every address its host resolves to is public.

The check and the fetch must agree on what the URL means, so this module is the only
parser: `resolve_public_https_url` returns the pieces (host name, port, request target)
and the one address it checked, and the worker's fetcher connects to exactly that
address with TLS verified against the host name. Nothing resolves the name a second
time (no DNS rebinding window), and nothing re-parses the string (no disagreement about
`\\` or `@`).

Messages never name an address the user did not write themselves: a resolved internal
address or a port's state would otherwise turn the error text into a network scanner.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit


class UnsafeURL(ValueError):
    """A URL that must not be fetched on a user's behalf."""


@dataclass(frozen=True)
class CheckedURL:
    """An https URL whose host resolved only to public addresses."""

    host: str
    """Host name as written (lower-cased), for SNI, certificate checks and the Host header."""
    port: int
    """TCP port, 443 unless the URL names one."""
    target: str
    """Request target: path and query, as written ('/' when empty)."""
    address: str
    """The checked address to connect to; the name is never resolved again."""

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 443 else f"{host}:{self.port}"


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # is_global also excludes shared address space (100.64.0.0/10, where some clouds put
    # their metadata services), which is neither private nor reserved to the ipaddress module.
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


def _is_literal(host: str) -> bool:
    """Whether `host` is an address spelled out (127.0.0.1, but also 127.1 or 0x7f000001)."""
    try:
        socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        return False
    return True


def _parse(url: str) -> tuple[str, int, str]:
    if not isinstance(url, str):
        raise UnsafeURL("URL must be a string")
    # Browsers and some libraries read `\` as `/`, others as part of the authority: a URL
    # that two parsers could read differently is refused rather than interpreted.
    if "\\" in url:
        raise UnsafeURL("URL contains a backslash")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise UnsafeURL("URL contains whitespace or control characters")
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise UnsafeURL(f"only https:// URLs may be fetched, got {parts.scheme or 'no'} scheme")
    if "@" in parts.netloc:
        raise UnsafeURL("URL must not carry user information (user@host)")
    host = parts.hostname
    if not host:
        raise UnsafeURL("URL has no host")
    try:
        port = parts.port or 443
    except ValueError as exc:
        raise UnsafeURL("URL has an invalid port") from exc
    target = parts.path or "/"
    if parts.query:
        target = f"{target}?{parts.query}"
    return host, port, target


def resolve_public_https_url(url: str, *, is_allowed: Callable[[str], bool] | None = None) -> CheckedURL:
    """Parse `url` once, resolve its host once, and return what to connect to.

    Raises UnsafeURL unless the URL is https without user information or backslashes and
    every address its host resolves to is public. `is_allowed` replaces the public-address
    rule; only tests that serve from loopback pass it.
    """
    allowed = is_allowed or _is_public
    host, port, target = _parse(url)
    literal = _is_literal(host)
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise UnsafeURL(f"host {host!r} does not resolve: {exc.strerror}") from exc
    addresses = [str(info[4][0]) for info in infos]
    for address in addresses:
        if not allowed(address):
            # A literal is the user's own text (and `127.1` spells 127.0.0.1, which is worth
            # saying); what a name resolves to inside the network is not theirs to learn.
            if literal:
                raise UnsafeURL(f"host {host!r} resolves to non-public address {address}")
            raise UnsafeURL(f"host {host!r} resolves to a non-public address")
    if not addresses:
        raise UnsafeURL(f"host {host!r} does not resolve")
    return CheckedURL(host=host, port=port, target=target, address=addresses[0])


def check_public_https_url(url: str) -> None:
    """Raise UnsafeURL unless `url` is https and its host resolves only to public addresses."""
    resolve_public_https_url(url)
