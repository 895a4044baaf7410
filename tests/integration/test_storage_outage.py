"""The operator cannot sign for storage for a while: jobs wait, then complete.

Real processes: the kube-apiserver, the operator, a worker, moto S3. The operator starts
with no AWS credentials at all (as when an IRSA token is mounted after the pod starts);
the credentials file it is pointed at appears later.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gpuroute_dev.localenv.stack import LocalStack, PoolConfig

BUCKET = "gpuroute-outage"
NS = "team-outage"
POOL = "outage-pool"


@pytest.fixture(scope="module")
def stack(control_plane: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s3_server.create_bucket(BUCKET)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buffer, "PNG")
    s3_server.client().put_object(Bucket=BUCKET, Key="in/red.png", Body=buffer.getvalue())
    workdir = tmp_path_factory.mktemp("outage")
    stack = LocalStack(workdir, control_plane, s3_server)
    stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/"])
    stack.add_pool(PoolConfig(POOL, workers=("o1",)))
    stack.start_operator(extra_env={
        "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",  # empty: not set, for botocore
        "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "aws-credentials"),  # not there yet
        "AWS_CONFIG_FILE": str(workdir / "aws-config"),
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    stack.start_worker(POOL, "o1")
    stack.wait_for_pool(POOL, workers=1)
    yield stack
    stack.stop()


def _wait_for_metric(stack: LocalStack, value: float) -> None:
    deadline = time.monotonic() + 10
    while stack.operator_metric("gpuroute_storage_waiting_jobs") != value:
        assert time.monotonic() < deadline, f"gpuroute_storage_waiting_jobs never became {value}"
        time.sleep(0.2)


def test_jobs_wait_for_storage_credentials_then_complete(stack: LocalStack, s3_server: Any) -> None:
    spec = {"input": {"uri": f"s3://{BUCKET}/in/red.png"}, "output": {"uri": f"s3://{BUCKET}/out/waited.png"},
            "steps": [{"op": "invert"}]}
    stack.create_job(NS, "waited", spec)
    status = stack.wait_for_jobs(NS, ["waited"], phases=frozenset({"Queued"}))["waited"].get("status") or {}
    deadline = time.monotonic() + 30
    while status.get("reason") != "StorageUnavailable":
        assert status.get("phase") == "Queued", status
        assert time.monotonic() < deadline, f"never reported StorageUnavailable: {status}"
        time.sleep(0.2)
        status = stack.get_job(NS, "waited").get("status") or {}
    assert "spec.input.uri: cannot sign for S3: Unable to locate credentials" in status["message"]
    assert "retrying every 5 s until timeoutSeconds" in status["message"]
    assert status["attempts"] == 0  # nothing was sent: no attempt spent
    _wait_for_metric(stack, 1)  # published on the engine's next tick
    events = [e for e in stack.core.list_namespaced_event(NS, field_selector="involvedObject.name=waited").items
              if e.reason == "StorageUnavailable"]
    assert len(events) == 1 and events[0].type == "Warning"

    # The credentials appear (the token is mounted): the same job completes, once, with one attempt.
    env = s3_server.env({})
    credentials = Path(stack.workdir) / "aws-credentials"
    credentials.write_text(f"[default]\naws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\n"
                           f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n")
    done = stack.wait_for_jobs(NS, ["waited"], timeout=60)["waited"]["status"]
    assert (done["phase"], done["attempts"]) == ("Completed", 1), done
    body = s3_server.client().get_object(Bucket=BUCKET, Key="out/waited.png")["Body"].read()
    assert Image.open(io.BytesIO(body)).getpixel((0, 0)) == (55, 245, 245)
    _wait_for_metric(stack, 0)
