"""Kubernetes API access on the event loop: one aiohttp session, kept alive, no threads.

Every per-job request the operator makes (status patches, terminal Events, namespace
grants) goes through here. A blocking client in a thread per call cost a thread hop, a
requests session per thread and a GIL handover for every write; this client reuses
pooled keep-alive connections and never leaves the loop.

pykube-ng stays for what it does well and off the hot path: reading the kubeconfig
(contexts, inline or file certificates, the in-cluster service account), and the rare
blocking reads of Secrets and the GPU clusters' scale subresources (kube.py,
autoscaler.py), which run a few times a minute at most.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pykube

from gpuroute_operator.core.timestamps import now_rfc3339

TOKEN_REREAD_S = 60.0
"""A token file (in-cluster, bound service-account tokens rotate hourly) is re-read this often."""
REQUEST_TIMEOUT_S = 30.0
"""Whole-request limit; a stalled API server must not hold a write slot forever."""
MAX_CONNECTIONS = 16
"""Keep-alive connections to the API server (status writes run at most 8 at once)."""


class KubeAPIError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


TRANSPORT_ERRORS = (KubeAPIError, aiohttp.ClientError, OSError, TimeoutError)
"""What a request may raise when the API server is unreachable or refuses it."""


@dataclass(frozen=True)
class Credentials:
    """Where the API server is and how to prove who we are, from a kubeconfig."""

    server: str
    """Base URL, e.g. https://10.0.0.1:443."""
    ssl_context: ssl.SSLContext | bool
    """TLS verification (CA, client certificate); False only when the kubeconfig says insecure."""
    token: str | None = None
    """Static bearer token, if the kubeconfig has one."""
    token_file: str | None = None
    """Bearer token file (in-cluster), re-read every TOKEN_REREAD_S."""


def credentials(kubeconfig: str | None) -> Credentials:
    """Credentials from `kubeconfig`, or in-cluster / $KUBECONFIG when None (pykube's rules)."""
    config = pykube.KubeConfig.from_file(kubeconfig) if kubeconfig else pykube.KubeConfig.from_env()
    cluster, user = config.cluster, config.user
    ssl_context: ssl.SSLContext | bool
    if cluster.get("insecure-skip-tls-verify"):
        ssl_context = False
    else:
        ca = cluster.get("certificate-authority")
        ssl_context = ssl.create_default_context(cafile=ca.filename() if ca is not None else None)
        if user.get("client-certificate") is not None:
            ssl_context.load_cert_chain(user["client-certificate"].filename(), user["client-key"].filename())
    token_file = None
    if kubeconfig is None and Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists():
        token_file = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    return Credentials(str(cluster["server"]).rstrip("/"), ssl_context, user.get("token"), token_file)


def object_path(kind: str, namespace: str | None, name: str) -> str:
    """API path of an ImageJob, WorkerPool, Namespace or Secret."""
    group = "/apis/gpuroute.io/v1alpha1"
    if kind == "ImageJob":
        return f"{group}/namespaces/{quote(namespace or '')}/imagejobs/{quote(name)}"
    if kind == "WorkerPool":
        return f"{group}/workerpools/{quote(name)}"
    if kind == "Namespace":
        return f"/api/v1/namespaces/{quote(name)}"
    raise ValueError(f"no API path for kind {kind}")


class AsyncKube:
    """The operator's own requests to its API server, on the event loop.

    The session is opened on first use (it must be created inside the running loop)
    and closed by `close`.
    """

    def __init__(self, kubeconfig: str | None = None) -> None:
        self._creds = credentials(kubeconfig)
        self._session: aiohttp.ClientSession | None = None
        self._token = self._creds.token
        self._token_read_at = 0.0
        self.requests = 0
        """Requests sent, for tests and benchmarks."""

    def _headers(self) -> dict[str, str]:
        if self._creds.token_file and time.monotonic() - self._token_read_at > TOKEN_REREAD_S:
            self._token = Path(self._creds.token_file).read_text().strip()
            self._token_read_at = time.monotonic()
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._creds.ssl_context, limit=MAX_CONNECTIONS,
                                             keepalive_timeout=60)
            self._session = aiohttp.ClientSession(
                self._creds.server, connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                json_serialize=json.dumps)
        return self._session

    async def request(self, method: str, path: str, body: Mapping[str, Any] | None = None, *,
                      content_type: str = "application/json") -> tuple[int, Any]:
        """(status, decoded JSON body) for any answer below 500 except 401/403; raises otherwise."""
        headers = {**self._headers(), "Accept": "application/json"}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body, separators=(",", ":"))
        self.requests += 1
        async with self._open().request(method, path, data=data, headers=headers) as response:
            text = await response.text()
            if response.status >= 500 or response.status in (401, 403, 422, 400):
                raise KubeAPIError(response.status, text)
            try:
                decoded = json.loads(text) if text else None
            except ValueError as exc:
                raise KubeAPIError(response.status, f"not JSON: {text[:200]}") from exc
            return response.status, decoded

    @asynccontextmanager
    async def stream(self, path: str, params: Mapping[str, str], *,
                     timeout: aiohttp.ClientTimeout) -> AsyncIterator[aiohttp.ClientResponse]:
        """A GET whose body is read as it arrives (a watch), on the same pooled connections."""
        headers = {**self._headers(), "Accept": "application/json"}
        self.requests += 1
        async with self._open().get(path, params=params, headers=headers, timeout=timeout) as response:
            yield response

    async def patch_status(self, kind: str, namespace: str | None, name: str, status: Mapping[str, Any]) -> bool:
        """Merge-patch the status subresource; False if the object is gone."""
        code, body = await self.request("PATCH", object_path(kind, namespace, name) + "/status", {"status": status},
                                        content_type="application/merge-patch+json")
        if code == 404:
            return False
        if code >= 300:
            raise KubeAPIError(code, json.dumps(body))
        return True

    async def post_event(self, involved: Mapping[str, str], *, type_: str, reason: str, message: str,
                         name: str | None = None) -> bool:
        """Create an Event; with `name`, at most once (False when one of that name exists)."""
        namespace = involved.get("namespace") or "default"
        stamp = now_rfc3339().split(".")[0] + "Z"
        naming = {"name": name} if name else {"generateName": f"{involved['name']}."}
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {**naming, "namespace": namespace},
            "involvedObject": dict(involved), "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": "gpuroute-operator"}, "reportingComponent": "gpuroute.io/operator",
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        code, body = await self.request("POST", f"/api/v1/namespaces/{quote(namespace)}/events", event)
        if code == 409 and name:
            return False
        if code >= 300:
            raise KubeAPIError(code, json.dumps(body))
        return True

    async def namespace_annotations(self, name: str) -> dict[str, str]:
        code, body = await self.request("GET", object_path("Namespace", None, name))
        if code >= 300:
            raise KubeAPIError(code, json.dumps(body))
        return dict((body.get("metadata") or {}).get("annotations") or {})

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            # aiohttp's own advice: let the SSL transports finish closing.
            await asyncio.sleep(0)
