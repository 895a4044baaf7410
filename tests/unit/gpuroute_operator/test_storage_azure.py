"""Azure SAS signing: account-key and user-delegation SAS for reads and writes.

Fetching a user delegation key needs Azure AD, which cannot run here; the key object
is built by hand (the same type azure-storage-blob returns) to test the signing.
"""

from __future__ import annotations

import datetime as dt
from urllib.parse import parse_qs, urlsplit

import pytest
from azure.storage.blob import UserDelegationKey

from gpuroute.localenv.azurite import ACCOUNT, KEY
from gpuroute_operator.spec import SpecError, parse_storage_uri
from gpuroute_operator.spec import parse_job_spec
from gpuroute_operator.storage import AzureAccount, Presigner, StorageGrants


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def test_account_key_sas_for_read_and_write() -> None:
    signer = Presigner(azure_accounts=[AzureAccount(ACCOUNT, "http://127.0.0.1:10000/devstoreaccount1", KEY)])
    uri = parse_storage_uri("azure://devstoreaccount1/photos/in/a b.png", "spec.input.uri")
    read = signer.get(uri, expires_s=600)
    assert read.url.startswith("http://127.0.0.1:10000/devstoreaccount1/photos/in/a%20b.png?")
    assert _query(read.url)["sp"] == "r" and _query(read.url)["sr"] == "b"
    write = signer.put(parse_storage_uri("azure://devstoreaccount1/photos/out/x.png", "spec.output.uri"), "png")
    assert _query(write.url)["sp"] == "cw"
    assert write.headers == {"Content-Type": "image/png", "x-ms-blob-type": "BlockBlob"}
    expiry = dt.datetime.fromisoformat(_query(read.url)["se"].replace("Z", "+00:00"))
    assert 500 < (expiry - dt.datetime.now(dt.UTC)).total_seconds() <= 600


def test_user_delegation_sas_and_default_endpoint() -> None:
    signer = Presigner(azure_accounts=[AzureAccount("prodimages")])
    uri = parse_storage_uri("azure://prodimages/raw/x.png", "spec.input.uri")
    with pytest.raises(SpecError) as missing:
        signer.get(uri)
    assert missing.value.reason == "StorageUnavailable"
    key = UserDelegationKey()
    key.signed_oid, key.signed_tid = "00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000002"
    key.signed_start, key.signed_expiry = "2026-01-01T00:00:00Z", "2099-01-01T00:00:00Z"
    key.signed_service, key.signed_version = "b", "2021-08-06"
    key.value = "dGVzdC1kZWxlZ2F0aW9uLWtleQ=="
    signer._delegation["prodimages"] = key
    url = signer.get(uri).url
    assert url.startswith("https://prodimages.blob.core.windows.net/raw/x.png?")
    assert _query(url)["skoid"] == key.signed_oid and _query(url)["sp"] == "r"
    signer.refresh()  # the held key is far from expiry: nothing to fetch, no Azure AD call


def test_unconfigured_account_is_refused() -> None:
    with pytest.raises(SpecError) as caught:
        Presigner().put(parse_storage_uri("azure://other/c1x/x.png", "spec.output.uri"), "png")
    assert (caught.value.field, caught.value.reason) == ("spec.output.uri", "StorageUnavailable")


def test_grants_cover_azure_prefixes() -> None:
    grants = StorageGrants.from_annotations({"gpuroute.io/storage-read": "s3://in-bucket/team/",
                                             "gpuroute.io/storage-write": "azure://acct1/results/team/"})
    spec = parse_job_spec({"input": {"uri": "s3://in-bucket/team/a.png"},
                           "output": {"uri": "azure://acct1/results/team/a.png"}, "steps": [{"op": "invert"}]})
    grants.check(spec, "team")
    outside = parse_job_spec({"input": {"uri": "s3://in-bucket/team/a.png"},
                              "output": {"uri": "azure://acct1/results/other/a.png"}, "steps": [{"op": "invert"}]})
    with pytest.raises(SpecError) as caught:
        grants.check(outside, "team")
    assert caught.value.reason == "StorageNotGranted"
