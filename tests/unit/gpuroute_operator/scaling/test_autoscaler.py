"""The Autoscaler's boundary: Secret and credential problems come back as reasons, the
rate limit holds, and the Secret's Azure AD keys reach the credential."""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from azure.core.credentials import AccessToken

from gpuroute_operator.core.scaling_spec import ScalingSpec
from gpuroute_operator.scaling.autoscaler import Autoscaler
from tests.unit.gpuroute_operator.scaling.kubeconfigs import NS, exec_marker_kubeconfig, gpu_kubeconfig, scaling_spec


def test_reconcile_reports_secret_errors_and_rate_limits() -> None:
    calls: list[tuple[str, str]] = []

    def read_secret(namespace: str, name: str) -> dict[str, str]:
        calls.append((namespace, name))
        if name == "missing":
            raise LookupError(f"Secret {namespace}/{name} not found")
        return {"other": base64.b64encode(b"x").decode()}

    scaler = Autoscaler(read_secret, min_interval_s=5.0)
    spec = scaling_spec()
    missing = ScalingSpec(**{**spec.__dict__, "kubeconfig_secret": (NS, "missing")})

    async def run() -> None:
        first = await scaler.reconcile("p", missing, queued=3, in_flight=0, now=0.0)
        assert first is not None and not first.applied and "not found" in first.reason
        assert first.current is None and first.desired is None
        # Inside min_interval_s: nothing is read.
        assert await scaler.reconcile("p", missing, queued=3, in_flight=0, now=4.0) is None
        second = await scaler.reconcile("p", spec, queued=3, in_flight=0, now=5.0)
        assert second is not None and not second.applied and "has no key 'kubeconfig'" in second.reason

    asyncio.run(run())
    assert calls == [(NS, "missing"), (NS, "k")]
    scaler.close()


class RecordingCredential:
    """Stands in for azure-identity's DefaultAzureCredential: the Azure AD token service
    cannot run here. Records every scope it is asked for and hands out a dummy token."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **_: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken("operator-token", int(time.time() + 3600))


def _secret(kubeconfig: dict[str, Any], **keys: str) -> dict[str, str]:
    data = {"kubeconfig": yaml.safe_dump(kubeconfig), **keys}
    return {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_azure_ad_scope_from_the_secret_reaches_the_credential_when_the_operator_allows_it() -> None:
    kubeconfig = gpu_kubeconfig({})
    server = f"https://127.0.0.1:{_dead_port()}"
    kubeconfig["clusters"][0]["cluster"]["server"] = server
    data = _secret(kubeconfig, **{"azure-ad": "true", "azure-ad-scope": "api://custom-server/.default\n"})
    credential = RecordingCredential()
    scaler = Autoscaler(lambda ns, name: data, min_interval_s=0.0, credential_factory=lambda: credential,
                        allowed_scopes=frozenset({"api://custom-server/.default"}))
    try:
        decision = asyncio.run(scaler.reconcile("p", scaling_spec(api_server=server), queued=3, in_flight=0, now=0.0))
        assert decision is not None and not decision.applied and "unreachable" in decision.reason, decision
        remote = scaler.remote("p")
        assert remote is not None and remote.azure_ad and remote.scope == "api://custom-server/.default"
        assert credential.scopes and set(credential.scopes) == {("api://custom-server/.default",)}
    finally:
        scaler.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP port that accepts connections, standing in for a listener of the Secret
    writer's choosing: a connection made to it shows in its backlog."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def _connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


# (case, cluster entries, Secret keys besides the kubeconfig, spec.scaling.apiServer (LISTENER: the
# listener's https URL), operator allow-list, what the reason must say)
LISTENER = "https://listener"
REFUSED: list[tuple[str, dict[str, Any], dict[str, str], str | None, frozenset[str], str]] = [
    ("azure-ad-scope names a storage scope", {}, {"azure-ad": "true", "azure-ad-scope": "https://storage.azure.com/.default"},
     LISTENER, frozenset(), "Secret gpuroute-system/k key 'azure-ad-scope' names Azure AD scope "
     "'https://storage.azure.com/.default', which is refused"),
    ("azure-ad-scope not in the allow-list", {}, {"azure-ad": "true", "azure-ad-scope": "api://other/.default"},
     LISTENER, frozenset({"api://custom-server/.default"}), "key 'azure-ad-scope' names Azure AD scope"),
    ("azure-ad without apiServer", {}, {"azure-ad": "true"}, None, frozenset(),
     "Azure AD mode needs spec.scaling.apiServer"),
    ("http server, static token", {"server": "http://127.0.0.1:{port}"}, {}, None, frozenset(),
     "clusters[0](c).cluster.server is refused"),
    ("http server, azure-ad", {"server": "http://127.0.0.1:{port}"}, {"azure-ad": "true"}, LISTENER, frozenset(),
     "clusters[0](c).cluster.server is refused"),
    ("proxy-url", {"proxy-url": "http://127.0.0.1:{port}"}, {}, None, frozenset(),
     "clusters[0](c).cluster.proxy-url is refused"),
    ("proxy-url, azure-ad", {"proxy-url": "http://127.0.0.1:{port}"}, {"azure-ad": "true"}, LISTENER, frozenset(),
     "clusters[0](c).cluster.proxy-url is refused"),
    ("insecure-skip-tls-verify", {"insecure-skip-tls-verify": True}, {"azure-ad": "true"}, LISTENER, frozenset(),
     "clusters[0](c).cluster.insecure-skip-tls-verify is refused"),
    ("server is not the pinned apiServer", {}, {"azure-ad": "true"}, "https://aks.example:443", frozenset(),
     "is not spec.scaling.apiServer 'https://aks.example:443'"),
    ("server is not the pinned apiServer, static token", {}, {}, "https://aks.example:443", frozenset(),
     "is not spec.scaling.apiServer 'https://aks.example:443'"),
]


@pytest.mark.parametrize(("case", "cluster", "keys", "api_server", "allowed", "reason"), REFUSED,
                         ids=[r[0] for r in REFUSED])
def test_refused_secrets_send_nothing_anywhere(
    listener: socket.socket, case: str, cluster: dict[str, Any], keys: dict[str, str], api_server: str | None,
    allowed: frozenset[str], reason: str,
) -> None:
    port = listener.getsockname()[1]
    # The kubeconfig points at the listener (with a static token for the non-Azure cases).
    kubeconfig = gpu_kubeconfig({"token": "static-token"})
    kubeconfig["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{port}"
    kubeconfig["clusters"][0]["cluster"].update({k: v.format(port=port) if isinstance(v, str) else v
                                                 for k, v in cluster.items()})
    credential = RecordingCredential()
    pinned = f"https://127.0.0.1:{port}" if api_server == LISTENER else api_server
    data = _secret(kubeconfig, **keys)
    scaler = Autoscaler(lambda ns, name: data, min_interval_s=0.0, credential_factory=lambda: credential,
                        allowed_scopes=allowed)
    try:
        decision = asyncio.run(scaler.reconcile("p", scaling_spec(api_server=pinned), queued=3, in_flight=0, now=0.0))
    finally:
        scaler.close()
    assert decision is not None and not decision.applied and decision.desired is None, decision
    assert reason in decision.reason, decision.reason
    assert credential.scopes == [], "the operator's Azure AD token was requested"
    assert not _connected(listener), "a connection reached the listener"


def test_autoscaler_never_runs_a_hostile_exec(tmp_path: Any) -> None:
    config, marker = exec_marker_kubeconfig(tmp_path)
    secret = {"kubeconfig": base64.b64encode(yaml.safe_dump(config).encode()).decode()}
    scaler = Autoscaler(lambda namespace, name: secret, min_interval_s=0.0)
    decision = asyncio.run(scaler.reconcile("p", scaling_spec(), queued=3, in_flight=0, now=0.0))
    assert decision is not None and not decision.applied and decision.desired is None
    assert "users[0](u).user.exec is refused" in decision.reason and "runs a command" in decision.reason
    assert "Secret gpuroute-system/k" in decision.reason
    assert not marker.exists()
