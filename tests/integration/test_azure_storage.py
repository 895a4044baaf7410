"""Azure Blob storage through the whole path: real Azurite, moto S3, apiserver,
operator and worker; jobs read from one cloud and write to the other."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gpuroute_dev.localenv.stack import LocalStack, PoolConfig

NS, BUCKET, CONTAINER = "team-az", "gpuroute-az", "photos"
ACCOUNT = "devstoreaccount1"


@pytest.fixture(scope="module")
def stack(control_plane: Any, s3_server: Any, azurite_server: Any,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(buffer, "PNG")
    png = buffer.getvalue()
    s3_server.create_bucket(BUCKET)
    s3_server.client().put_object(Bucket=BUCKET, Key="in/x.png", Body=png)
    blobs = azurite_server.client()
    blobs.create_container(CONTAINER)
    blobs.get_blob_client(CONTAINER, "in/x.png").upload_blob(png)
    # Its own operator and worker: the Azure account is operator configuration.
    stack = LocalStack(tmp_path_factory.mktemp("azure"), control_plane, s3_server)
    try:
        stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/in/", f"azure://{ACCOUNT}/{CONTAINER}/in/"],
                               write=[f"s3://{BUCKET}/out/", f"azure://{ACCOUNT}/{CONTAINER}/out/"])
        stack.add_pool(PoolConfig("az-pool", cloud="azure", region="westeurope", workers=("a1",)))
        stack.start_operator(extra_args=azurite_server.operator_args(), extra_env=azurite_server.env())
        stack.start_worker("az-pool", "a1")
        stack.wait_for_pool("az-pool", workers=1)
        yield stack
    finally:
        stack.stop()


@pytest.mark.parametrize(("name", "source", "target"), [
    ("az-to-az", f"azure://{ACCOUNT}/{CONTAINER}/in/x.png", f"azure://{ACCOUNT}/{CONTAINER}/out/az-to-az.png"),
    ("s3-to-az", f"s3://{BUCKET}/in/x.png", f"azure://{ACCOUNT}/{CONTAINER}/out/s3-to-az.png"),
    ("az-to-s3", f"azure://{ACCOUNT}/{CONTAINER}/in/x.png", f"s3://{BUCKET}/out/az-to-s3.png"),
])
def test_cross_cloud_jobs_complete(stack: LocalStack, s3_server: Any, azurite_server: Any, name: str, source: str,
                                   target: str) -> None:
    stack.create_job(NS, name, {"input": {"uri": source}, "output": {"uri": target}, "steps": [{"op": "flip"}]})
    status = stack.wait_for_jobs(NS, [name])[name]["status"]
    assert status["phase"] == "Completed", status
    if target.startswith("azure://"):
        stored = azurite_server.client().get_blob_client(CONTAINER, f"out/{name}.png").download_blob().readall()
    else:
        stored = s3_server.client().get_object(Bucket=BUCKET, Key=f"out/{name}.png")["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == status["output"]["sha256"]
    assert Image.open(io.BytesIO(stored)).size == (80, 60)


def test_azure_output_outside_grants_fails(stack: LocalStack) -> None:
    stack.create_job(NS, "az-denied", {"input": {"uri": f"s3://{BUCKET}/in/x.png"},
                                       "output": {"uri": f"azure://{ACCOUNT}/{CONTAINER}/elsewhere/x.png"},
                                       "steps": [{"op": "invert"}]})
    status = stack.wait_for_jobs(NS, ["az-denied"])["az-denied"]["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "StorageNotGranted")
    assert "spec.output.uri" in status["message"]
