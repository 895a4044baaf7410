"""Grants are checked at every attempt, not only at admission: once a cluster admin removes a
prefix from a namespace's annotations, the operator stops presigning it for that namespace's
jobs, the ones already admitted included (security review, finding 9)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from gpuroute_dev.localenv.stack import LocalStack, PoolConfig
from tests.images import noise_png

BUCKET = "gpuroute-revoke"
NS = "team-revoke"
POOL = "revoke-pool"


@pytest.fixture(scope="module")
def stack(control_plane: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s3_server.create_bucket(BUCKET)
    s3_server.client().put_object(Bucket=BUCKET, Key="in/a.png", Body=noise_png(32, 24, seed=3))
    stack = LocalStack(tmp_path_factory.mktemp("revoke"), control_plane, s3_server)
    stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/"])
    stack.add_pool(PoolConfig(POOL, workers=("r1",)))
    stack.start_operator()
    yield stack
    stack.stop()


def test_an_admitted_job_is_not_signed_once_its_prefix_is_revoked(stack: LocalStack, s3_server: Any) -> None:
    spec = {"input": {"uri": f"s3://{BUCKET}/in/a.png"}, "output": {"uri": f"s3://{BUCKET}/out/late.png"},
            "steps": [{"op": "invert"}], "placement": {"pools": [POOL]}}
    stack.create_job(NS, "late", spec)  # admitted under the grant; no worker yet, so it waits
    deadline = time.monotonic() + 30
    while (stack.get_job(NS, "late").get("status") or {}).get("phase") != "Queued":
        assert time.monotonic() < deadline, "the job was not admitted"
        time.sleep(0.2)
    stack.core.patch_namespace(NS, {"metadata": {"annotations": {"gpuroute.io/storage-read": None}}})
    time.sleep(12)  # past the operator's grants cache (10 s)
    stack.start_worker(POOL, "r1")
    status = stack.wait_for_jobs(NS, ["late"], timeout=60)["late"]["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "StorageNotGranted"), status
    assert "spec.input.uri" in status["message"]
    listed = s3_server.client().list_objects_v2(Bucket=BUCKET, Prefix="out/")
    assert "Contents" not in listed, "the worker wrote an output for a revoked grant"
