"""Blocking Kubernetes access through pykube-ng, always called from worker threads.

kopf owns the watch streams; this module does the few direct reads and writes the
operator makes outside handlers (status patches, Events, Secrets, Namespaces).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pykube

from gpuroute_operator.core.timestamps import now_rfc3339


class ImageJobObject(pykube.objects.NamespacedAPIObject):
    version = "gpuroute.io/v1alpha1"
    endpoint = "imagejobs"
    kind = "ImageJob"


class WorkerPoolObject(pykube.objects.APIObject):
    version = "gpuroute.io/v1alpha1"
    endpoint = "workerpools"
    kind = "WorkerPool"


class Kube:
    """One pykube client per thread: requests sessions are not shared across threads."""

    def __init__(self, kubeconfig: str | None = None) -> None:
        self._kubeconfig = kubeconfig
        self._local = threading.local()

    def api(self) -> pykube.HTTPClient:
        client = getattr(self._local, "api", None)
        if client is None:
            config = pykube.KubeConfig.from_file(self._kubeconfig) if self._kubeconfig else pykube.KubeConfig.from_env()
            client = pykube.HTTPClient(config, timeout=30)
            self._local.api = client
        return client

    def patch_status(self, kind: type[pykube.objects.APIObject], namespace: str | None, name: str,
                     status: Mapping[str, Any]) -> bool:
        """Merge-patch the status subresource; False if the object is gone."""
        obj = kind(self.api(), {"metadata": {"name": name, **({"namespace": namespace} if namespace else {})}})
        try:
            obj.patch({"status": dict(status)}, subresource="status")
        except pykube.exceptions.HTTPError as exc:
            if exc.code == 404:
                return False
            raise
        return True

    def post_event(self, involved: Mapping[str, str], *, type_: str, reason: str, message: str,
                   name: str | None = None) -> bool:
        """Create an Event; with `name`, at most once (False when one of that name exists)."""
        stamp = now_rfc3339()
        naming = {"name": name} if name else {"generateName": f"{involved['name']}."}
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {**naming, "namespace": involved.get("namespace") or "default"},
            "involvedObject": dict(involved),
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "gpuroute-operator"},
            "reportingComponent": "gpuroute.io/operator",
            "firstTimestamp": stamp.split(".")[0] + "Z",
            "lastTimestamp": stamp.split(".")[0] + "Z",
            "count": 1,
        }
        try:
            pykube.Event(self.api(), body).create()
        except pykube.exceptions.HTTPError as exc:
            if name and exc.code == 409:
                return False
            raise
        return True

    def read_secret_data(self, namespace: str, name: str) -> dict[str, str]:
        secret = pykube.Secret.objects(self.api(), namespace=namespace).get_by_name(name)
        return dict(secret.obj.get("data") or {})

    def namespace_annotations(self, name: str) -> dict[str, str]:
        namespace = pykube.Namespace.objects(self.api()).get_by_name(name)
        return dict(namespace.annotations)
