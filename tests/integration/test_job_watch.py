"""The raw ImageJob watch against a real kube-apiserver: list then watch, status patches
dropped, a resourceVersion too old for the watch cache (410 Gone) answered by a new list
that also forgets what was deleted meanwhile, and a resumed watch after the apiserver
restarts."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client

from gpuroute_operator.kube.api import AsyncKube
from gpuroute_operator.kube.job_watch import ImageJobWatch, WatchConfig

GROUP, VERSION, PLURAL = "gpuroute.io", "v1alpha1", "imagejobs"


class Recorder:
    """What the watch handed over: (name or uid, what) in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def observe(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        self.calls.append((meta["name"], (meta.get("annotations") or {}).get("gpuroute.io/cancel") or "observed"))

    def forget(self, uid: str) -> None:
        self.calls.append((uid, "forgotten"))


def _setup(control_plane: Any) -> tuple[client.CustomObjectsApi, str]:
    api = client.CustomObjectsApi(control_plane.api_client())
    namespace = f"jw-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api(api.api_client).create_namespace({"metadata": {"name": namespace}})
    return api, namespace


def _create(api: client.CustomObjectsApi, namespace: str, name: str) -> str:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageJob", "metadata": {"name": name},
            "spec": {"input": {"uri": "s3://b/in.png"}, "output": {"uri": "s3://b/out.png"}, "steps": [{"op": "invert"}]}}
    return str(api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)["metadata"]["uid"])


def _status(api: client.CustomObjectsApi, namespace: str, name: str, message: str) -> None:
    api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name,
                                              {"status": {"phase": "Dispatched", "message": message}})


def _cancel(api: client.CustomObjectsApi, namespace: str, name: str) -> None:
    api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                       {"metadata": {"annotations": {"gpuroute.io/cancel": "true"}}})


async def _until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.05)


def _watch(control_plane: Any, namespace: str, recorder: Recorder) -> ImageJobWatch:
    config = WatchConfig(path=f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}", backoff_s=(0.2, 0.5))
    return ImageJobWatch(AsyncKube(control_plane.kubeconfig), recorder.observe, recorder.forget, config)


def test_list_watch_status_patches_dropped_and_410_relists(control_plane: Any) -> None:
    api, namespace = _setup(control_plane)
    uid_a = _create(api, namespace, "a")
    recorder = Recorder()

    async def scenario() -> ImageJobWatch:
        watch = _watch(control_plane, namespace, recorder)
        watch.start()
        try:
            await asyncio.wait_for(watch.synced.wait(), 30)
            _create(api, namespace, "b")
            for i in range(20):  # the operator's own status writes: received, not handed over
                await asyncio.to_thread(_status, api, namespace, "b", f"m{i}")
            await asyncio.to_thread(_cancel, api, namespace, "b")
            await _until(lambda: ("b", "true") in recorder.calls)
            assert watch.received >= 22
            # Disconnected while a is deleted and c created: the deletion event is lost to us.
            await watch.stop()
            await asyncio.to_thread(api.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, "a")
            _create(api, namespace, "c")
            # Away for longer than the apiserver's watch cache reaches back. Pushing its window
            # past us takes more writes than a test should make (it holds hundreds of events per
            # resource), so the cursor is moved to before the window: the API answers the same
            # 410 "too old resource version".
            watch.resource_version = "1"
            watch.start()
            await _until(lambda: (uid_a, "forgotten") in recorder.calls and ("c", "observed") in recorder.calls)
            return watch
        finally:
            await watch.stop()
            await watch.api.close()

    watch = asyncio.run(scenario())
    assert watch.listed == 2, "the stale resourceVersion should have been answered with 410 and a new list"
    # Each object once per change that matters: no status patch reached the engine, and the
    # second list handed over only what changed (c new, a gone), not b again.
    assert recorder.calls == [("a", "observed"), ("b", "observed"), ("b", "true"), ("c", "observed"),
                              (uid_a, "forgotten")]


def test_watch_resumes_after_the_apiserver_restarts(control_plane: Any) -> None:
    api, namespace = _setup(control_plane)
    _create(api, namespace, "a")
    recorder = Recorder()

    async def scenario() -> ImageJobWatch:
        watch = _watch(control_plane, namespace, recorder)
        watch.start()
        try:
            await asyncio.wait_for(watch.synced.wait(), 30)
            restarted = threading.Event()
            # Blocking (it waits for /readyz): in a thread, so the watch runs through it.
            thread = threading.Thread(target=lambda: (control_plane.restart_apiserver(down_s=1.0), restarted.set()))
            thread.start()
            await _until(restarted.is_set, timeout=90)
            thread.join()
            fresh = client.CustomObjectsApi(control_plane.api_client())
            await asyncio.to_thread(_create, fresh, namespace, "b")
            await asyncio.to_thread(_cancel, fresh, namespace, "a")
            await _until(lambda: ("b", "observed") in recorder.calls and ("a", "true") in recorder.calls)
            return watch
        finally:
            await watch.stop()
            await watch.api.close()

    asyncio.run(scenario())
    # a was handed over once before the restart, then only for its cancel: resuming (or a
    # relist, if the new apiserver's watch cache starts after our resourceVersion) repeats nothing.
    assert sorted(recorder.calls) == [("a", "observed"), ("a", "true"), ("b", "observed")]
