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
from collections.abc import Callable, Sequence
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


# Every IANA special-purpose block (iana-ipv4/ipv6-special-registry), whether or not the
# registry calls it globally reachable, plus the cloud endpoints that sit on ordinary-looking
# addresses. Listed explicitly rather than left to ipaddress.is_global, whose idea of
# "global" differs between Python versions and says nothing about cloud metadata.
DENIED_NETWORKS_V4: tuple[ipaddress.IPv4Network, ...] = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8",           # "this network"
    "10.0.0.0/8",          # private
    "100.64.0.0/10",       # shared address space (CGNAT; Alibaba metadata 100.100.100.200)
    "127.0.0.0/8",         # loopback
    "169.254.0.0/16",      # link-local: AWS, Azure and GCP metadata 169.254.169.254
    "172.16.0.0/12",       # private
    "192.0.0.0/24",        # IETF protocol assignments (Oracle Cloud metadata 192.0.0.192)
    "192.0.2.0/24",        # TEST-NET-1
    "192.31.196.0/24",     # AS112-v4
    "192.52.193.0/24",     # AMT
    "192.88.99.0/24",      # deprecated 6to4 relay anycast
    "192.168.0.0/16",      # private
    "192.175.48.0/24",     # AS112 direct delegation
    "198.18.0.0/15",       # benchmarking
    "198.51.100.0/24",     # TEST-NET-2
    "203.0.113.0/24",      # TEST-NET-3
    "224.0.0.0/4",         # multicast
    "240.0.0.0/4",         # reserved, and 255.255.255.255 broadcast
    "168.63.129.16/32",    # Azure wireserver (host agent, DNS, health probes)
))
DENIED_NETWORKS_V6: tuple[ipaddress.IPv6Network, ...] = tuple(ipaddress.IPv6Network(n) for n in (
    "::/8",                # unspecified, loopback, IPv4-compatible, IPv4-mapped (checked below), ...
    "64:ff9b:1::/48",      # local-use NAT64
    "100::/64",            # discard-only
    "100:0:0:1::/64",      # dummy prefix
    "2001::/23",           # IETF protocol assignments: Teredo 2001::/32, benchmarking, ORCHID, ...
    "2001:db8::/32",       # documentation
    "2002::/16",           # 6to4: tunnels to whatever IPv4 address it embeds
    "2620:4f:8000::/48",   # AS112-v6
    "3fff::/20",           # documentation
    "5f00::/16",           # SRv6 SIDs
    "fc00::/7",            # unique local (AWS IMDS fd00:ec2::254)
    "fe80::/10",           # link-local
    "fec0::/10",           # deprecated site-local
    "ff00::/8",            # multicast
))
DENIED_HOST_NAMES = ("localhost", "metadata", "metadata.google.internal", "metadata.goog",
                     "instance-data", "instance-data.ec2.internal")
"""Names refused before any lookup: they mean an internal service wherever they resolve."""
DENIED_HOST_SUFFIXES = (".localhost", ".internal", ".local", ".home.arpa", ".in-addr.arpa", ".ip6.arpa")
"""Name suffixes refused before any lookup (RFC 6761/6762/8375 local names, cloud-internal DNS)."""
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped or NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(address: str) -> bool:
    """Whether `address` (an IP literal, maybe with %zone) may be fetched on a user's behalf."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        # A mapped or NAT64 address reaches the IPv4 address inside it: judge that one.
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            ip = embedded
        elif ip not in ipaddress.IPv6Network("2000::/3") or any(ip in net for net in DENIED_NETWORKS_V6):
            # Outside global unicast nothing is fetchable; inside it, the special blocks.
            return False
    if isinstance(ip, ipaddress.IPv4Address) and any(ip in net for net in DENIED_NETWORKS_V4):
        return False
    # Belt and braces: whatever the running Python's registry also knows as non-global.
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


_is_public = is_public_address  # the name tests and callers used before


def _denied_name(host: str) -> bool:
    name = host.rstrip(".").lower()
    return name in DENIED_HOST_NAMES or name.endswith(DENIED_HOST_SUFFIXES)


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
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced `[` (found by the fuzz test)
        raise UnsafeURL("URL cannot be parsed") from exc
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


Resolver = Callable[[str, int], Sequence[str]]
"""Host name and port to the addresses they resolve to, in the order a client would try them."""


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses getaddrinfo gives for `host` (raises socket.gaierror)."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)]


def resolve_public_https_url(url: str, *, is_allowed: Callable[[str], bool] | None = None,
                             resolver: Resolver = system_resolver) -> CheckedURL:
    """Parse `url` once, resolve its host once, and return what to connect to.

    Raises UnsafeURL unless the URL is https without user information or backslashes and
    every address its host resolves to is public: a DNS answer with a public address
    first and an internal one after it is refused too. `is_allowed` replaces the
    public-address rule; only tests that serve from loopback pass it. `resolver` replaces
    getaddrinfo, for tests that need a name with several addresses.
    """
    allowed = is_allowed or is_public_address
    host, port, target = _parse(url)
    # Before any lookup: such a name means an internal service wherever it resolves. Tests
    # that serve from loopback (is_allowed given) use `localhost` on purpose.
    if is_allowed is None and _denied_name(host):
        raise UnsafeURL(f"host {host!r} names an internal service")
    literal = _is_literal(host)
    try:
        addresses = list(resolver(host, port))
    except socket.gaierror as exc:
        raise UnsafeURL(f"host {host!r} does not resolve: {exc.strerror}") from exc
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
