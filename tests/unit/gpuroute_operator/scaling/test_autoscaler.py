"""The Autoscaler's boundary: Secret and credential problems come back as reasons, the
rate limit holds, and the Secret's Azure AD keys reach the credential."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import yaml

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


def test_azure_ad_scope_override_from_the_secret() -> None:
    """The Secret's ``azure-ad-scope`` key reaches the credential; the Azure AD service
    cannot run here, so a stand-in credential records the scope it is asked for."""
    import socket
    import time

    from azure.core.credentials import AccessToken

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    kubeconfig = gpu_kubeconfig({})
    kubeconfig["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{dead_port}"
    data = {
        "kubeconfig": base64.b64encode(yaml.safe_dump(kubeconfig).encode()).decode(),
        "azure-ad": base64.b64encode(b"true").decode(),
        "azure-ad-scope": base64.b64encode(b"api://custom-server/.default\n").decode(),
    }
    scopes: list[tuple[str, ...]] = []

    class Credential:
        def get_token(self, *wanted: str, **_: Any) -> AccessToken:
            scopes.append(wanted)
            return AccessToken("t", int(time.time() + 3600))

    scaler = Autoscaler(lambda ns, name: data, min_interval_s=0.0, credential_factory=Credential)
    try:
        decision = asyncio.run(scaler.reconcile("p", scaling_spec(), queued=3, in_flight=0, now=0.0))
        assert decision is not None and not decision.applied and "unreachable" in decision.reason, decision
        remote = scaler.remote("p")
        assert remote is not None and remote.azure_ad and remote.scope == "api://custom-server/.default"
        assert scopes and set(scopes) == {("api://custom-server/.default",)}
    finally:
        scaler.close()


def test_autoscaler_never_runs_a_hostile_exec(tmp_path: Any) -> None:
    config, marker = exec_marker_kubeconfig(tmp_path)
    secret = {"kubeconfig": base64.b64encode(yaml.safe_dump(config).encode()).decode()}
    scaler = Autoscaler(lambda namespace, name: secret, min_interval_s=0.0)
    decision = asyncio.run(scaler.reconcile("p", scaling_spec(), queued=3, in_flight=0, now=0.0))
    assert decision is not None and not decision.applied and decision.desired is None
    assert "users[0](u).user.exec is refused" in decision.reason and "runs a command" in decision.reason
    assert "Secret gpuroute-system/k" in decision.reason
    assert not marker.exists()
