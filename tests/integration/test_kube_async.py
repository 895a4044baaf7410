"""AsyncKube against a real kube-apiserver: status patches, Events at most once, keep-alive."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from kubernetes import client

from gpuroute_operator.kube.api import AsyncKube, KubeAPIError

GROUP, VERSION = "gpuroute.io", "v1alpha1"


def _namespace(control_plane: Any, annotations: dict[str, str] | None = None) -> str:
    name = f"ak-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(control_plane.api_client()).create_namespace(
        {"metadata": {"name": name, "annotations": annotations or {}}})
    return name


def _job(control_plane: Any, namespace: str, name: str) -> dict[str, Any]:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageJob", "metadata": {"name": name},
            "spec": {"input": {"uri": "s3://b/in.png"}, "output": {"uri": "s3://b/out.png"},
                     "steps": [{"op": "invert"}]}}
    created: dict[str, Any] = client.CustomObjectsApi(control_plane.api_client()).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "imagejobs", body)
    return created


def test_status_patch_event_once_and_annotations(control_plane: Any) -> None:
    namespace = _namespace(control_plane, {"gpuroute.io/example": "yes"})
    job = _job(control_plane, namespace, "j1")
    involved = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageJob", "name": "j1", "namespace": namespace,
                "uid": job["metadata"]["uid"]}

    async def scenario() -> tuple[bool, bool, bool, bool, dict[str, str], int]:
        kube = AsyncKube(control_plane.kubeconfig)
        try:
            patched = await kube.patch_status("ImageJob", namespace, "j1", {"phase": "Completed", "message": "done"})
            gone = await kube.patch_status("ImageJob", namespace, "missing", {"phase": "Completed"})
            first = await kube.post_event(involved, type_="Normal", reason="Completed", message="m", name="j1.x.terminal")
            second = await kube.post_event(involved, type_="Normal", reason="Completed", message="m",
                                           name="j1.x.terminal")
            annotations = await kube.namespace_annotations(namespace)
            # Every request above went over pooled keep-alive connections: one, here.
            connector = kube._open().connector
            assert connector is not None
            opened = len(connector._conns)  # aiohttp has no public count of idle connections
            return patched, gone, first, second, annotations, opened
        finally:
            await kube.close()

    patched, gone, first, second, annotations, opened = asyncio.run(scenario())
    assert (patched, gone, first, second) == (True, False, True, False)
    assert annotations["gpuroute.io/example"] == "yes"
    assert opened == 1
    stored = client.CustomObjectsApi(control_plane.api_client()).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "imagejobs", "j1")
    assert stored["status"]["phase"] == "Completed"
    events = client.CoreV1Api(control_plane.api_client()).list_namespaced_event(namespace).items
    assert [e.metadata.name for e in events] == ["j1.x.terminal"]


def test_schema_violation_raises_with_the_status_code(control_plane: Any) -> None:
    namespace = _namespace(control_plane)
    _job(control_plane, namespace, "j2")

    async def scenario() -> int:
        kube = AsyncKube(control_plane.kubeconfig)
        try:
            await kube.patch_status("ImageJob", namespace, "j2", {"phase": "NotAPhase"})
        except KubeAPIError as exc:
            return exc.status
        finally:
            await kube.close()
        return 0

    assert asyncio.run(scenario()) == 422
