"""Grant matching: normalised URIs, whole path segments; hostile tables and properties."""

from __future__ import annotations

import time
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuroute_operator.core.grants import UnsafeURI, allowed, covers, normalise, parse_grants

S3 = "s3://datasets/team-a/"
S3_BARE = "s3://datasets/team-a"
AZ = "azure://acct1/images/team-a/"
WEB = "https://images.example.com/public/"

# (grant, uri, allowed?, why)
TABLE = [
    (S3, "s3://datasets/team-a/x.png", True, "inside the folder"),
    (S3, "s3://datasets/team-a/deep/er/x.png", True, "deeper inside"),
    (S3, "s3://datasets/team-ab/x.png", False, "sibling whose name starts the same"),
    (S3, "s3://datasets/team-a", False, "the object named like the folder is not in it"),
    (S3_BARE, "s3://datasets/team-a", True, "a bare grant covers its own object"),
    (S3_BARE, "s3://datasets/team-a/x.png", True, "and what is under it"),
    (S3_BARE, "s3://datasets/team-ab/x.png", False, "never the sibling"),
    (S3_BARE, "s3://datasets/team-a.png", False, "nor a longer name"),
    (S3, "s3://datasets/team-a/../team-b/x.png", False, "dot-dot"),
    (S3, "s3://datasets/team-a/./x.png", False, "dot"),
    (S3, "s3://datasets/team-a/..", False, "trailing dot-dot"),
    (S3, "s3://datasets/team-a/%2e%2e/team-b/x", False, "percent in an S3 key"),
    (S3, "s3://datasets/team-a/x%2Fy", False, "encoded slash in an S3 key"),
    (S3, "s3://datasets/team-a//x.png", False, "empty segment"),
    (S3, "s3://datasets/team-a\\..\\team-b\\x", False, "backslashes"),
    (S3, "s3://datasets/team-a/x\x00.png", False, "NUL"),
    (S3, "s3://datasets/team-a/x\n.png", False, "newline"),
    (S3, "s3://datasets/team-a/x\u2028.png", False, "Unicode line separator"),
    (S3, "s3://datasets/team-a/\uff0e\uff0e/team-b/x", False, "full-width dot-dot"),
    (S3, "s3://datasets/team-a/..;x/team-b", False, "dot-dot with a ;param"),
    (S3, "S3://DATASETS/team-a/x.png", True, "scheme and bucket are case-insensitive"),
    (S3, "s3://datasets/TEAM-A/x.png", False, "keys are case-sensitive"),
    (S3, "s3://datasets.evil/team-a/x.png", False, "another bucket"),
    (S3, "s3://datasets/team-a/x.png?versionId=1", False, "query on a storage URI"),
    ("s3://datasets", "s3://datasets/anything", True, "whole bucket"),
    ("s3://data/", "s3://datasets/x.png", False, "bucket prefix is not a bucket"),
    (AZ, "azure://acct1/images/team-a/x.png", True, "azure inside"),
    (AZ, "azure://ACCT1/Images/team-a/x.png", True, "azure account and container fold case"),
    (AZ, "azure://acct1/images/Team-A/x.png", False, "azure blob names are case-sensitive"),
    (AZ, "azure://acct1/images/team-ab/x.png", False, "azure sibling"),
    (AZ, "azure://acct1/images2/team-a/x.png", False, "azure other container"),
    (AZ, "azure://acct1/images/team-a/../x.png", False, "azure dot-dot"),
    (WEB, "https://images.example.com/public/cat.png", True, "https inside"),
    (WEB, "https://IMAGES.Example.COM/public/cat.png", True, "host case-insensitive"),
    (WEB, "https://images.example.com:443/public/cat.png", True, "default port"),
    (WEB, "https://images.example.com:8443/public/cat.png", False, "another port"),
    (WEB, "https://images.example.com/Public/cat.png", False, "path case-sensitive"),
    (WEB, "https://images.example.com/public/a%20b.png", True, "encoded space"),
    (WEB, "https://images.example.com/public/%63at.png", True, "needless escape decodes to the same"),
    (WEB, "https://images.example.com/public/../private/key", False, "dot-dot"),
    (WEB, "https://images.example.com/public/%2e%2e/private/key", False, "encoded dot-dot"),
    (WEB, "https://images.example.com/public/.%2E/private/key", False, "half-encoded dot-dot"),
    (WEB, "https://images.example.com/public/%252e%252e/private/key", False, "double-encoded dot-dot"),
    (WEB, "https://images.example.com/public/%25/x", False, "double encoding of %"),
    (WEB, "https://images.example.com/public/%2F..%2Fprivate", False, "encoded slash"),
    (WEB, "https://images.example.com/public/%5C..%5Cprivate", False, "encoded backslash"),
    (WEB, "https://images.example.com/public/%c0%ae%c0%ae/private", False, "overlong UTF-8 dot"),
    (WEB, "https://images.example.com/public/%zz", False, "invalid escape"),
    (WEB, "https://images.example.com/public/%00.png", False, "encoded NUL"),
    (WEB, "https://images.example.com/public\\..\\private", False, "backslash"),
    (WEB, "https://images.example.com/public//x", False, "empty segment"),
    (WEB, "https://images.example.com@evil.example/public/x", False, "userinfo"),
    (WEB, "https://evil.example#@images.example.com/public/x", False, "fragment trick"),
    (WEB, "https://images.example.com.evil.example/public/x", False, "host suffix"),
    (WEB, "https://images.example.com/publicity/x", False, "https sibling"),
    (WEB, "https://images.example.com/public", False, "the folder's own name"),
    (WEB, "http://images.example.com/public/x", False, "plain http"),
    ("https://images.example.com/", "https://images.example.com", True, "whole host, empty path"),
    ("https://images.example.com/", "https://images.example.com/?q=1", True, "query is not path"),
    (S3, "https://datasets/team-a/x.png", False, "scheme differs"),
]


@pytest.mark.parametrize(("grant", "uri", "expected", "why"), TABLE, ids=[t[3] for t in TABLE])
def test_grant_table(grant: str, uri: str, expected: bool, why: str) -> None:
    assert allowed(uri, [grant]) is expected, why


@pytest.mark.parametrize("grant", [
    "s3://datasets/team-a/../", "s3://datasets/%2e%2e/", "https://h.example/a/%2e%2e/", "ftp://h/", "s3:/x/",
    "https://user@h.example/", "https://h.example/#frag", "azure://acct1/", "s3://x/", "",
])
def test_hostile_grants_grant_nothing(grant: str) -> None:
    good, bad = parse_grants([grant])
    assert good == () and bad == (grant,)
    assert not allowed("s3://datasets/team-a/x.png", [grant])
    assert not allowed("https://h.example/a/x", [grant])


# -- properties ------------------------------------------------------------------------

_SEGMENT_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0x2FFF)
segment = st.text(_SEGMENT_CHARS, min_size=1, max_size=8)
raw_path = st.lists(st.one_of(segment, st.sampled_from(["..", ".", "", "%2e%2e", "%252e", "%2F", "\\", "..;a"])),
                    min_size=0, max_size=6).map("/".join)
grant_segments = st.lists(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                                blacklist_characters="/%\\?#"), min_size=1, max_size=6)
                          .filter(lambda s: s not in (".", "..")), min_size=1, max_size=3)

PROPERTY = settings(max_examples=400, deadline=200, suppress_health_check=[HealthCheck.too_slow])
_counts: dict[str, int] = {}


def _count(name: str) -> None:
    _counts[name] = _counts.get(name, 0) + 1


@PROPERTY
@given(segments=grant_segments, folder=st.booleans(), tail=raw_path, scheme=st.sampled_from(["s3", "https"]))
def test_a_match_never_escapes_its_prefix(segments: list[str], folder: bool, tail: str, scheme: str) -> None:
    _count("escape")
    authority = "datasets" if scheme == "s3" else "images.example.com"
    path = "/".join(quote(s, safe="") if scheme == "https" else s for s in segments)
    grant = f"{scheme}://{authority}/{path}{'/' if folder else ''}"
    uri = f"{scheme}://{authority}/{path}/{tail}"
    started = time.perf_counter()
    if not allowed(uri, [grant]):
        return
    assert time.perf_counter() - started < 1.0  # microseconds normally: only a pathological (regex) blow-up reaches this
    target = normalise(uri)
    # Allowed means: same authority, the grant's segments first, and no segment in the
    # remainder that could climb back out (after decoding, as a server would see it).
    assert target.authority == authority
    assert target.segments[:len(segments)] == tuple(segments)
    for part in target.segments:
        assert part not in (".", "..") and "/" not in part and "\\" not in part and part != ""


@PROPERTY
@given(uri=st.text(max_size=60), grant=st.sampled_from([S3, S3_BARE, AZ, WEB, "https://images.example.com/"]))
def test_random_text_never_crashes_the_matcher(uri: str, grant: str) -> None:
    _count("random")
    try:
        target = normalise(uri)
    except UnsafeURI:
        assert not allowed(uri, [grant])
        return
    # Normalising is idempotent: what it returns reads back to itself.
    assert normalise(str(target).replace(" ", "%20") if target.scheme == "https" else str(target)) == target
    assert allowed(uri, [grant]) == covers(normalise(grant), target)


@PROPERTY
@given(segments=grant_segments, extra=segment)
def test_sibling_prefixes_never_match(segments: list[str], extra: str) -> None:
    _count("sibling")
    grant = "s3://datasets/" + "/".join(segments)
    sibling = grant + extra.replace("/", "x") + "/obj"
    assert not allowed(sibling, [grant]) or normalise(sibling).segments[:len(segments)] == tuple(segments)


def test_every_character_is_refused_or_allowed_by_its_definition() -> None:
    # The rule as written: C0/C1 controls and any whitespace but a plain space are refused.
    def unsafe(c: str) -> bool:
        return ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or (c.isspace() and c != " ")

    refused = allowed_chars = 0
    for code in range(0x110000):
        if 0xD800 <= code < 0xE000:
            continue  # surrogates cannot be in a str that came from JSON text
        c = chr(code)
        accepted = allowed(f"s3://datasets/a{c}b.png", ["s3://datasets/"])
        if unsafe(c):
            assert not accepted, f"U+{code:04X} was accepted"
            refused += 1
        elif c not in "#%?\\":  # refused for their own reasons (fragment, escapes, query, backslash)
            assert accepted, f"U+{code:04X} was refused"
            allowed_chars += 1
    assert refused > 60 and allowed_chars > 1_000_000


def test_zz_report_property_counts() -> None:
    # Runs the properties itself (whatever ran before, or did not): each must really try
    # many inputs, not pass vacuously. Printed so a CI log shows how many (pytest -s).
    _counts.clear()
    test_a_match_never_escapes_its_prefix()
    test_random_text_never_crashes_the_matcher()
    test_sibling_prefixes_never_match()
    print(f"grant properties tried: {_counts}")
    assert set(_counts) == {"escape", "random", "sibling"}
    assert min(_counts.values()) >= 100, _counts
