"""Presigned S3 URLs against an endpoint that checks SigV4 signatures and expiry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config

from gpuroute_dev.localenv.objectstore import DUMMY_ACCESS_KEY_ID, DUMMY_SECRET_ACCESS_KEY, REGION
from gpuroute_dev.localenv.sigv4front import VerifyingS3
from gpuroute_dev.localenv.stack import LocalStack, PoolConfig
from gpuroute_operator.core.spec import parse_storage_uri
from gpuroute_operator.storage.presign import Presigner
from gpuroute_worker.transfer import TransferClient, TransferConfig, TransferError
from tests.images import noise_png

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


def test_urls_signed_without_botocore_are_accepted_and_still_bound(s3: VerifyingS3) -> None:
    # The first URL of each kind comes from botocore and teaches the template; these do not.
    presigner = _presigner(s3)
    transfers = TransferClient(FAST)
    presigner.get(parse_storage_uri("s3://signed/team-a/in.png", "in"))
    presigner.put(parse_storage_uri("s3://signed/team-a/first.png", "out"), "png")
    key = "team-a/sub dir/ü+x=y&z.png"
    put = presigner.put(parse_storage_uri(f"s3://signed/{key}", "out"), "png")
    transfers.upload(put.url, b"fast", headers=put.headers)
    get = presigner.get(parse_storage_uri(f"s3://signed/{key}", "in"))
    assert transfers.download(get.url, max_bytes=100, untrusted=False) == b"fast"
    assert s3.backend.client().get_object(Bucket="signed", Key=key)["Body"].read() == b"fast"
    for bad in (get.url.replace("team-a/", "team-b/"), get.url.replace("X-Amz-Expires=3600", "X-Amz-Expires=7200")):
        with pytest.raises(TransferError) as caught:
            transfers.download(bad, max_bytes=100, untrusted=False)
        assert caught.value.rejected is True
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


@pytest.fixture(scope="module")
def signed_stack(s3: VerifyingS3, control_plane: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Operator and a worker whose presigned URLs go through the verifying front."""
    s3.backend.client().put_object(Bucket="signed", Key="team-a/big.png", Body=noise_png(768, 512, seed=3))
    stack = LocalStack(tmp_path_factory.mktemp("signed"), control_plane, s3.backend)
    stack.ensure_namespace(NS, read=["s3://signed/team-a/"], write=["s3://signed/team-a/out/"])
    stack.add_pool(PoolConfig(POOL, workers=("s1",)))
    stack.start_operator(extra_env={"AWS_ENDPOINT_URL_S3": s3.endpoint_url})
    stack.start_worker(POOL, "s1")
    stack.wait_for_pool(POOL, workers=1)
    yield stack
    stack.stop()


NS, POOL = "team-signed", "signed-pool"
# Slow on purpose (seconds on a CPU worker): the rotation must fall between signing and upload.
SLOW = [{"op": "upscale", "width": 4096, "method": "lanczos"}, {"op": "rotate", "angle": 7, "expand": True},
        {"op": "sharpen", "radius": 3}, {"op": "denoise", "method": "median", "size": 5},
        {"op": "rotate", "angle": -7, "expand": True}, {"op": "blur", "radius": 4}]


def test_a_url_refused_after_rotation_is_signed_again_without_spending_an_attempt(
        s3: VerifyingS3, signed_stack: LocalStack) -> None:
    stack = signed_stack
    stack.create_job(NS, "rotated", {"input": {"uri": "s3://signed/team-a/big.png"},
                                     "output": {"uri": "s3://signed/team-a/out/rotated.png"}, "steps": SLOW,
                                     "maxAttempts": 1})
    deadline = time.monotonic() + 60
    while (phase := (stack.get_job(NS, "rotated").get("status") or {}).get("phase")) not in ("Dispatched",
                                                                                               "Processing"):
        assert phase not in ("Completed", "Failed"), stack.get_job(NS, "rotated")["status"]
        assert time.monotonic() < deadline, "the job was never dispatched"
        time.sleep(0.05)
    refused_before = len(s3.refused)
    time.sleep(1.1)  # the upload URL was signed at least a second before the rotation...
    s3.rotate()      # ...so storage refuses it, as after a credential rotation
    status = stack.wait_for_jobs(NS, ["rotated"], timeout=120)["rotated"]["status"]
    assert "ExpiredToken" in s3.refused[refused_before:], f"the rotation came after the upload: {status['timing']}"
    assert (status["phase"], status["attempts"]) == ("Completed", 1), status
    stored = s3.backend.client().get_object(Bucket="signed", Key="team-a/out/rotated.png")["Body"].read()
    import hashlib
    assert status["output"]["sha256"] == hashlib.sha256(stored).hexdigest()


def test_grants_hold_against_a_storage_that_checks_signatures(s3: VerifyingS3, signed_stack: LocalStack) -> None:
    stack = signed_stack
    stack.create_job(NS, "granted", {"input": {"uri": "s3://signed/team-a/in.png"},
                                     "output": {"uri": "s3://signed/team-a/out/granted.png"}, "steps": [{"op": "invert"}]})
    stack.create_job(NS, "sibling", {"input": {"uri": "s3://signed/team-ab/in.png"},
                                     "output": {"uri": "s3://signed/team-a/out/sibling.png"}, "steps": [{"op": "invert"}]})
    stack.create_job(NS, "dotdot", {"input": {"uri": "s3://signed/team-a/../team-b/in.png"},
                                    "output": {"uri": "s3://signed/team-a/out/dotdot.png"}, "steps": [{"op": "invert"}]})
    jobs = stack.wait_for_jobs(NS, ["granted", "sibling", "dotdot"], timeout=120)
    # The granted input is not an image: the signed GET went through and the decoder refused it.
    granted = jobs["granted"]["status"]
    assert (granted["phase"], granted["reason"], granted["attempts"]) == ("Failed", "InvalidInput", 1), granted
    for name in ("sibling", "dotdot"):
        status = jobs[name]["status"]
        assert (status["phase"], status["attempts"]) == ("Failed", 0) and status["reason"] in (
            "StorageNotGranted", "InvalidSpec"), status
        assert "spec.input.uri" in status["message"]
