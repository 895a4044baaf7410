"""Presigned S3 URLs against an endpoint that checks SigV4 signatures and expiry."""

from __future__ import annotations

import time
from collections.abc import Iterator

import boto3
import pytest
from botocore.config import Config

from gpuroute.localenv.objectstore import DUMMY_ACCESS_KEY_ID, DUMMY_SECRET_ACCESS_KEY, REGION
from gpuroute.localenv.sigv4front import VerifyingS3
from gpuroute_operator.spec import parse_storage_uri
from gpuroute_operator.storage import Presigner
from gpuroute_worker.transfer import TransferClient, TransferConfig, TransferError

FAST = TransferConfig(retries=0, total_timeout_s=10)


@pytest.fixture(scope="module")
def s3() -> Iterator[VerifyingS3]:
    with VerifyingS3() as server:
        server.backend.create_bucket("signed")
        server.backend.client().put_object(Bucket="signed", Key="team-a/in.png", Body=b"pixels")
        yield server


def _presigner(s3: VerifyingS3) -> Presigner:
    client = boto3.session.Session().client(
        "s3", endpoint_url=s3.endpoint_url, aws_access_key_id=DUMMY_ACCESS_KEY_ID,
        aws_secret_access_key=DUMMY_SECRET_ACCESS_KEY, region_name=REGION,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
    return Presigner(s3_client=client)


def test_valid_presigned_get_and_put_work_tampered_and_unsigned_are_refused(s3: VerifyingS3) -> None:
    presigner = _presigner(s3)
    transfers = TransferClient(FAST)
    url = presigner.get(parse_storage_uri("s3://signed/team-a/in.png", "in")).url
    assert transfers.download(url, max_bytes=100, untrusted=False) == b"pixels"
    put = presigner.put(parse_storage_uri("s3://signed/team-a/out.png", "out"), "png")
    transfers.upload(put.url, b"result", headers=put.headers)
    assert s3.backend.client().get_object(Bucket="signed", Key="team-a/out.png")["Body"].read() == b"result"
    signature = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
    tampered = url[:signature] + ("0" if url[signature] != "0" else "1") + url[signature + 1:]
    other_key = url.replace("team-a/in.png", "team-b/in.png")
    unsigned = url.split("?", 1)[0]
    for bad in (tampered, other_key, unsigned):
        with pytest.raises(TransferError) as caught:
            transfers.download(bad, max_bytes=100, untrusted=False)
        assert caught.value.rejected is True
    assert s3.refused[-3:] == ["SignatureDoesNotMatch", "SignatureDoesNotMatch", "AccessDenied"]
    # A PUT signed for image/png cannot be replayed with another content type.
    with pytest.raises(TransferError):
        transfers.upload(put.url, b"evil", headers={"Content-Type": "text/html"})


def test_expired_presigned_url_is_refused_by_storage(s3: VerifyingS3) -> None:
    presigner = _presigner(s3)
    url = presigner.get(parse_storage_uri("s3://signed/team-a/in.png", "in"), expires_s=1).url
    time.sleep(2.1)
    with pytest.raises(TransferError) as caught:
        TransferClient(FAST).download(url, max_bytes=100, untrusted=False)
    assert caught.value.rejected is True and "expired" in str(caught.value)
    assert s3.refused[-1] == "AccessDenied"
