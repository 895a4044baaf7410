"""Storage grants per namespace, and presigned URLs checked against a real (moto) S3 server."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from gpuroute_dev.localenv.objectstore import S3Server
from gpuroute_operator.core.errors import SigningUnavailable
from gpuroute_operator.core.grants import READ_ANNOTATION, WRITE_ANNOTATION, StorageGrants
from gpuroute_operator.core.spec import JobSpec, SpecError, StorageURI, parse_job_spec
from gpuroute_operator.storage import presign as storage
from gpuroute_operator.storage.presign import Presigner, SignedURL


def job(input_: dict[str, Any], output_uri: str = "s3://results/team-a/out.png") -> JobSpec:
    return parse_job_spec({"input": input_, "output": {"uri": output_uri}, "steps": [{"op": "invert"}]})


def grants(read: str = "", write: str = "") -> StorageGrants:
    return StorageGrants.from_annotations({READ_ANNOTATION: read, WRITE_ANNOTATION: write})


def test_annotation_names() -> None:
    assert (READ_ANNOTATION, WRITE_ANNOTATION) == ("gpuroute.io/storage-read", "gpuroute.io/storage-write")


@pytest.mark.parametrize(("annotations", "read", "write"), [
    (None, (), ()),
    ({}, (), ()),
    ({"other": "s3://x/"}, (), ()),
    ({READ_ANNOTATION: "s3://datasets/team-a/"}, ("s3://datasets/team-a/",), ()),
    ({READ_ANNOTATION: "s3://datasets/team-a/, https://images.example.com/",
      WRITE_ANNOTATION: "s3://results/team-a/"},
     ("s3://datasets/team-a/", "https://images.example.com/"), ("s3://results/team-a/",)),
    ({READ_ANNOTATION: "  s3://a/\n\ts3://b/ ,,, azure://acct1/cont/  ", WRITE_ANNOTATION: ",\n"},
     ("s3://a/", "s3://b/", "azure://acct1/cont/"), ()),
    ({READ_ANNOTATION: "s3://a/,s3://b/", WRITE_ANNOTATION: "s3://c/ s3://d/"},
     ("s3://a/", "s3://b/"), ("s3://c/", "s3://d/")),
])
def test_from_annotations(annotations: dict[str, str] | None, read: tuple[str, ...], write: tuple[str, ...]) -> None:
    parsed = StorageGrants.from_annotations(annotations)
    assert parsed == StorageGrants(read, write)


def test_job_within_grants_passes() -> None:
    g = grants("s3://datasets/team-a/ https://images.example.com/", "s3://results/team-a/")
    assert g.check(job({"uri": "s3://datasets/team-a/in/x.png"}), "team-a") is None
    assert g.check(job({"uri": "https://images.example.com/cat.png"}), "team-a") is None
    # Inline inputs need no read grant.
    assert g.check(job({"inline": base64.b64encode(b"png").decode()}), "team-a") is None
    assert grants("", "s3://results/").check(job({"inline": "cG5n"}), "ns") is None


def _refusal(g: StorageGrants, spec: JobSpec, namespace: str = "team-a") -> SpecError:
    with pytest.raises(SpecError) as caught:
        g.check(spec, namespace)
    return caught.value


def test_input_outside_read_grants() -> None:
    g = grants("s3://datasets/team-a/", "s3://results/team-a/")
    err = _refusal(g, job({"uri": "s3://datasets/team-b/x.png"}))
    assert (err.field, err.reason) == ("spec.input.uri", "StorageNotGranted")
    assert err.message == ("s3://datasets/team-b/x.png is outside the read prefixes granted to namespace 'team-a' "
                           "(gpuroute.io/storage-read: s3://datasets/team-a/)")


def test_output_outside_write_grants() -> None:
    g = grants("s3://datasets/team-a/", "s3://results/team-a/")
    err = _refusal(g, job({"uri": "s3://datasets/team-a/x.png"}, "s3://results/team-b/out.png"))
    assert (err.field, err.reason) == ("spec.output.uri", "StorageNotGranted")
    assert err.message == ("s3://results/team-b/out.png is outside the write prefixes granted to namespace "
                           "'team-a' (gpuroute.io/storage-write: s3://results/team-a/)")


def test_no_grants_at_all() -> None:
    err = _refusal(StorageGrants(), job({"uri": "s3://datasets/x.png"}), "empty")
    assert err.field == "spec.input.uri"
    assert err.message.endswith("(gpuroute.io/storage-read: none)")
    err = _refusal(StorageGrants(), job({"inline": "cG5n"}), "empty")
    assert err.field == "spec.output.uri"
    assert err.message.endswith("(gpuroute.io/storage-write: none)")


def test_read_grant_does_not_allow_writing() -> None:
    g = grants("s3://shared/", "")
    err = _refusal(g, job({"uri": "s3://shared/in.png"}, "s3://shared/out.png"))
    assert err.field == "spec.output.uri"


def test_prefix_matching_is_by_whole_segment() -> None:
    # Without a trailing slash a grant still names a whole segment: team-a is not team-ab.
    err = _refusal(grants("s3://datasets/team-a", "s3://results/"), job({"uri": "s3://datasets/team-ab/x.png"}))
    assert err.field == "spec.input.uri"
    assert grants("s3://datasets/team-a", "s3://results/").check(job({"uri": "s3://datasets/team-a/x.png"}), "n") is None
    # With the slash neither.
    err = _refusal(grants("s3://datasets/team-a/", "s3://results/"), job({"uri": "s3://datasets/team-ab/x.png"}))
    assert err.field == "spec.input.uri"
    # Another bucket whose name starts the same is outside "s3://data/".
    err = _refusal(grants("s3://data/", "s3://results/"), job({"uri": "s3://datasets/x.png"}))
    assert err.field == "spec.input.uri"


@pytest.mark.parametrize(("input_uri", "output_uri", "field"), [
    ("s3://datasets/team-a/../team-b/x.png", "s3://results/team-a/o.png", "spec.input.uri"),
    ("s3://datasets/team-a/x.png", "s3://results/team-a/../team-b/o.png", "spec.output.uri"),
    ("https://images.example.com/a/../../admin", "s3://results/team-a/o.png", "spec.input.uri"),
])
def test_dot_dot_segments_are_refused(input_uri: str, output_uri: str, field: str) -> None:
    g = grants("s3://datasets/team-a/ https://images.example.com/", "s3://results/team-a/")
    err = _refusal(g, job({"uri": input_uri}, output_uri))
    assert (err.field, err.reason) == (field, "StorageNotGranted")


def test_https_input_needs_an_https_grant() -> None:
    spec = job({"uri": "https://images.example.com/cat.png"})
    err = _refusal(grants("s3://datasets/", "s3://results/"), spec)
    assert (err.field, err.reason) == ("spec.input.uri", "StorageNotGranted")
    assert err.message.startswith("https://images.example.com/cat.png is outside the read prefixes")
    # An https grant for another host does not help either.
    assert _refusal(grants("https://other.example.com/", "s3://results/"), spec).field == "spec.input.uri"
    assert grants("https://images.example.com/", "s3://results/").check(spec, "n") is None


def test_azure_grants() -> None:
    g = grants("azure://acct1/photos/", "azure://acct1/out/")
    assert g.check(job({"uri": "azure://acct1/photos/a.png"}, "azure://acct1/out/a.png"), "n") is None
    assert _refusal(g, job({"uri": "azure://acct1/photos/a.png"}, "azure://acct1/photos/b.png")).field == \
        "spec.output.uri"


# --- Presigner against a real moto S3 server --------------------------------------------------


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The session's moto server (an S3Server from tests/conftest.py), with boto3's environment pointing at it."""
    for name, value in s3_server.env({}).items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


def test_presigned_put_then_get_round_trip(s3: S3Server) -> None:
    s3.create_bucket("gpuroute-presign")
    presigner = Presigner(expires_s=120)
    presigner.warm()
    uri = StorageURI("s3", "gpuroute-presign", "team-a/out/result.png")
    payload = b"\x89PNG\r\n\x1a\n" + os.urandom(4096)

    put = presigner.put(uri, "png")
    assert isinstance(put, SignedURL)
    assert put.headers == {"Content-Type": "image/png"}
    assert put.url.startswith(f"{s3.endpoint_url}/gpuroute-presign/team-a/out/result.png?")
    assert "X-Amz-Expires=120" in put.url and "X-Amz-Signature=" in put.url
    response = requests.put(put.url, data=payload, headers=dict(put.headers), timeout=10)
    assert response.status_code == 200, response.text

    head = s3.client().head_object(Bucket="gpuroute-presign", Key="team-a/out/result.png")
    assert head["ContentLength"] == len(payload)
    assert head["ContentType"] == "image/png"

    get = presigner.get(uri, expires_s=30)
    assert get.headers == {}
    assert "X-Amz-Expires=30" in get.url
    fetched = requests.get(get.url, timeout=10)
    assert fetched.status_code == 200, fetched.text
    assert fetched.content == payload


@pytest.mark.parametrize(("fmt", "content_type"), [("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_presigned_put_content_types(s3: S3Server, fmt: str, content_type: str) -> None:
    s3.create_bucket("gpuroute-formats")
    put = Presigner().put(StorageURI("s3", "gpuroute-formats", f"x.{fmt}"), fmt)
    assert put.headers == {"Content-Type": content_type}
    assert "X-Amz-Expires=3600" in put.url
    assert requests.put(put.url, data=b"img", headers=dict(put.headers), timeout=10).status_code == 200
    assert s3.client().head_object(Bucket="gpuroute-formats", Key=f"x.{fmt}")["ContentType"] == content_type


def test_presigned_get_of_a_missing_object_is_404(s3: S3Server) -> None:
    s3.create_bucket("gpuroute-missing")
    get = Presigner().get(StorageURI("s3", "gpuroute-missing", "nope.png"))
    assert requests.get(get.url, timeout=10).status_code == 404


def test_presigner_uses_a_given_client(s3: S3Server) -> None:
    s3.create_bucket("gpuroute-given")
    client = s3.client()
    presigner = Presigner(s3_client=client)
    presigner.warm()
    assert presigner._s3_client() is client
    url = presigner.get(StorageURI("s3", "gpuroute-given", "k")).url
    assert url.startswith(f"{s3.endpoint_url}/gpuroute-given/k?")


def test_azure_account_not_configured_is_unavailable() -> None:
    presigner = Presigner(s3_client=object())  # never touched for azure
    uri = StorageURI("azure", "acct1/photos", "a.png")
    with pytest.raises(SpecError) as caught:
        presigner.get(uri)
    assert (caught.value.field, caught.value.reason) == ("spec.input.uri", "StorageUnavailable")
    assert caught.value.message == "storage account 'acct1' is not configured on the operator"
    with pytest.raises(SpecError) as caught:
        presigner.put(uri, "png")
    assert (caught.value.field, caught.value.reason) == ("spec.output.uri", "StorageUnavailable")
    assert caught.value.message == "storage account 'acct1' is not configured on the operator"


def test_s3_credentials_that_appear_later_are_picked_up(s3: S3Server, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The operator started before its credentials existed (an IRSA token mounted late): jobs
    # wait instead of failing, and signing works once the credentials file appears.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    credentials = tmp_path / "credentials"
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr(storage, "S3_CLIENT_RETRY_S", 0.0)
    presigner = Presigner()
    uri = StorageURI("s3", "gpuroute-late", "k.png")
    with pytest.raises(SigningUnavailable) as caught:
        presigner.put(uri, "png")
    assert caught.value.field == "spec.output.uri"
    assert "cannot sign for S3: Unable to locate credentials" in str(caught.value)

    credentials.write_text(f"[default]\naws_access_key_id = {s3.env({})['AWS_ACCESS_KEY_ID']}\n"
                           f"aws_secret_access_key = {s3.env({})['AWS_SECRET_ACCESS_KEY']}\n")
    s3.create_bucket("gpuroute-late")
    deadline = time.monotonic() + 15
    while True:
        try:
            signed = presigner.put(uri, "png")
            break
        except SigningUnavailable:
            assert time.monotonic() < deadline, "the S3 client was never rebuilt"
            time.sleep(0.05)
    assert requests.put(signed.url, data=b"late", headers=signed.headers, timeout=10).status_code == 200
    assert requests.get(presigner.get(uri).url, timeout=10).content == b"late"
