"""Azure SAS signing: account-key and user-delegation SAS for reads and writes.

The user-delegation tests run against a real Azurite (HTTPS, `--oauth basic`), which
implements Get User Delegation Key and checks user delegation SAS signatures. The one
thing faked is the Azure AD identity service, which cannot run here: `FakeCredential`
hands out unsigned JWTs with the claims Azurite checks (issuer, audience, lifetime),
where production gets real tokens from DefaultAzureCredential (AKS workload identity).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from gpuroute_dev.localenv.azurite import ACCOUNT, KEY, AzuriteServer
from gpuroute_operator.core.errors import SigningUnavailable
from gpuroute_operator.core.grants import StorageGrants
from gpuroute_operator.core.spec import SpecError, parse_job_spec, parse_storage_uri
from gpuroute_operator.storage.presign import AzureAccount, Presigner

TENANT = "11111111-1111-1111-1111-111111111111"
OBJECT_ID = "22222222-2222-2222-2222-222222222222"
CONTAINER = "udk"


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def _time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_account_key_sas_for_read_and_write() -> None:
    signer = Presigner(azure_accounts=[AzureAccount(ACCOUNT, "http://127.0.0.1:10000/devstoreaccount1", KEY)])
    uri = parse_storage_uri("azure://devstoreaccount1/photos/in/a b.png", "spec.input.uri")
    read = signer.get(uri, expires_s=600)
    assert read.url.startswith("http://127.0.0.1:10000/devstoreaccount1/photos/in/a%20b.png?")
    query = _query(read.url)
    assert (query["sp"], query["sr"]) == ("r", "b")
    assert "spr" not in query  # an http:// endpoint (Azurite): the SAS must not demand https
    assert read.headers == {}
    expiry = _time(query["se"])
    assert 500 < (expiry - dt.datetime.now(dt.UTC)).total_seconds() <= 600
    write = signer.put(parse_storage_uri("azure://devstoreaccount1/photos/out/x.png", "spec.output.uri"), "png")
    assert (_query(write.url)["sp"], _query(write.url)["sr"]) == ("cw", "b")
    assert write.headers == {"Content-Type": "image/png", "x-ms-blob-type": "BlockBlob"}


def test_default_endpoint_is_https_only_and_the_key_stays_out_of_repr() -> None:
    account = AzureAccount("prodimages", key=KEY)
    assert account.blob_endpoint == "https://prodimages.blob.core.windows.net"
    assert KEY not in repr(account)  # EngineConfig and logs print accounts
    url = Presigner(azure_accounts=[account]).get(parse_storage_uri("azure://prodimages/raw/x.png", "f")).url
    assert url.startswith("https://prodimages.blob.core.windows.net/raw/x.png?")
    assert _query(url)["spr"] == "https"


def test_unconfigured_account_and_missing_delegation_key_are_refused() -> None:
    with pytest.raises(SpecError) as caught:
        Presigner().put(parse_storage_uri("azure://other/c1x/x.png", "spec.output.uri"), "png")
    assert (caught.value.field, caught.value.reason) == ("spec.output.uri", "StorageUnavailable")
    # A delegation account before its key arrived: not yet (the job waits), without blocking to fetch one.
    with pytest.raises(SigningUnavailable) as missing:
        Presigner(azure_accounts=[AzureAccount("prodimages")]).get(
            parse_storage_uri("azure://prodimages/raw/x.png", "spec.input.uri"))
    assert missing.value.field == "spec.input.uri"
    assert "no user delegation key for storage account 'prodimages' yet" in str(missing.value)


def test_grants_cover_azure_prefixes() -> None:
    grants = StorageGrants.from_annotations({"gpuroute.io/storage-read": "s3://in-bucket/team/, azure://acct1/raw/team/",
                                             "gpuroute.io/storage-write": "azure://acct1/results/team/"})

    def spec(source: str, target: str) -> Any:
        return parse_job_spec({"input": {"uri": source}, "output": {"uri": target}, "steps": [{"op": "invert"}]})

    grants.check(spec("s3://in-bucket/team/a.png", "azure://acct1/results/team/a.png"), "team")
    grants.check(spec("azure://acct1/raw/team/a.png", "azure://acct1/results/team/b.png"), "team")
    refused = {
        "spec.output.uri": [spec("s3://in-bucket/team/a.png", "azure://acct1/results/other/a.png"),
                            spec("s3://in-bucket/team/a.png", "azure://acct2/results/team/a.png"),
                            spec("s3://in-bucket/team/a.png", "azure://acct1/results/team/../other/a.png"),
                            spec("s3://in-bucket/team/a.png", "s3://acct1/results/team/a.png")],
        "spec.input.uri": [spec("azure://acct1/raw/other/a.png", "azure://acct1/results/team/a.png"),
                           # a write grant is not a read grant
                           spec("azure://acct1/results/team/a.png", "azure://acct1/results/team/b.png")],
    }
    for field, specs in refused.items():
        for job in specs:
            with pytest.raises(SpecError) as caught:
                grants.check(job, "team")
            assert (caught.value.field, caught.value.reason) == (field, "StorageNotGranted")


# ---- user delegation SAS against Azurite -------------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class FakeCredential:
    """Stands in for Azure AD: an azure-core TokenCredential issuing unsigned tokens."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []
        self.failure: Exception | None = None
        self._lock = threading.Lock()

    def get_token(self, *scopes: str, **_: Any) -> Any:
        from azure.core.credentials import AccessToken

        with self._lock:
            self.scopes.append(scopes)
        if self.failure is not None:
            raise self.failure
        now = int(time.time())
        claims = {"aud": "https://storage.azure.com", "iss": f"https://sts.windows.net/{TENANT}/", "iat": now - 60,
                  "nbf": now - 60, "exp": now + 3600, "oid": OBJECT_ID, "tid": TENANT}
        return AccessToken(f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}.", now + 3600)


@pytest.fixture(scope="module")
def azurite_oauth() -> Iterator[AzuriteServer]:
    with AzuriteServer(oauth=True) as server:
        with server.client() as client:
            client.create_container(CONTAINER)
            client.get_blob_client(CONTAINER, "in/a.txt").upload_blob(b"input bytes")
        yield server


@pytest.fixture
def trusted(azurite_oauth: AzuriteServer, monkeypatch: pytest.MonkeyPatch) -> AzuriteServer:
    # The Presigner's own BlobServiceClient (requests underneath) must trust Azurite's certificate.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(azurite_oauth.ca_file))
    return azurite_oauth


def _delegation_signer(server: AzuriteServer, credential: FakeCredential, **options: Any) -> Presigner:
    return Presigner(azure_accounts=[AzureAccount(ACCOUNT, server.endpoint)], azure_credential=credential, **options)


def _open(server: AzuriteServer, request: urllib.request.Request | str) -> bytes:
    import ssl

    context = ssl.create_default_context(cafile=str(server.ca_file))
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return bytes(response.read())


def test_user_delegation_sas_reads_and_writes_on_azurite(trusted: AzuriteServer) -> None:
    credential = FakeCredential()
    signer = _delegation_signer(trusted, credential)
    try:
        signer.warm()
        assert credential.scopes == [("https://storage.azure.com/.default",)]
        read = signer.get(parse_storage_uri(f"azure://{ACCOUNT}/{CONTAINER}/in/a.txt", "spec.input.uri"))
        query = _query(read.url)
        assert (query["sp"], query["sr"], query["skoid"], query["sktid"], query["spr"]) == (
            "r", "b", OBJECT_ID, TENANT, "https")
        assert _open(trusted, read.url) == b"input bytes"
        # Azurite really checks the signature: a tampered one is refused.
        with pytest.raises(urllib.error.HTTPError) as refused:
            _open(trusted, read.url.replace("sig=", "sig=AAAA"))
        assert refused.value.code == 403

        write = signer.put(parse_storage_uri(f"azure://{ACCOUNT}/{CONTAINER}/out/b.png", "spec.output.uri"), "png")
        assert _query(write.url)["sp"] == "cw"
        _open(trusted, urllib.request.Request(write.url, data=b"output bytes", method="PUT", headers=dict(write.headers)))
        with trusted.client() as client:
            blob = client.get_blob_client(CONTAINER, "out/b.png")
            assert blob.download_blob().readall() == b"output bytes"
            assert blob.get_blob_properties().content_settings.content_type == "image/png"
        # A read SAS cannot write.
        with pytest.raises(urllib.error.HTTPError) as denied:
            _open(trusted, urllib.request.Request(read.url, data=b"x", method="PUT", headers=dict(write.headers)))
        assert denied.value.code == 403

        signer.renew_keys()  # the key has ~48 h left: cached, no second token or key request
        signer.refresh()  # wakes the renewal thread, which finds nothing due either
        time.sleep(0.5)
        assert len(credential.scopes) == 1
    finally:
        signer.close()


def test_delegation_key_renewed_before_expiry_and_sas_never_outlives_it(trusted: AzuriteServer) -> None:
    credential = FakeCredential()
    # Keys of 1 h that count as due for renewal with 2 h left: every renewal fetches.
    signer = _delegation_signer(trusted, credential, key_lifetime=dt.timedelta(hours=1),
                                renew_before=dt.timedelta(hours=2))
    uri = parse_storage_uri(f"azure://{ACCOUNT}/{CONTAINER}/in/a.txt", "spec.input.uri")
    signer.renew_keys()
    first = _query(signer.get(uri).url)
    signer.renew_keys()
    assert len(credential.scopes) == 2
    url = signer.get(uri, expires_s=86400).url
    second = _query(url)
    assert second["ske"] >= first["ske"]
    # A job may ask for a day; the SAS stops when its key does.
    assert _time(second["se"]) <= _time(second["ske"])
    assert (_time(second["ske"]) - dt.datetime.now(dt.UTC)) < dt.timedelta(hours=1, minutes=1)
    assert _open(trusted, url) == b"input bytes"


def test_identity_failure_is_reported_then_recovered_by_the_renewal_thread(trusted: AzuriteServer) -> None:
    from azure.core.exceptions import ClientAuthenticationError

    credential = FakeCredential()
    credential.failure = ClientAuthenticationError("workload identity token file not found")
    signer = _delegation_signer(trusted, credential)
    uri = parse_storage_uri(f"azure://{ACCOUNT}/{CONTAINER}/in/a.txt", "spec.input.uri")
    try:
        signer.warm()  # logged, not raised: S3 jobs and other accounts keep working
        with pytest.raises(SigningUnavailable) as caught:
            signer.get(uri)
        assert "workload identity token file not found" in str(caught.value)
        credential.failure = None
        signer.refresh()
        deadline = time.monotonic() + 15
        while True:
            try:
                url = signer.get(uri).url
                break
            except SigningUnavailable:
                assert time.monotonic() < deadline, "the renewal thread did not fetch the key"
                time.sleep(0.1)
        assert _open(trusted, url) == b"input bytes"
    finally:
        signer.close()
