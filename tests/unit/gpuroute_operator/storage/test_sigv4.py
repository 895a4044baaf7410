"""The operator's own SigV4 query signer against botocore's, request by request.

botocore is the reference: every URL signed here must be the URL botocore writes for the
same request and time, byte for byte, or the template is not used at all.
"""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.config import Config
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuroute_operator.core.spec import StorageURI
from gpuroute_operator.storage.presign import Presigner, sigv4


def _client(*, endpoint: str | None = "http://127.0.0.1:9000", token: str | None = None, region: str = "eu-west-1",
            style: str = "path", secret: str = "SECRET/key+1") -> Any:
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key=secret,
        aws_session_token=token, region_name=region,
        config=Config(signature_version="s3v4", s3={"addressing_style": style}))


def _credentials(client: Any) -> sigv4.Credentials:
    frozen = client._get_credentials().get_frozen_credentials()
    return sigv4.Credentials(frozen.access_key, frozen.secret_key, frozen.token)


KEYS = ["photo.png", "team a/ü ñ/x+y=z&q;v,w.png", "deep/er/~tilde/(1)!'*.jpg", "日本/写真.webp"]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize(("endpoint", "style", "token"), [
    ("http://127.0.0.1:9000", "path", None),
    ("http://127.0.0.1:9000", "path", "FQoGZXIvYXdzE//token+with/slashes=="),
    (None, "virtual", None),
    (None, "path", "session"),
])
def test_urls_are_botocores_byte_for_byte(key: str, endpoint: str | None, style: str, token: str | None) -> None:
    client = _client(endpoint=endpoint, style=style, token=token)
    credentials = _credentials(client)
    get = client.generate_presigned_url("get_object", Params={"Bucket": "bucket-1", "Key": key}, ExpiresIn=300)
    template = sigv4.learn(get, "GET", key, credentials=credentials, expires_s=300)
    assert template is not None and template.signed_headers == ("host",)
    # Another key, signed at the time botocore used for it: the same URL again.
    other = key.replace(".", "-2.")
    expected = client.generate_presigned_url("get_object", Params={"Bucket": "bucket-1", "Key": other}, ExpiresIn=300)
    timestamp = expected.split("X-Amz-Date=", 1)[1][:16]
    assert sigv4.presign(template, "GET", other, credentials=credentials, timestamp=timestamp,
                         expires_s=300) == expected
    put = client.generate_presigned_url("put_object", ExpiresIn=60,
                                        Params={"Bucket": "bucket-1", "Key": key, "ContentType": "image/png"})
    put_template = sigv4.learn(put, "PUT", key, credentials=credentials, expires_s=60,
                               headers={"Content-Type": "image/png"})
    assert put_template is not None and put_template.signed_headers == ("content-type", "host")


@settings(max_examples=150, deadline=None)
@given(key=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40),
       expires=st.integers(1, 604800))
def test_any_key_and_expiry_sign_as_botocore_does(key: str, expires: int) -> None:
    client = _CLIENT
    credentials = _credentials(client)
    url = client.generate_presigned_url("get_object", Params={"Bucket": "b-1", "Key": key}, ExpiresIn=expires)
    template = sigv4.learn(url, "GET", key, credentials=credentials, expires_s=expires)
    assert template is not None, url


_CLIENT = _client(token="tok")


def test_a_url_it_cannot_reproduce_teaches_nothing() -> None:
    client = _client()
    url = client.generate_presigned_url("get_object", Params={"Bucket": "b-1", "Key": "k.png"}, ExpiresIn=60)
    right = _credentials(client)
    wrong_secret = sigv4.Credentials(right.access_key, "another-secret", None)
    assert sigv4.learn(url, "GET", "k.png", credentials=wrong_secret, expires_s=60) is None
    assert sigv4.learn(url, "GET", "k.png", credentials=right, expires_s=61) is None
    assert sigv4.learn(url, "GET", "other.png", credentials=right, expires_s=60) is None
    assert sigv4.learn(url, "PUT", "k.png", credentials=right, expires_s=60) is None
    assert sigv4.learn(url.replace("AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256"), "GET", "k.png",
                       credentials=right, expires_s=60) is None
    # A PUT whose content type botocore did not sign is not the same kind of request.
    assert sigv4.learn(url, "GET", "k.png", credentials=right, expires_s=60, headers={"Content-Type": "x/y"}) is None


def test_signing_keys_are_derived_once_per_day_and_region() -> None:
    keys = sigv4.SigningKeys()
    first = keys.get("secret", "20261130", "eu-west-1", "s3")
    assert keys.get("secret", "20261130", "eu-west-1", "s3") is first
    assert keys.get("secret", "20261201", "eu-west-1", "s3") != first
    assert keys.get("secret", "20261130", "us-east-1", "s3") != first
    # The AWS documentation's example: secret wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY, 20120215, us-east-1, iam.
    example = keys.get("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215", "us-east-1", "iam")
    assert example.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


class CountingClient:
    """A real botocore client that counts the URLs botocore itself signs."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.botocore_signed = 0

    def generate_presigned_url(self, *args: Any, **kwargs: Any) -> str:
        self.botocore_signed += 1
        return str(self._client.generate_presigned_url(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_presigner_asks_botocore_once_per_bucket_method_and_content_type() -> None:
    client = CountingClient(_client())
    presigner = Presigner(s3_client=client, expires_s=120)
    for i in range(5):
        presigner.get(StorageURI("s3", "bucket-1", f"in/{i}.png"))
        presigner.put(StorageURI("s3", "bucket-1", f"out/{i}.png"), "png")
        presigner.put(StorageURI("s3", "bucket-1", f"out/{i}.jpg"), "jpeg")
        presigner.get(StorageURI("s3", "bucket-2", f"in/{i}.png"))
    assert client.botocore_signed == 4
    # What the fast path wrote is what a template learned from botocore writes at that second.
    url = presigner.get(StorageURI("s3", "bucket-1", "in/9.png")).url
    reference = client._client.generate_presigned_url("get_object", Params={"Bucket": "bucket-1", "Key": "in/0.png"},
                                                      ExpiresIn=120)
    credentials = _credentials(client._client)
    template = sigv4.learn(reference, "GET", "in/0.png", credentials=credentials, expires_s=120)
    assert template is not None
    stamp = url.split("X-Amz-Date=", 1)[1][:16]
    assert url == sigv4.presign(template, "GET", "in/9.png", credentials=credentials, timestamp=stamp, expires_s=120)


def test_a_client_without_credentials_still_reports_them_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    # botocore keeps signing (and raising) until credentials exist; nothing is learned meanwhile.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = boto3.session.Session().client("s3", endpoint_url="http://127.0.0.1:9000", region_name="eu-west-1")
    from gpuroute_operator.core.errors import SigningUnavailable

    presigner = Presigner(s3_client=client)
    with pytest.raises(SigningUnavailable):
        presigner.get(StorageURI("s3", "bucket-1", "k.png"))


def test_a_slot_that_cannot_be_learned_rests_and_a_new_client_starts_over() -> None:
    client = _client()
    credentials = _credentials(client)
    url = client.generate_presigned_url("get_object", Params={"Bucket": "b-1", "Key": "k.png"}, ExpiresIn=60)
    templates = sigv4.Templates(retry_s=60.0)
    slot = ("b-1", "GET", "")
    wrong = sigv4.Credentials(credentials.access_key, "rotated-secret", None)
    # Credentials refreshed between botocore's signature and ours: nothing learned, and the
    # slot rests (botocore keeps signing) until retry_s has passed.
    assert not templates.offer(client, slot, url, "k.png", credentials=wrong, expires_s=60, headers=None, now=100.0)
    assert not templates.offer(client, slot, url, "k.png", credentials=credentials, expires_s=60, headers=None,
                               now=159.0)
    assert templates.sign(client, slot, "x.png", credentials=credentials, expires_s=60, headers=None,
                          epoch_s=0.0) is None
    assert templates.offer(client, slot, url, "k.png", credentials=credentials, expires_s=60, headers=None, now=161.0)
    assert templates.sign(client, slot, "x.png", credentials=credentials, expires_s=60, headers=None,
                          epoch_s=0.0) is not None
    # A rebuilt client may send requests elsewhere: what was learned from the old one is dropped.
    assert templates.sign(_client(), slot, "x.png", credentials=credentials, expires_s=60, headers=None,
                          epoch_s=0.0) is None
