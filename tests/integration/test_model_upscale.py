"""Learned super-resolution through a real worker process: weights the test saves in
Real-ESRGAN's published format, loaded by checksum, run by an ImageJob."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from gpuroute_dev.localenv.stack import LocalStack, PoolConfig
from gpuroute_worker.sr.srvgg import SRVGGNetCompact

BUCKET = "gpuroute-sr"
NS = "team-sr"


@pytest.fixture(scope="module")
def sr_stack(control_plane: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    workdir = tmp_path_factory.mktemp("sr")
    torch.manual_seed(0)
    model = SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=4, upscale=4, act_type="prelu")
    weights = workdir / "tiny-x4.pth"
    torch.save({"params_ema": model.state_dict()}, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()

    s3_server.create_bucket(BUCKET)
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    s3_server.client().put_object(Bucket=BUCKET, Key="in/tile.png", Body=buffer.getvalue())

    stack = LocalStack(workdir / "stack", control_plane, s3_server)
    stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/"])
    stack.add_pool(PoolConfig("sr-pool", workers=("gpu1",),
                              extra_spec={"models": [{"name": "tiny-x4", "uri": str(weights), "sha256": digest}]}))
    stack.add_pool(PoolConfig("plain-pool", workers=("cpu1",)))
    stack.start_operator()
    stack.start_worker("sr-pool", "gpu1", extra_args=["--model", f"tiny-x4={weights}#{digest}"])
    stack.start_worker("plain-pool", "cpu1")
    stack.wait_for_pool("sr-pool", workers=1)
    stack.wait_for_pool("plain-pool", workers=1)
    yield stack
    stack.stop()


def test_model_upscale_runs_on_the_pool_that_serves_the_model(sr_stack: LocalStack, s3_server: Any) -> None:
    spec = {"input": {"uri": f"s3://{BUCKET}/in/tile.png"}, "output": {"uri": f"s3://{BUCKET}/out/sr.png"},
            "steps": [{"op": "upscale", "method": "model", "model": "tiny-x4"}]}
    sr_stack.create_job(NS, "sr", spec)
    status = sr_stack.wait_for_jobs(NS, ["sr"], timeout=120)["sr"]["status"]
    assert status["phase"] == "Completed", status
    assert status["pool"] == "sr-pool", status["decision"]
    assert (status["output"]["width"], status["output"]["height"]) == (256, 192)
    stored = s3_server.client().get_object(Bucket=BUCKET, Key="out/sr.png")["Body"].read()
    assert Image.open(io.BytesIO(stored)).size == (256, 192)


def test_unknown_model_waits_with_no_eligible_pool_until_timeout(sr_stack: LocalStack) -> None:
    spec = {"input": {"uri": f"s3://{BUCKET}/in/tile.png"}, "output": {"uri": f"s3://{BUCKET}/out/none.png"},
            "steps": [{"op": "upscale", "method": "model", "model": "not-served"}], "timeoutSeconds": 3}
    sr_stack.create_job(NS, "no-model", spec)
    queued = sr_stack.wait_for_jobs(NS, ["no-model"], phases=frozenset({"Queued"}), timeout=30)["no-model"]["status"]
    assert queued["reason"] == "NoEligiblePool"
    assert "does not serve model not-served" in queued["message"]
    final = sr_stack.wait_for_jobs(NS, ["no-model"], timeout=30)["no-model"]["status"]
    assert (final["phase"], final["reason"]) == ("Failed", "Timeout")
