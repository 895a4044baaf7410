"""The SSRF guard: only https URLs whose host resolves to public addresses pass.

There is no internet here, so nothing relies on a public name resolving: public
addresses are exercised as literals, which getaddrinfo returns without DNS.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gpuroute.netguard import (
    UnsafeURL,
    _is_public,
    check_public_https_url,
    is_public_address,
    resolve_public_https_url,
)


@pytest.mark.parametrize("url", [
    "http://8.8.8.8/a.png",
    "ftp://8.8.8.8/a.png",
    "file:///etc/passwd",
    "gopher://8.8.8.8/",
    "//8.8.8.8/a.png",
    "8.8.8.8/a.png",
])
def test_non_https_is_refused(url: str) -> None:
    with pytest.raises(UnsafeURL, match="only https:// URLs may be fetched"):
        check_public_https_url(url)


def test_scheme_names_itself() -> None:
    with pytest.raises(UnsafeURL) as caught:
        check_public_https_url("http://example.com/x")
    assert str(caught.value) == "only https:// URLs may be fetched, got http scheme"
    with pytest.raises(UnsafeURL) as caught:
        check_public_https_url("/relative/path")
    assert str(caught.value) == "only https:// URLs may be fetched, got no scheme"


@pytest.mark.parametrize("url", ["https:///a.png", "https://", "https://:443/a.png"])
def test_url_without_host_is_refused(url: str) -> None:
    with pytest.raises(UnsafeURL, match="URL has no host"):
        check_public_https_url(url)


@pytest.mark.parametrize(("url", "address"), [
    ("https://127.0.0.1/a.png", "127.0.0.1"),
    ("https://127.0.0.1:8443/a.png", "127.0.0.1"),
    ("https://[::1]/a.png", "::1"),
    ("https://10.0.0.5/a.png", "10.0.0.5"),
    ("https://10.255.255.254/a.png", "10.255.255.254"),
    ("https://172.16.3.4/a.png", "172.16.3.4"),
    ("https://192.168.1.1/a.png", "192.168.1.1"),
    ("https://169.254.169.254/latest/meta-data/", "169.254.169.254"),
    ("https://[fd00:ec2::254]/latest/meta-data/", "fd00:ec2::254"),
    ("https://[fe80::1]/", "fe80::1"),
    ("https://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1"),
    ("https://[::ffff:169.254.169.254]/", "::ffff:169.254.169.254"),
    ("https://0.0.0.0/", "0.0.0.0"),
    ("https://224.0.0.1/", "224.0.0.1"),
    # Alternative spellings of 127.0.0.1 are caught because the check runs on resolved addresses.
    ("https://0x7f000001/", "127.0.0.1"),
    ("https://2130706433/", "127.0.0.1"),
    ("https://127.1/", "127.0.0.1"),
])
def test_internal_addresses_are_refused(url: str, address: str) -> None:
    with pytest.raises(UnsafeURL) as caught:
        check_public_https_url(url)
    assert "resolves to non-public address" in str(caught.value)
    assert str(caught.value).endswith(f" {address}")


def test_localhost_is_refused_without_naming_what_it_resolves_to() -> None:
    # A name's internal addresses are not the user's to learn from an error message.
    with pytest.raises(UnsafeURL) as caught:
        check_public_https_url("https://localhost/a.png")
    message = str(caught.value)
    # Refused by name now, before any lookup.
    assert message == "host 'localhost' names an internal service"
    assert "127.0.0.1" not in message and "::1" not in message


@pytest.mark.parametrize("url", [
    "https://user:pw@8.8.8.8/a.png",
    "https://user@8.8.8.8/a.png",
    "https://@8.8.8.8/a.png",
    # The example: urlsplit reads 8.8.8.8 as the host, a fetcher reading `\` as
    # `/` connects to 10.0.0.5:6443. Refused for the backslash before anyone resolves it.
    "https://10.0.0.5:6443\\@8.8.8.8/",
])
def test_userinfo_is_refused(url: str) -> None:
    with pytest.raises(UnsafeURL, match="user information|backslash"):
        check_public_https_url(url)


@pytest.mark.parametrize("url", ["https://8.8.8.8\\a.png", "https://8.8.8.8/a\\b.png", "https://8.8.8.8/a b",
                                 "https://8.8.8.8/a\tb", "https://8.8.8.8/a\nb"])
def test_backslashes_and_whitespace_are_refused(url: str) -> None:
    with pytest.raises(UnsafeURL, match="backslash|whitespace"):
        check_public_https_url(url)


def test_invalid_port_is_refused() -> None:
    with pytest.raises(UnsafeURL, match="invalid port"):
        check_public_https_url("https://8.8.8.8:99999/a.png")


def test_resolution_returns_the_checked_address_and_the_request_target() -> None:
    checked = resolve_public_https_url("https://8.8.8.8:8443/a/b.png?x=1&y=2#frag")
    assert (checked.host, checked.port, checked.address, checked.target) == ("8.8.8.8", 8443, "8.8.8.8", "/a/b.png?x=1&y=2")
    assert checked.host_header == "8.8.8.8:8443"
    bare = resolve_public_https_url("https://[2001:4860:4860::8888]")
    assert (bare.target, bare.port, bare.host_header) == ("/", 443, "[2001:4860:4860::8888]")


@pytest.mark.parametrize("host", ["no-such-host.invalid", "x.test.invalid"])
def test_host_that_does_not_resolve_is_refused(host: str) -> None:
    with pytest.raises(UnsafeURL) as caught:
        check_public_https_url(f"https://{host}/a.png")
    assert str(caught.value).startswith(f"host {host!r} does not resolve: ")


@pytest.mark.parametrize("url", [
    "https://8.8.8.8/a.png",
    "https://1.1.1.1:8443/path?q=1#frag",
    "https://[2001:4860:4860::8888]/a.png",
])
def test_public_literals_pass(url: str) -> None:
    assert check_public_https_url(url) is None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2001:4860:4860::8888",
                                     "::ffff:8.8.8.8"])
def test_is_public_true(address: str) -> None:
    assert _is_public(address) is True


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.255.0.1", "::1",                      # loopback
    "10.1.2.3", "172.31.0.1", "192.168.0.10", "fd12::1",    # private
    "169.254.169.254", "fe80::1", "fe80::1%eth0",           # link-local (metadata), with a scope id
    "224.0.0.251", "ff02::1",                               # multicast
    "0.0.0.0", "::",                                        # unspecified
    "240.0.0.1", "255.255.255.255",                         # reserved / broadcast
    "::ffff:10.0.0.1", "::ffff:127.0.0.1",                  # IPv4-mapped internal
    "192.0.2.10", "198.51.100.7", "203.0.113.9", "2001:db8::1",  # documentation ranges
])
def test_is_public_false(address: str) -> None:
    assert _is_public(address) is False


@pytest.mark.parametrize("address", [
    "100.64.0.1",        # RFC 6598 shared address space (carrier-grade NAT), not routable on the internet
    "100.100.100.200",   # Alibaba Cloud's instance metadata endpoint lives here
])
def test_shared_address_space_is_not_public(address: str) -> None:
    assert _is_public(address) is False


def test_unsafe_url_is_a_value_error() -> None:
    assert issubclass(UnsafeURL, ValueError)


# -- the denylist: every IANA special-purpose block and the clouds' metadata endpoints ---

DENIED = [
    ("169.254.169.254", "AWS/Azure/GCP metadata"),
    ("169.254.170.2", "ECS task metadata"),
    ("fd00:ec2::254", "AWS IMDS over IPv6"),
    ("168.63.129.16", "Azure wireserver"),
    ("100.100.100.200", "Alibaba metadata, shared address space"),
    ("192.0.0.192", "Oracle Cloud metadata"),
    ("0.0.0.0", "this network"), ("0.1.2.3", "this network"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
    ("100.64.0.1", "CGNAT"), ("100.127.255.254", "CGNAT"),
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"),
    ("192.0.0.8", "IETF assignments"), ("192.0.0.9", "PCP anycast"), ("192.0.0.170", "NAT64 discovery"),
    ("192.0.2.1", "TEST-NET-1"), ("198.51.100.7", "TEST-NET-2"), ("203.0.113.9", "TEST-NET-3"),
    ("192.31.196.1", "AS112"), ("192.52.193.1", "AMT"), ("192.88.99.1", "6to4 relay"), ("192.175.48.1", "AS112"),
    ("198.18.0.1", "benchmarking"), ("198.19.255.255", "benchmarking"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "broadcast"),
    ("::", "unspecified"), ("::1", "loopback"),
    ("::ffff:169.254.169.254", "mapped metadata"), ("::ffff:127.0.0.1", "mapped loopback"),
    ("::ffff:10.0.0.1", "mapped private"), ("::127.0.0.1", "IPv4-compatible"),
    ("64:ff9b::a9fe:a9fe", "NAT64 of 169.254.169.254"), ("64:ff9b::10.0.0.1", "NAT64 of private"),
    ("64:ff9b::7f00:1", "NAT64 of loopback"), ("64:ff9b:1::8.8.8.8", "local-use NAT64"),
    ("100::1", "discard-only"), ("100:0:0:1::1", "dummy prefix"),
    ("2001::1", "Teredo"), ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"), ("2001:2::1", "benchmarking"),
    ("2001:10::1", "ORCHID"), ("2001:db8::1", "documentation"), ("3fff::1", "documentation"),
    ("2002:a9fe:a9fe::1", "6to4 of metadata"), ("2002:0808:0808::1", "6to4 of a public address, still 6to4"),
    ("2620:4f:8000::1", "AS112-v6"), ("5f00::1", "SRv6"),
    ("fc00::1", "unique local"), ("fd12:3456::1", "unique local"),
    ("fe80::1", "link-local"), ("fe80::1%eth0", "link-local with zone"),
    ("fec0::1", "site-local"), ("feff::1", "site-local"),
    ("ff02::1", "multicast"), ("ff0e::1", "multicast"), ("4000::1", "outside global unicast"),
    ("not-an-address", "garbage"),
]


@pytest.mark.parametrize(("address", "why"), DENIED, ids=[f"{a} {w}" for a, w in DENIED])
def test_denylist(address: str, why: str) -> None:
    assert is_public_address(address) is False, why


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700:4700::1111",
                                     "2a00:1450:4001:82a::200e", "::ffff:8.8.8.8", "64:ff9b::808:808",
                                     "168.63.129.17", "100.128.0.1", "198.20.0.1"])
def test_public_addresses_pass(address: str) -> None:
    assert is_public_address(address) is True


@pytest.mark.parametrize("host", ["metadata.google.internal", "METADATA.GOOGLE.INTERNAL.", "metadata",
                                  "metadata.goog", "instance-data", "ip-10-0-0-1.ec2.internal", "x.localhost",
                                  "printer.local", "router.home.arpa", "254.169.254.169.in-addr.arpa"])
def test_internal_names_are_refused_before_any_lookup(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # GCP's metadata.google.internal resolves to 169.254.169.254 inside GCP; here it does
    # not resolve at all, so a refusal that needed DNS would be a different message.
    def no_dns(*_: object, **__: object) -> None:
        raise AssertionError("the name must be refused before any lookup")

    monkeypatch.setattr("socket.getaddrinfo", no_dns)
    with pytest.raises(UnsafeURL, match="names an internal service"):
        resolve_public_https_url(f"https://{host}/x.png")


# -- every resolved address counts, not only the first -----------------------------------

def _resolves_to(*addresses: str) -> Callable[[str, int], list[str]]:
    """A resolver answering with `addresses` in this order, as a DNS server an attacker
    runs would (a public A record first, the metadata address after it)."""
    def resolve(host: str, port: int) -> list[str]:
        assert (host, port) == ("images.example.com", 443)
        return list(addresses)

    return resolve


@pytest.mark.parametrize("addresses", [
    ("8.8.8.8", "10.0.0.5"),
    ("8.8.8.8", "127.0.0.1"),
    ("93.184.216.34", "169.254.169.254"),
    ("8.8.8.8", "1.1.1.1", "fd00:ec2::254"),
    ("2001:4860:4860::8888", "::1"),
    ("2001:4860:4860::8888", "::ffff:169.254.169.254"),
    ("10.0.0.5", "8.8.8.8"),
])
def test_a_name_is_refused_when_any_of_its_addresses_is_internal(addresses: tuple[str, ...]) -> None:
    with pytest.raises(UnsafeURL) as caught:
        resolve_public_https_url("https://images.example.com/a.png", resolver=_resolves_to(*addresses))
    message = str(caught.value)
    assert message == "host 'images.example.com' resolves to a non-public address"
    assert not any(a in message for a in addresses), "a name's addresses are not the user's to learn"


def test_a_name_whose_addresses_are_all_public_connects_to_the_first() -> None:
    checked = resolve_public_https_url("https://images.example.com/a.png",
                                       resolver=_resolves_to("8.8.8.8", "1.1.1.1", "2001:4860:4860::8888"))
    assert (checked.host, checked.address, checked.port, checked.target) == ("images.example.com", "8.8.8.8", 443,
                                                                             "/a.png")


def test_a_name_without_addresses_is_refused() -> None:
    with pytest.raises(UnsafeURL, match="does not resolve"):
        resolve_public_https_url("https://images.example.com/a.png", resolver=_resolves_to())
