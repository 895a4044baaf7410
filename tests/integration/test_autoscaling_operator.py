"""Remote autoscaling driven by the real operator process: a pool at zero workers gets
demand, the operator scales the worker Deployment in a second apiserver (the GPU
cluster) through that cluster's API, a worker joins (standing in for the pod the GPU
cluster would start: no kubelet runs here), the jobs complete, and an idle pool goes
back to zero."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gpuroute_dev.localenv.controlplane import ControlPlane, ControlPlaneConfig
from gpuroute_dev.localenv.stack import LocalStack, PoolConfig

BUCKET, NS, POOL = "gpuroute-elastic", "team-e", "elastic"
WORKER_NS, DEPLOYMENT = "gpuroute-workers", "gpuroute-worker"


@pytest.fixture(scope="module")
def clusters(control_plane: Any, s3_server: Any,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, ControlPlane]]:
    from kubernetes import client

    gpu = ControlPlane(ControlPlaneConfig(name="gpu-elastic", crd_dir=None, workdir=tmp_path_factory.mktemp("gpu"),
                                          assets=control_plane.config.assets))
    gpu.start()
    with gpu.api_client() as api:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": WORKER_NS}})
        labels = {"app": DEPLOYMENT}
        client.AppsV1Api(api).create_namespaced_deployment(WORKER_NS, {
            "metadata": {"name": DEPLOYMENT},
            "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "worker", "image": "gpuroute-worker:test"}]}}}})
    s3_server.create_bucket(BUCKET)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    s3_server.client().put_object(Bucket=BUCKET, Key="in/x.png", Body=buffer.getvalue())
    stack = LocalStack(tmp_path_factory.mktemp("elastic"), control_plane, s3_server)
    stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/"])
    kubeconfig = gpu.inline_kubeconfig()  # the operator refuses kubeconfigs that read files
    stack.core.create_namespaced_secret(stack.namespace, {
        "metadata": {"name": "gpu-elastic-kubeconfig"},
        "data": {"kubeconfig": base64.b64encode(kubeconfig.encode()).decode()}})
    stack.add_pool(PoolConfig(POOL, workers=("e1",), extra_spec={"scaling": {
        "kubeconfigSecretRef": {"name": "gpu-elastic-kubeconfig"},
        "deployment": {"name": DEPLOYMENT, "namespace": WORKER_NS},
        "minReplicas": 0, "maxReplicas": 3, "targetQueuePerWorker": 2, "scaleDownIdleSeconds": 4}}))
    stack.start_operator()
    try:
        yield stack, gpu
    finally:
        stack.stop()
        gpu.stop()


def _replicas(gpu: ControlPlane) -> int:
    from kubernetes import client

    with gpu.api_client() as api:
        return int(client.AppsV1Api(api).read_namespaced_deployment_scale(DEPLOYMENT, WORKER_NS).spec.replicas or 0)


def _wait_replicas(gpu: ControlPlane, wanted: int, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while _replicas(gpu) != wanted:
        assert time.monotonic() < deadline, f"remote Deployment has {_replicas(gpu)} replicas, wanted {wanted}"
        time.sleep(0.3)


def test_scale_from_zero_on_demand_and_back_to_zero_when_idle(clusters: tuple[LocalStack, ControlPlane]) -> None:
    stack, gpu = clusters
    assert _replicas(gpu) == 0
    names = [f"burst-{i}" for i in range(5)]
    for name in names:
        stack.create_job(NS, name, {"input": {"uri": f"s3://{BUCKET}/in/x.png"},
                                    "output": {"uri": f"s3://{BUCKET}/out/{name}.png"},
                                    "steps": [{"op": "invert"}], "placement": {"pools": [POOL]}})
    # 5 waiting jobs / 2 per worker -> 3, the maximum.
    _wait_replicas(gpu, 3)
    events = stack.core.list_event_for_all_namespaces(field_selector=f"involvedObject.name={POOL}").items
    assert any(e.reason == "Scaled" and "0 -> 3" in e.message for e in events), [e.message for e in events]
    stack.start_worker(POOL, "e1")
    jobs = stack.wait_for_jobs(NS, names, timeout=90)
    assert all(j["status"]["phase"] == "Completed" for j in jobs.values())
    _wait_replicas(gpu, 0, timeout=40)
