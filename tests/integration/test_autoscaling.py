"""Remote autoscaling against two real apiservers: the session control plane is the
management cluster (it holds the kubeconfig Secret), a second one is the GPU cluster
(it holds the worker Deployment the operator scales through its own API).

No controller-manager runs, so no pods appear: what is checked is the Deployment's
spec.replicas as the scale subresource reports it, which is what the autoscaler writes.

The Azure AD service cannot run here, so the Azure AD tests replace azure-identity's
DefaultAzureCredential (and only it) with a credential that hands out AccessTokens whose
token is the GPU apiserver's static bearer token; the kubeconfig in those Secrets carries
no credential of its own, so a request that succeeds proves the token was used. The
same stand-in records the scopes it is asked for, which shows that refused Secrets never
get the operator's token minted.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from azure.core.credentials import AccessToken

from gpuroute_dev.localenv.controlplane import ControlPlane, ControlPlaneConfig
from gpuroute_operator.core.scaling_spec import ScalingSpec, parse_scaling
from gpuroute_operator.kube.client import Kube
from gpuroute_operator.scaling.autoscaler import Autoscaler
from gpuroute_operator.scaling.policy import ScaleDecision
from gpuroute_operator.scaling.remote import AKS_AAD_SCOPE

SECRET_NS = "gpuroute-system"
WORKER_NS = "gpuroute-workers"
DEPLOYMENT = "gpuroute-worker"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _kubeconfig(server: str, ca_pem: str, user: dict[str, Any]) -> str:
    """A self-contained kubeconfig (inline CA), as it would sit in a Secret."""
    return yaml.safe_dump({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "gpu", "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)}}],
        "users": [{"name": "operator", "user": user}],
        "contexts": [{"name": "gpu", "context": {"cluster": "gpu", "user": "operator"}}],
        "current-context": "gpu",
    })


@pytest.fixture(scope="module")
def gpu_cluster(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A second apiserver as the GPU cluster, with the worker Deployment at 1 replica."""
    from kubernetes import client

    cp = ControlPlane(ControlPlaneConfig(
        name="gpu-cluster", crd_dir=None, workdir=tmp_path_factory.mktemp("gpu-cluster"),
        assets=control_plane.config.assets,
    ))
    cp.start()
    try:
        with cp.api_client() as api:
            client.CoreV1Api(api).create_namespace({"metadata": {"name": WORKER_NS}})
            labels = {"app": DEPLOYMENT}
            client.AppsV1Api(api).create_namespaced_deployment(WORKER_NS, {
                "metadata": {"name": DEPLOYMENT},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "worker", "image": "gpuroute-worker:test"}]},
                    },
                },
            })
        yield cp
    finally:
        cp.stop()


def _remote_replicas(gpu: ControlPlane) -> int:
    from kubernetes import client

    with gpu.api_client() as api:
        # spec.replicas 0 is omitted from the JSON, so it reads as None.
        return int(client.AppsV1Api(api).read_namespaced_deployment_scale(DEPLOYMENT, WORKER_NS).spec.replicas or 0)


def _set_remote_replicas(gpu: ControlPlane, replicas: int) -> None:
    from kubernetes import client

    with gpu.api_client() as api:
        client.AppsV1Api(api).patch_namespaced_deployment_scale(DEPLOYMENT, WORKER_NS, {"spec": {"replicas": replicas}})


@pytest.fixture(scope="module")
def mgmt(control_plane: ControlPlane) -> Iterator[Any]:
    """CoreV1Api on the management cluster, with the operator's namespace present."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    with control_plane.api_client() as api:
        core = client.CoreV1Api(api)
        try:
            core.create_namespace({"metadata": {"name": SECRET_NS}})
        except ApiException as exc:
            if exc.status != 409:  # created by another module of the session
                raise
        yield core


def _put_secret(core: Any, name: str, data: dict[str, str]) -> None:
    """Create or replace a Secret in the management cluster (values plain text here)."""
    from kubernetes.client.exceptions import ApiException

    body = {"metadata": {"name": name}, "data": {k: _b64(v) for k, v in data.items()}}
    try:
        core.create_namespaced_secret(SECRET_NS, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        core.replace_namespaced_secret(name, SECRET_NS, body)


def _scaling(secret: str, **overrides: Any) -> ScalingSpec:
    raw: dict[str, Any] = {
        "kubeconfigSecretRef": {"name": secret},
        "deployment": {"name": DEPLOYMENT},
        "maxReplicas": 3,
        "targetQueuePerWorker": 4,
        "scaleDownIdleSeconds": 30,
    }
    raw.update(overrides)
    spec = parse_scaling(raw, default_namespace=SECRET_NS)
    assert spec is not None
    return spec


def _reconcile(scaler: Autoscaler, pool: str, spec: ScalingSpec, *, queued: int, in_flight: int = 0,
               now: float) -> ScaleDecision | None:
    return asyncio.run(scaler.reconcile(pool, spec, queued=queued, in_flight=in_flight, now=now))


def _ca(gpu: ControlPlane) -> str:
    return Path(gpu.ca_file).read_text()


def test_scale_up_hold_then_to_zero(gpu_cluster: ControlPlane, control_plane: ControlPlane, mgmt: Any) -> None:
    # The GPU cluster's own kubeconfig file, as `az aks get-credentials` would give it,
    # made self-contained so it works from any machine.
    config = yaml.safe_load(Path(gpu_cluster.kubeconfig).read_text())
    cluster = config["clusters"][0]["cluster"]
    cluster["certificate-authority-data"] = _b64(Path(cluster.pop("certificate-authority")).read_text())
    _put_secret(mgmt, "gpu-kubeconfig", {"kubeconfig": yaml.safe_dump(config)})
    _set_remote_replicas(gpu_cluster, 1)
    kube = Kube(control_plane.kubeconfig)
    scaler = Autoscaler(kube.read_secret_data, min_interval_s=0.0)
    spec = _scaling("gpu-kubeconfig")
    try:
        up = _reconcile(scaler, "aks-a100", spec, queued=20, now=1000.0)
        assert up == ScaleDecision("aks-a100", 1, 3, "queue 20 / 4 per worker -> 5, capped at max 3", applied=True)
        assert _remote_replicas(gpu_cluster) == 3

        # Busy but no change: nothing patched.
        same = _reconcile(scaler, "aks-a100", spec, queued=9, in_flight=3, now=1005.0)
        assert same is not None and not same.applied and same.current == same.desired == 3

        # Demand gone: held until scaleDownIdleSeconds (30 s) have passed ...
        _reconcile(scaler, "aks-a100", spec, queued=0, now=1010.0)
        held = _reconcile(scaler, "aks-a100", spec, queued=0, now=1039.0)
        assert held is not None and not held.applied and held.desired == 3 and "holding 3" in held.reason
        assert _remote_replicas(gpu_cluster) == 3
        # ... then down to minReplicas, zero.
        down = _reconcile(scaler, "aks-a100", spec, queued=0, now=1040.0)
        assert down is not None and down.applied and (down.current, down.desired) == (3, 0), down
        assert "-> min 0" in down.reason
        assert _remote_replicas(gpu_cluster) == 0

        # New work wakes the pool at once.
        wake = _reconcile(scaler, "aks-a100", spec, queued=1, now=1041.0)
        assert wake is not None and wake.applied and wake.desired == 1
        assert _remote_replicas(gpu_cluster) == 1
    finally:
        scaler.close()


def test_rate_limit_and_client_cache(gpu_cluster: ControlPlane, control_plane: ControlPlane, mgmt: Any) -> None:
    _put_secret(mgmt, "gpu-token", {"kubeconfig": _kubeconfig(gpu_cluster.server, _ca(gpu_cluster),
                                                               {"token": gpu_cluster.token})})
    _set_remote_replicas(gpu_cluster, 1)
    scaler = Autoscaler(Kube(control_plane.kubeconfig).read_secret_data, min_interval_s=5.0)
    spec = _scaling("gpu-token")
    try:
        first = _reconcile(scaler, "p", spec, queued=8, now=0.0)
        assert first is not None and first.applied and first.desired == 2
        client = scaler.remote("p")
        # Within min_interval_s nothing is read or written, however large the queue.
        assert _reconcile(scaler, "p", spec, queued=100, now=4.9) is None
        assert _remote_replicas(gpu_cluster) == 2
        again = _reconcile(scaler, "p", spec, queued=100, now=5.0)
        assert again is not None and again.applied and again.desired == 3
        # Same Secret content: the client is reused.
        assert scaler.remote("p") is client
    finally:
        scaler.close()


def test_bad_kubeconfig_and_unreachable_api_are_reported(
    gpu_cluster: ControlPlane, control_plane: ControlPlane, mgmt: Any
) -> None:
    _set_remote_replicas(gpu_cluster, 1)
    scaler = Autoscaler(Kube(control_plane.kubeconfig).read_secret_data, min_interval_s=0.0)
    spec = _scaling("gpu-changing")
    try:
        _put_secret(mgmt, "gpu-changing", {"kubeconfig": "clusters: [not a kubeconfig"})
        bad = _reconcile(scaler, "p", spec, queued=20, now=0.0)
        assert bad is not None and not bad.applied and bad.current is None
        assert "Secret gpuroute-system/gpu-changing key 'kubeconfig'" in bad.reason and "YAML" in bad.reason

        _put_secret(mgmt, "gpu-changing", {"kubeconfig": yaml.safe_dump({"apiVersion": "v1", "kind": "Config"})})
        empty = _reconcile(scaler, "p", spec, queued=20, now=1.0)
        assert empty is not None and not empty.applied and "kubeconfig cannot be used" in empty.reason

        # A port nothing listens on: the API is down.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            dead_port = sock.getsockname()[1]
        _put_secret(mgmt, "gpu-changing", {"kubeconfig": _kubeconfig(
            f"https://127.0.0.1:{dead_port}", _ca(gpu_cluster), {"token": gpu_cluster.token})})
        started = time.monotonic()
        down = _reconcile(scaler, "p", spec, queued=20, now=2.0)
        assert down is not None and not down.applied and "unreachable" in down.reason, down
        assert time.monotonic() - started < 20

        # A wrong token: the apiserver's 401 comes back as the reason.
        _put_secret(mgmt, "gpu-changing", {"kubeconfig": _kubeconfig(
            gpu_cluster.server, _ca(gpu_cluster), {"token": "not-the-token"})})
        refused = _reconcile(scaler, "p", spec, queued=20, now=3.0)
        assert refused is not None and not refused.applied and "401" in refused.reason, refused

        missing = _reconcile(scaler, "p", _scaling("no-such-secret"), queued=20, now=4.0)
        assert missing is not None and not missing.applied and "no-such-secret" in missing.reason

        # Fixing the Secret is picked up without a restart.
        _put_secret(mgmt, "gpu-changing", {"kubeconfig": _kubeconfig(
            gpu_cluster.server, _ca(gpu_cluster), {"token": gpu_cluster.token})})
        fixed = _reconcile(scaler, "p", spec, queued=20, now=5.0)
        assert fixed is not None and fixed.applied and fixed.desired == 3
        assert _remote_replicas(gpu_cluster) == 3
    finally:
        scaler.close()


def test_hostile_kubeconfigs_never_run_or_read(
    gpu_cluster: ControlPlane, control_plane: ControlPlane, mgmt: Any, tmp_path: Path
) -> None:
    # Each would authenticate as the GPU cluster's admin if honoured (the exec plugin
    # prints the real token, the token file holds it), so a scale that lands or a marker
    # file on disk means the operator ran or read it.
    marker = tmp_path / "exec-ran"
    helper = tmp_path / "helper"
    helper.write_text(f"#!/bin/sh\ntouch {marker}\n"
                      'echo \'{"apiVersion":"client.authentication.k8s.io/v1beta1","kind":"ExecCredential",'
                      f'"status":{{"token":"{gpu_cluster.token}"}}}}\'\n')
    helper.chmod(0o755)
    token_file = tmp_path / "token"
    token_file.write_text(gpu_cluster.token)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(_ca(gpu_cluster))
    exec_user = {"exec": {"command": str(helper), "apiVersion": "client.authentication.k8s.io/v1beta1"}}
    hostile: dict[str, tuple[str, str]] = {
        "exec": (_kubeconfig(gpu_cluster.server, _ca(gpu_cluster), exec_user), "users[0](operator).user.exec"),
        "auth-provider": (_kubeconfig(gpu_cluster.server, _ca(gpu_cluster),
                                      {"auth-provider": {"name": "gcp", "config": {"cmd-path": str(helper)}}}),
                          "users[0](operator).user.auth-provider"),
        "tokenFile": (_kubeconfig(gpu_cluster.server, _ca(gpu_cluster), {"tokenFile": str(token_file)}),
                      "users[0](operator).user.tokenFile"),
    }
    ca_path = yaml.safe_load(_kubeconfig(gpu_cluster.server, "", {"token": gpu_cluster.token}))
    ca_path["clusters"][0]["cluster"] = {"server": gpu_cluster.server, "certificate-authority": str(ca_file)}
    hostile["certificate-authority"] = (yaml.safe_dump(ca_path), "clusters[0](gpu).cluster.certificate-authority")
    _set_remote_replicas(gpu_cluster, 1)
    scaler = Autoscaler(Kube(control_plane.kubeconfig).read_secret_data, min_interval_s=0.0)
    try:
        for number, (case, (kubeconfig, entry)) in enumerate(hostile.items()):
            _put_secret(mgmt, "gpu-hostile", {"kubeconfig": kubeconfig})
            decision = _reconcile(scaler, "hostile", _scaling("gpu-hostile"), queued=20, now=float(number))
            assert decision is not None and not decision.applied and decision.desired is None, case
            assert f"{entry} is refused" in decision.reason, (case, decision.reason)
            assert not marker.exists(), case
            assert _remote_replicas(gpu_cluster) == 1, case
    finally:
        scaler.close()


class FakeAzureCredential:
    """Stands in for DefaultAzureCredential: the Azure AD token service cannot run here.

    Hands out the queued (token, seconds-to-expiry) pairs in order, the last one forever.
    """

    def __init__(self, tokens: list[tuple[str, float]]) -> None:
        self.tokens = list(tokens)
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **_: Any) -> AccessToken:
        self.scopes.append(scopes)
        token, lifetime = self.tokens.pop(0) if len(self.tokens) > 1 else self.tokens[0]
        return AccessToken(token, int(time.time() + lifetime))


def test_azure_ad_token_used_and_refreshed_near_expiry(
    gpu_cluster: ControlPlane, control_plane: ControlPlane, mgmt: Any
) -> None:
    # The kubeconfig has no credential at all: only the Azure AD token can authenticate.
    _put_secret(mgmt, "gpu-aad", {"kubeconfig": _kubeconfig(gpu_cluster.server, _ca(gpu_cluster), {}),
                                  "azure-ad": "true"})
    _set_remote_replicas(gpu_cluster, 1)
    # First token expires within the refresh margin (5 min), the second lives an hour.
    credential = FakeAzureCredential([(gpu_cluster.token, 120), (gpu_cluster.token, 3600)])
    factory_calls: list[int] = []

    def factory() -> FakeAzureCredential:
        factory_calls.append(1)
        return credential

    scaler = Autoscaler(Kube(control_plane.kubeconfig).read_secret_data, min_interval_s=0.0,
                        credential_factory=factory)
    spec = _scaling("gpu-aad", apiServer=gpu_cluster.server)
    try:
        up = _reconcile(scaler, "aks", spec, queued=8, now=0.0)
        assert up is not None and up.applied and up.desired == 2, up
        assert _remote_replicas(gpu_cluster) == 2
        remote = scaler.remote("aks")
        assert remote is not None and remote.azure_ad
        # Fetched once for the read, and again before the patch: the first token was
        # within 5 minutes of expiry. The second lasts, so later requests reuse it.
        assert remote.token_fetches == 2
        assert credential.scopes == [(AKS_AAD_SCOPE,), (AKS_AAD_SCOPE,)]
        again = _reconcile(scaler, "aks", spec, queued=12, now=1.0)
        assert again is not None and again.applied and again.desired == 3
        assert remote.token_fetches == 2 and len(factory_calls) == 1
    finally:
        scaler.close()


def test_azure_ad_bad_token_reported_then_refetched(
    gpu_cluster: ControlPlane, control_plane: ControlPlane, mgmt: Any
) -> None:
    # The kubeconfig `az aks get-credentials` writes for an Azure AD cluster (kubelogin
    # exec plugin) switches Azure AD mode on by itself; kubelogin is never run.
    kubelogin = {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1beta1", "command": "kubelogin",
        "args": ["get-token", "--login", "workloadidentity", "--server-id", "6dae42f8-4368-4678-94ff-3960e28e3630"],
    }}
    _put_secret(mgmt, "gpu-kubelogin", {"kubeconfig": _kubeconfig(gpu_cluster.server, _ca(gpu_cluster), kubelogin)})
    _set_remote_replicas(gpu_cluster, 1)
    credential = FakeAzureCredential([("revoked-token", 3600), (gpu_cluster.token, 3600)])
    scaler = Autoscaler(Kube(control_plane.kubeconfig).read_secret_data, min_interval_s=0.0,
                        credential_factory=lambda: credential)
    spec = _scaling("gpu-kubelogin", apiServer=gpu_cluster.server)
    try:
        refused = _reconcile(scaler, "aks", spec, queued=8, now=0.0)
        assert refused is not None and not refused.applied and "401" in refused.reason, refused
        # The 401 dropped the cached token although it had an hour left.
        ok = _reconcile(scaler, "aks", spec, queued=8, now=1.0)
        assert ok is not None and ok.applied and ok.desired == 2, ok
        remote = scaler.remote("aks")
        assert remote is not None and remote.token_fetches == 2
        assert _remote_replicas(gpu_cluster) == 2

        # azure-identity failing (no workload identity in the pod) is a reason, not a crash.
        def broken() -> Any:
            raise RuntimeError("DefaultAzureCredential failed to retrieve a token")

        failing = Autoscaler(Kube(control_plane.kubeconfig).read_secret_data, min_interval_s=0.0,
                             credential_factory=broken)
        try:
            failed = _reconcile(failing, "aks", spec, queued=20, now=0.0)
            assert failed is not None and not failed.applied
            assert "Azure AD token" in failed.reason and "DefaultAzureCredential" in failed.reason, failed
        finally:
            failing.close()
    finally:
        scaler.close()


def test_azure_ad_token_goes_only_to_the_pinned_server_for_the_aks_scope(
    gpu_cluster: ControlPlane, control_plane: ControlPlane, mgmt: Any
) -> None:
    # Each Secret would have the operator mint its own Azure AD token and send it somewhere
    # the Secret's writer chose; none may get as far as asking for the token.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        elsewhere = f"https://127.0.0.1:{listener.getsockname()[1]}"
        ca = _ca(gpu_cluster)
        hostile: dict[str, tuple[dict[str, str], str | None, str]] = {
            "storage scope": ({"kubeconfig": _kubeconfig(gpu_cluster.server, ca, {}), "azure-ad": "true",
                               "azure-ad-scope": "https://storage.azure.com/.default"},
                              gpu_cluster.server, "key 'azure-ad-scope' names Azure AD scope"),
            "kubelogin --server-id of Key Vault": (
                {"kubeconfig": _kubeconfig(gpu_cluster.server, ca, {"exec": {
                    "apiVersion": "client.authentication.k8s.io/v1beta1", "command": "kubelogin",
                    "args": ["get-token", "--server-id", "https://vault.azure.net"]}})},
                gpu_cluster.server, "--server-id"),
            "server not the pinned one": ({"kubeconfig": _kubeconfig(elsewhere, ca, {}), "azure-ad": "true"},
                                          gpu_cluster.server, "is not spec.scaling.apiServer"),
            "no apiServer": ({"kubeconfig": _kubeconfig(elsewhere, ca, {}), "azure-ad": "true"}, None,
                             "Azure AD mode needs spec.scaling.apiServer"),
        }
        _set_remote_replicas(gpu_cluster, 1)
        credential = FakeAzureCredential([(gpu_cluster.token, 3600)])
        scaler = Autoscaler(Kube(control_plane.kubeconfig).read_secret_data, min_interval_s=0.0,
                            credential_factory=lambda: credential)
        try:
            for number, (case, (data, api_server, reason)) in enumerate(hostile.items()):
                _put_secret(mgmt, "gpu-aad-hostile", data)
                pin = {"apiServer": api_server} if api_server else {}
                decision = _reconcile(scaler, "aad-hostile", _scaling("gpu-aad-hostile", **pin), queued=20,
                                      now=float(number))
                assert decision is not None and not decision.applied and decision.desired is None, case
                assert reason in decision.reason, (case, decision.reason)
                assert credential.scopes == [], case
                with pytest.raises(BlockingIOError):
                    listener.accept()
            assert _remote_replicas(gpu_cluster) == 1
        finally:
            scaler.close()
