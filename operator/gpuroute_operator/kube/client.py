"""Blocking Kubernetes reads through pykube-ng, always called from worker threads: the rare
Secret and Namespace reads (a few a minute). Status patches, Events and the ImageJob watch go
through kube.api.AsyncKube on the event loop."""

from __future__ import annotations

import threading

import pykube


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

    def read_secret_data(self, namespace: str, name: str) -> dict[str, str]:
        secret = pykube.Secret.objects(self.api(), namespace=namespace).get_by_name(name)
        return dict(secret.obj.get("data") or {})

    def namespace_annotations(self, name: str) -> dict[str, str]:
        namespace = pykube.Namespace.objects(self.api()).get_by_name(name)
        return dict(namespace.annotations)
