"""redact(): no signature, credential, token or userinfo survives, whatever wraps it."""

from __future__ import annotations

import json
import logging
from urllib.parse import quote

import boto3
import pytest
from botocore.config import Config
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuroute.redact import REDACTED, RedactFilter, install_log_redaction, redact, redact_json

SIG = "5f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8"
CRED = "AKIAEXAMPLEKEY123456"
TOKEN = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN"
SAS_SIG = "q0Xb9kEXAMPLESAS%2Bsig%3D"
SECRETS = (SIG, CRED, TOKEN, "q0Xb9kEXAMPLESAS", "hunter2")

PRESIGNED = (f"https://bucket.s3.eu-west-1.amazonaws.com/in/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             f"&X-Amz-Credential={CRED}%2F20240101%2Feu-west-1%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z"
             f"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token={TOKEN}&X-Amz-Signature={SIG}")
SAS = f"https://acct.blob.core.windows.net/c/in/a.png?sv=2022-11-02&se=2024-01-01T00%3A00%3A00Z&sr=b&sp=r&sig={SAS_SIG}"


def leaked(text: str) -> list[str]:
    return [s for s in SECRETS if s.lower() in text.lower()]


HOSTILE = {
    "plain presigned": f"download failed with HTTP 404 for {PRESIGNED}",
    "azure sas": f"upload to {SAS} failed",
    "uppercase names": PRESIGNED.upper().replace(SIG.upper(), SIG).replace(CRED.upper(), CRED),
    "lowercase names": PRESIGNED.replace("X-Amz-", "x-amz-"),
    "signature first": f"GET http://127.0.0.1:9/b/k?X-Amz-Signature={SIG}&X-Amz-Credential={CRED}",
    "percent-encoded names": f"http://h/b/k?X%2DAmz%2DSignature={SIG}&x%2damz%2dcredential={CRED}",
    "url inside a url": f"https://proxy/?next={quote(PRESIGNED, safe='')}",
    "double-encoded": f"https://proxy/?next={quote(quote(PRESIGNED, safe=''), safe='')}",
    "json-escaped slashes": json.dumps({"url": PRESIGNED}).replace("/", "\\/"),
    "python repr": repr({"url": PRESIGNED}),
    "no scheme": f"bucket/in/a.png?X-Amz-Signature={SIG}&X-Amz-Credential={CRED}",
    "in parentheses": f"failed ({PRESIGNED})",
    "in angle brackets": f"<{PRESIGNED}>",
    "quoted": f"'{PRESIGNED}' and \"{SAS}\"",
    "userinfo": "fetch https://admin:hunter2@internal.example/x failed",
    "userinfo with at in password": "https://u:hun@hunter2@h/x",
    "semicolon separators": f"http://h/k?a=1;X-Amz-Signature={SIG}",
    "fragment": f"http://h/k#X-Amz-Signature={SIG}",
    "newlines": f"line1\n{PRESIGNED}\nline3",
    "sigv2": f"http://h/b/k?AWSAccessKeyId={CRED}&Expires=1&Signature={SIG}",
    "gcs": f"https://storage.googleapis.com/b/o?X-Goog-Credential={CRED}&X-Goog-Signature={SIG}",
    "header": f"Authorization: AWS4-HMAC-SHA256 Credential={CRED}/x, SignedHeaders=host, Signature={SIG}",
    "bearer": f"Authorization: Bearer {TOKEN}",
    "truncated value": f"...&X-Amz-Signature={SIG[:40]}",
    "two urls": f"{PRESIGNED} then {SAS}",
    # Spellings of the security review (finding 14): a dict repr of a parsed query, Go's
    # JSON escapes, a header dump, three rounds of percent-encoding, a value on the next line.
    "dict repr of the query": repr({"X-Amz-Credential": [CRED], "X-Amz-Signature": [SIG], "sig": ["q0Xb9kEXAMPLESAS"]}),
    "dict repr, plain values": repr({"X-Amz-Security-Token": TOKEN, "X-Amz-Signature": SIG}),
    "json of a query dict": json.dumps({"X-Amz-Signature": SIG, "X-Amz-Credential": CRED}),
    "json inside json": json.dumps(json.dumps({"X-Amz-Signature": SIG, "token": TOKEN})),
    "json unicode escapes": PRESIGNED.replace("&", "\\u0026").replace("=", "\\u003d"),
    "json unicode escapes, no scheme": f"k?a\\u003d1\\u0026X-Amz-Signature\\u003d{SIG}\\u0026X-Amz-Credential\\u003d{CRED}",
    "header style": f"X-Amz-Signature: {SIG}\nX-Amz-Credential:{CRED}\nX-Amz-Security-Token:  {TOKEN}",
    "triple-encoded": f"https://proxy/?next={quote(quote(quote(PRESIGNED, safe=''), safe=''), safe='')}",
    "triple-encoded, no scheme": quote(quote(quote(f"k?a=1&X-Amz-Signature={SIG}", safe=""), safe=""), safe=""),
    "triple-encoded names": f"x%25252Damz%25252Dsignature%25253D{SIG}",
    "value after a newline": f"X-Amz-Signature=\n{SIG}\nX-Amz-Credential:\r\n  {CRED}",
    "url nested three times": "https://a/?u=" + quote("https://b/?u=" + quote("https://c/?u=" + quote(PRESIGNED, safe=""),
                                                                            safe=""), safe=""),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_inputs_lose_every_secret(case: str) -> None:
    text = HOSTILE[case]
    out = redact(text)
    assert not leaked(out), f"{case}: {out}"
    assert redact(out) == out, "idempotent"


VALUE = "Zq9SECRETVALUE0123456789abcdef"
CREDENTIAL_NAMES = ["token", "access_token", "sas", "password", "secret", "sig", "Signature", "X-Amz-Signature",
                    "X-Amz-Credential", "X-Amz-Security-Token", "AWSAccessKeyId", "X-Goog-Signature",
                    "X-Goog-Credential", "GoogleAccessId", "skoid", "sktid", "TOKEN", "Password"]
SPELLINGS = {
    "free text": "failed: {name}={value} retrying",
    "url query": "GET https://h.example/b/k?a=1&{name}={value}&b=2 failed",
    "url query, no scheme": "b/k?a=1&{name}={value}",
    "header": "{name}: {value}",
    "json": '{{"{name}": "{value}", "n": 1}}',
    "dict repr": "{{'{name}': ['{value}']}}",
    "newline": "{name}=\n{value}",
    "json escapes": "https://h/k?a\\u003d1\\u0026{name}\\u003d{value}",
    "encoded once": "k%3Fa%3D1%26{name}%3D{value}",
    "encoded thrice": "k%25253Fa%25253D1%252526{name}%25253D{value}",
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
@pytest.mark.parametrize("name", CREDENTIAL_NAMES)
def test_every_credential_name_in_every_spelling(name: str, spelling: str) -> None:
    text = SPELLINGS[spelling].format(name=name, value=VALUE)
    out = redact(text)
    assert VALUE not in out, out
    assert redact(out) == out, "idempotent"


def test_harmless_words_survive() -> None:
    # Names only count as a whole word followed by a separator and a value.
    for text in ("token not authenticated", "TokenReview failed: 503",
                 "HTTP status code: 403 for https://h/k?versionId=3", "xsig=abc", "mysecret=abc",
                 "signatures verified", "w1: download failed with HTTP 404"):
        assert redact(text) == text


def test_truncated_signature_value_is_redacted() -> None:
    assert SIG[:40] not in redact(f"failed: http://h/k?X-Amz-Signature={SIG[:40]}")


def test_the_rest_of_the_message_survives() -> None:
    out = redact(f"w1: download failed with HTTP 404 for {PRESIGNED}")
    assert out == "w1: download failed with HTTP 404 for https://bucket.s3.eu-west-1.amazonaws.com/in/a.png?" + REDACTED
    assert redact("https://h/k?versionId=3&x=1") == "https://h/k?versionId=3&x=1"
    assert redact("no urls here") == "no urls here"
    assert redact("") == ""


def test_a_real_boto3_presigned_url() -> None:
    s3 = boto3.client("s3", region_name="us-east-1", aws_access_key_id=CRED, aws_secret_access_key="s",
                      aws_session_token=TOKEN, config=Config(signature_version="s3v4"),
                      endpoint_url="http://127.0.0.1:1")
    url = s3.generate_presigned_url("put_object", Params={"Bucket": "b", "Key": "out/x.png"}, ExpiresIn=600)
    signature = url.rsplit("X-Amz-Signature=", 1)[1]
    out = redact(f"upload failed: {url}")
    assert signature not in out and CRED not in out and TOKEN not in out


def test_redact_json_reaches_nested_strings() -> None:
    out = redact_json({"jobs": [{"message": PRESIGNED, "n": 3, PRESIGNED: None}]})
    assert not leaked(json.dumps(out))
    assert out["jobs"][0]["n"] == 3


def test_log_filter_redacts_args_and_exceptions(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("gpuroute.test_redact")
    caplog.handler.addFilter(RedactFilter())
    try:
        raise RuntimeError(f"boom {PRESIGNED}")
    except RuntimeError:
        logger.exception("fetching %s", PRESIGNED)
    text = caplog.text
    assert "fetching" in text and "boom" in text
    assert not leaked(text), text


def test_install_redacts_records_of_any_logger_and_later_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    install_log_redaction()
    logger = logging.getLogger("werkzeug.like")
    handler = logging.StreamHandler()  # added after install, as werkzeug adds its own
    logger.addHandler(handler)
    try:
        logger.warning('"GET %s HTTP/1.1" 404', PRESIGNED.split("amazonaws.com", 1)[1])
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "GET /in/a.png" in err and not leaked(err), err


_value = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789%+/=_.~-", min_size=12, max_size=40)
_name = st.sampled_from(["X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "sig", "Signature",
                         "x-amz-signature", "X%2DAmz%2DSignature", "SIG"])
_filler = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=400, deadline=None)
@given(prefix=_filler, suffix=_filler, name=_name, value=_value, other=st.booleans(),
       wrap=st.sampled_from(["", "'", '"', "(", "<"]))
def test_property_no_signature_value_survives(prefix: str, suffix: str, name: str, value: str, other: bool,
                                              wrap: str) -> None:
    # A value that is itself a percent-escape or a common word could occur by chance
    # in the surrounding text; require something distinctive.
    value = "Zq9" + value
    query = (f"a=1&{name}={value}" if other else f"{name}={value}")
    text = f"{prefix} {wrap}https://host.example/b/k?{query}{wrap} {suffix}"
    out = redact(text)
    assert value not in out


def test_a_query_that_never_stops_decoding_is_redacted() -> None:
    # Past the decoding bound nothing is known about the names: fail closed.
    deep = "https://h/k?next=%" + "25" * 40 + "41"
    assert redact(deep) == "https://h/k?" + REDACTED
    shallow = "https://h/k?next=%" + "25" * 5 + "41"
    assert redact(shallow) == shallow


@pytest.mark.parametrize("text", ["xsig:" * 30000, "token" * 30000, "sig=" * 30000, "%25" * 30000,
                                  "x-amz-signature: " * 10000, "\\u0026sig=" * 20000])
def test_long_hostile_text_is_redacted_in_linear_time(text: str) -> None:
    # No timing assertion: a quadratic scan of these would not finish within the test run.
    redact(text)
