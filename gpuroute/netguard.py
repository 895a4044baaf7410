"""Refuse user-supplied URLs that point inside the network (SSRF guard).

User inputs given as https:// URLs are fetched by workers that run next to a cloud's
metadata endpoint (169.254.169.254) and private services. Such a URL is admitted only
if every address its host resolves to is public.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class UnsafeURL(ValueError):
    """A URL that must not be fetched on a user's behalf."""


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # is_global also excludes shared address space (100.64.0.0/10, where some clouds put
    # their metadata services), which is neither private nor reserved to the ipaddress module.
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


def check_public_https_url(url: str) -> None:
    """Raise UnsafeURL unless `url` is https and its host resolves only to public addresses."""
    parts = urlsplit(url)
    if parts.scheme != "https":
        raise UnsafeURL(f"only https:// URLs may be fetched, got {parts.scheme or 'no'} scheme")
    host = parts.hostname
    if not host:
        raise UnsafeURL("URL has no host")
    try:
        infos = socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise UnsafeURL(f"host {host!r} does not resolve: {exc.strerror}") from exc
    for info in infos:
        address = str(info[4][0])
        if not _is_public(address):
            raise UnsafeURL(f"host {host!r} resolves to non-public address {address}")
