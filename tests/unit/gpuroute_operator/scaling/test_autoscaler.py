"""Remote autoscaling: the pure parts (spec parsing, replica arithmetic, Azure AD detection)."""

from __future__ import annotations

import asyncio
import base64
import re
from typing import Any

import pytest
import yaml

from gpuroute_operator.core.scaling_spec import ScalingSpec, parse_scaling
from gpuroute_operator.scaling.autoscaler import (
    AKS_AAD_SCOPE,
    Autoscaler,
    RemoteCluster,
    RemoteClusterError,
    UnsafeKubeconfig,
    azure_ad_user,
    check_kubeconfig,
    desired_replicas,
)

NS = "gpuroute-system"


def _scaling(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "kubeconfigSecretRef": {"name": "gpu-kubeconfig"},
        "deployment": {"name": "gpuroute-worker"},
        "maxReplicas": 8,
    }
    base.update(overrides)
    return base


def _spec(*, lo: int = 0, hi: int = 8, per: int = 4, idle: int = 300) -> ScalingSpec:
    return ScalingSpec(
        kubeconfig_secret=(NS, "k"), kubeconfig_key="kubeconfig", deployment_namespace="w",
        deployment_name="d", min_replicas=lo, max_replicas=hi, target_queue_per_worker=per,
        scale_down_idle_seconds=idle,
    )


# -- parse_scaling --------------------------------------------------------------------


def test_parse_defaults_follow_the_crd() -> None:
    spec = parse_scaling(_scaling(), default_namespace=NS)
    assert spec == ScalingSpec(
        kubeconfig_secret=(NS, "gpu-kubeconfig"), kubeconfig_key="kubeconfig",
        deployment_namespace="gpuroute-workers", deployment_name="gpuroute-worker",
        min_replicas=0, max_replicas=8, target_queue_per_worker=8, scale_down_idle_seconds=300,
    )


def test_parse_explicit_fields() -> None:
    spec = parse_scaling(
        _scaling(
            kubeconfigSecretRef={"name": "k", "namespace": "ops", "key": "config"},
            deployment={"name": "w", "namespace": "gpu"},
            minReplicas=1, maxReplicas=3, targetQueuePerWorker=2, scaleDownIdleSeconds=0,
        ),
        default_namespace=NS,
    )
    assert spec is not None
    assert spec.kubeconfig_secret == ("ops", "k") and spec.kubeconfig_key == "config"
    assert (spec.deployment_namespace, spec.deployment_name) == ("gpu", "w")
    assert (spec.min_replicas, spec.max_replicas, spec.target_queue_per_worker, spec.scale_down_idle_seconds) == (
        1, 3, 2, 0,
    )


def test_parse_none_is_no_scaling() -> None:
    assert parse_scaling(None, default_namespace=NS) is None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"maxReplicas": None}, "spec.scaling.maxReplicas"),
        ({"maxReplicas": 0}, "spec.scaling.maxReplicas"),
        ({"maxReplicas": 10001}, "spec.scaling.maxReplicas"),
        ({"maxReplicas": "3"}, "spec.scaling.maxReplicas"),
        ({"maxReplicas": True}, "spec.scaling.maxReplicas"),
        ({"minReplicas": -1}, "spec.scaling.minReplicas"),
        ({"minReplicas": 9}, "spec.scaling.minReplicas"),
        ({"targetQueuePerWorker": 0}, "spec.scaling.targetQueuePerWorker"),
        ({"scaleDownIdleSeconds": -5}, "spec.scaling.scaleDownIdleSeconds"),
        ({"scaleDownIdleSeconds": 86401}, "spec.scaling.scaleDownIdleSeconds"),
        ({"deployment": None}, "spec.scaling.deployment"),
        ({"deployment": {"namespace": "x"}}, "spec.scaling.deployment.name"),
        ({"deployment": "gpuroute-worker"}, "spec.scaling.deployment"),
        ({"kubeconfigSecretRef": None}, "spec.scaling.kubeconfigSecretRef"),
        ({"kubeconfigSecretRef": {"name": ""}}, "spec.scaling.kubeconfigSecretRef.name"),
        ({"kubeconfigSecretRef": {"name": "k", "key": 3}}, "spec.scaling.kubeconfigSecretRef.key"),
    ],
)
def test_parse_errors_name_the_field(overrides: dict[str, Any], field: str) -> None:
    scaling = _scaling(**overrides)
    if overrides.get("maxReplicas", 1) is None:
        del scaling["maxReplicas"]
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_scaling(scaling, default_namespace=NS)


def test_parse_rejects_non_object() -> None:
    with pytest.raises(ValueError, match=r"spec\.scaling must be an object"):
        parse_scaling(["x"], default_namespace=NS)  # type: ignore[arg-type]


# -- desired_replicas -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec_kw", "queued", "in_flight", "current", "idle_since", "now", "want", "reason_part"),
    [
        # Scale-up is immediate and capped.
        ({}, 37, 0, 1, None, 0.0, 8, "queue 37 / 4 per worker -> 10, capped at max 8"),
        ({}, 20, 0, 1, None, 0.0, 5, "queue 20 / 4 per worker -> 5"),
        ({}, 1, 0, 0, None, 0.0, 1, "-> 1"),
        ({}, 30, 7, 2, None, 0.0, 8, "queue 37 (30 queued + 7 in flight)"),
        ({"hi": 3}, 20, 0, 1, None, 0.0, 3, "capped at max 3"),
        # Raised to the floor.
        ({"lo": 2}, 1, 0, 0, None, 0.0, 2, "raised to min 2"),
        # Scale-down while busy: to the target, never below jobs in flight.
        ({}, 4, 0, 6, None, 0.0, 1, "-> 1"),
        ({}, 0, 3, 6, None, 0.0, 3, "holding 3 for 3 in flight"),
        ({}, 2, 5, 8, None, 0.0, 5, "holding 5 for 5 in flight"),
        ({}, 0, 9, 4, None, 0.0, 4, "-> 3"),  # in-flight floor never exceeds current
        # Idle: hold until scaleDownIdleSeconds, then min (zero).
        ({}, 0, 0, 3, 100.0, 150.0, 3, "idle for 50s < 300s, holding 3"),
        ({}, 0, 0, 3, 100.0, 400.0, 0, "idle for 300s >= 300s -> min 0"),
        ({"lo": 1}, 0, 0, 3, 0.0, 1000.0, 1, "-> min 1"),
        ({"idle": 0}, 0, 0, 3, None, 5.0, 0, "-> min 0"),
        ({}, 0, 0, 3, None, 5.0, 3, "holding 3"),
        # The current count outside the bounds is brought inside even when idle.
        ({"hi": 2}, 0, 0, 5, 0.0, 1.0, 2, "outside [0, 2]"),
        ({"lo": 2}, 0, 0, 0, 0.0, 1.0, 2, "holding 2"),
        # Hard cap beats the in-flight floor.
        ({"hi": 2}, 0, 12, 5, None, 0.0, 2, "capped at max 2"),
        # Steady state.
        ({}, 8, 0, 2, None, 0.0, 2, "-> 2"),
        # Negative inputs (a counting bug upstream) count as zero.
        ({}, -3, 0, 2, None, 0.0, 2, "holding 2"),
    ],
)
def test_desired_replicas(
    spec_kw: dict[str, int], queued: int, in_flight: int, current: int, idle_since: float | None,
    now: float, want: int, reason_part: str,
) -> None:
    got, reason = desired_replicas(
        _spec(**spec_kw), queued=queued, in_flight=in_flight, current=current, idle_since=idle_since, now=now
    )
    assert got == want, reason
    assert reason_part in reason


# -- Azure AD detection ---------------------------------------------------------------


def _kubeconfig(user: dict[str, Any]) -> dict[str, Any]:
    return {
        "clusters": [{"name": "c", "cluster": {"server": "https://aks.example:443"}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "ctx",
    }


def test_azure_ad_user_detects_kubelogin_and_auth_provider() -> None:
    kubelogin = {"exec": {"command": "/usr/local/bin/kubelogin", "args": ["get-token", "--server-id", "x"]}}
    assert azure_ad_user(_kubeconfig(kubelogin))
    assert azure_ad_user(_kubeconfig({"auth-provider": {"name": "azure"}}))
    assert not azure_ad_user(_kubeconfig({"token": "abc"}))
    assert not azure_ad_user(_kubeconfig({"exec": {"command": "aws", "args": ["eks", "get-token"]}}))


def test_remote_cluster_scope_from_kubelogin_server_id() -> None:
    cluster = RemoteCluster(yaml.safe_dump(_kubeconfig(
        {"exec": {"command": "kubelogin", "args": ["get-token", "--server-id", "abc"]}}
    )))
    try:
        assert cluster.azure_ad and cluster.scope == "abc/.default"
    finally:
        cluster.close()
    cluster = RemoteCluster(yaml.safe_dump(_kubeconfig({})), azure_ad=True)
    try:
        assert cluster.scope == AKS_AAD_SCOPE
    finally:
        cluster.close()


# -- the boundary: errors never escape ------------------------------------------------


def test_reconcile_reports_secret_errors_and_rate_limits() -> None:
    calls: list[tuple[str, str]] = []

    def read_secret(namespace: str, name: str) -> dict[str, str]:
        calls.append((namespace, name))
        if name == "missing":
            raise LookupError(f"Secret {namespace}/{name} not found")
        return {"other": base64.b64encode(b"x").decode()}

    scaler = Autoscaler(read_secret, min_interval_s=5.0)
    spec = _spec()
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
    kubeconfig = _kubeconfig({})
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
        decision = asyncio.run(scaler.reconcile("p", _spec(), queued=3, in_flight=0, now=0.0))
        assert decision is not None and not decision.applied and "unreachable" in decision.reason, decision
        remote = scaler.remote("p")
        assert remote is not None and remote.azure_ad and remote.scope == "api://custom-server/.default"
        assert scopes and set(scopes) == {("api://custom-server/.default",)}
    finally:
        scaler.close()


# -- hostile kubeconfigs: nothing runs, nothing is read --------------------------------

_CA = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").decode()


def _hostile(user: dict[str, Any] | None = None, cluster: dict[str, Any] | None = None,
             context: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    config = _kubeconfig(user if user is not None else {"token": "t"})
    config["clusters"][0]["cluster"].update(cluster or {})
    config["contexts"][0]["context"].update(context or {})
    config.update(top)
    return config


HOSTILE = [
    # (case, kubeconfig, entry the message must name)
    ("exec plugin", _hostile({"exec": {"command": "sh", "args": ["-c", "id"], "apiVersion":
                                       "client.authentication.k8s.io/v1beta1"}}), "users[0](u).user.exec"),
    ("exec beside a token", _hostile({"token": "t", "exec": {"command": "sh"}}), "users[0](u).user.exec"),
    ("aws eks exec", _hostile({"exec": {"command": "aws", "args": ["eks", "get-token"]}}), "users[0](u).user.exec"),
    ("gcp auth-provider", _hostile({"auth-provider": {"name": "gcp", "config": {"cmd-path": "/bin/sh"}}}),
     "users[0](u).user.auth-provider"),
    ("oidc auth-provider", _hostile({"auth-provider": {"name": "oidc", "config": {"idp-issuer-url": "x"}}}),
     "users[0](u).user.auth-provider"),
    ("tokenFile", _hostile({"tokenFile": "/var/run/secrets/kubernetes.io/serviceaccount/token"}),
     "users[0](u).user.tokenFile"),
    ("client-certificate path", _hostile({"client-certificate": "/etc/gpuroute/curve/server.key_secret",
                                          "client-key-data": "a2V5"}), "users[0](u).user.client-certificate"),
    ("client-key path", _hostile({"client-certificate-data": "Y2VydA==", "client-key": "/etc/shadow"}),
     "users[0](u).user.client-key"),
    ("certificate-authority path", _hostile(cluster={"certificate-authority": "/etc/passwd"}),
     "clusters[0](c).cluster.certificate-authority"),
    ("basic auth", _hostile({"username": "admin", "password": "pw"}), "users[0](u).user.password"),
    ("unknown user entry", _hostile({"token": "t", "as": "system:admin"}), "users[0](u).user.as"),
    ("exec in a user the context does not use",
     _hostile(users=[{"name": "u", "user": {"token": "t"}}, {"name": "evil", "user": {"exec": {"command": "sh"}}}]),
     "users[1](evil).user.exec"),
    ("exec at the entry level", _hostile(users=[{"name": "u", "user": {"token": "t"}, "exec": {"command": "sh"}}]),
     "users[0](u).exec"),
    ("unknown context entry", _hostile(context={"exec": {"command": "sh"}}), "contexts[0](ctx).context.exec"),
]


@pytest.mark.parametrize(("case", "config", "entry"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_kubeconfig_is_refused_naming_the_entry(case: str, config: dict[str, Any], entry: str) -> None:
    with pytest.raises(UnsafeKubeconfig) as raised:
        check_kubeconfig(config)
    assert raised.value.entry == entry
    assert entry in str(raised.value)
    with pytest.raises(UnsafeKubeconfig, match=re.escape(entry)):
        RemoteCluster(yaml.safe_dump(config)).close()


@pytest.mark.parametrize("shape", [
    {"users": {"u": {"exec": {"command": "sh"}}}},
    {"users": ["exec"]},
    {"users": [{"name": "u", "user": "exec"}]},
    {"contexts": "ctx"},
    {"contexts": [{"name": "ctx", "context": ["user", "u"]}]},
])
def test_malformed_kubeconfig_is_an_error_not_a_crash(shape: dict[str, Any]) -> None:
    config = _hostile(**shape)
    with pytest.raises(RemoteClusterError):
        RemoteCluster(yaml.safe_dump(config)).close()


def test_inline_credentials_are_accepted() -> None:
    accepted = [
        _hostile({"token": "t"}, cluster={"certificate-authority-data": _CA}),
        _hostile({"client-certificate-data": "Y2VydA==", "client-key-data": "a2V5"}),
        _hostile({}, cluster={"insecure-skip-tls-verify": True, "tls-server-name": "gpu", "proxy-url": ""}),
        _hostile(context={"namespace": "ops"}, preferences={}, apiVersion="v1", kind="Config"),
    ]
    for config in accepted:
        check_kubeconfig(config)


def test_azure_ad_mode_drops_the_exec_user_unrun(tmp_path: Any) -> None:
    marker = tmp_path / "ran"
    # Named like kubelogin, so it selects azure-ad mode; it would leave a marker if run.
    script = tmp_path / "kubelogin"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    config = _hostile({"exec": {"command": str(script), "apiVersion": "client.authentication.k8s.io/v1beta1",
                                "args": ["get-token", "--server-id", "srv"]}})
    cluster = RemoteCluster(yaml.safe_dump(config))
    try:
        assert cluster.azure_ad and cluster.scope == "srv/.default"
    finally:
        cluster.close()
    assert not marker.exists()
    # The same exec in a second user is not the Azure AD user: refused, still not run.
    config["users"].append({"name": "other", "user": {"exec": {"command": str(script)}}})
    with pytest.raises(UnsafeKubeconfig, match=r"users\[1\]\(other\)\.user\.exec"):
        RemoteCluster(yaml.safe_dump(config))
    assert not marker.exists()


def _exec_marker_kubeconfig(tmp_path: Any) -> tuple[dict[str, Any], Any]:
    marker = tmp_path / "exec-ran"
    script = tmp_path / "credential-helper"
    # A valid ExecCredential, so the kubernetes client would be satisfied after running it.
    script.write_text(f"#!/bin/sh\ntouch {marker}\n"
                      'echo \'{"apiVersion":"client.authentication.k8s.io/v1beta1","kind":"ExecCredential",'
                      '"status":{"token":"stolen"}}\'\n')
    script.chmod(0o755)
    return _hostile({"exec": {"command": str(script), "apiVersion": "client.authentication.k8s.io/v1beta1"}}), marker


def test_the_exec_kubeconfig_really_runs_without_the_check(tmp_path: Any) -> None:
    # The control for the test below: the kubernetes client itself does run the command.
    from kubernetes import config as kube_config

    config, marker = _exec_marker_kubeconfig(tmp_path)
    kube_config.new_client_from_config_dict(config, persist_config=False).close()
    assert marker.exists()


def test_autoscaler_never_runs_a_hostile_exec(tmp_path: Any) -> None:
    config, marker = _exec_marker_kubeconfig(tmp_path)
    secret = {"kubeconfig": base64.b64encode(yaml.safe_dump(config).encode()).decode()}
    scaler = Autoscaler(lambda namespace, name: secret, min_interval_s=0.0)
    decision = asyncio.run(scaler.reconcile("p", _spec(), queued=3, in_flight=0, now=0.0))
    assert decision is not None and not decision.applied and decision.desired is None
    assert "users[0](u).user.exec is refused" in decision.reason and "runs a command" in decision.reason
    assert "Secret gpuroute-system/k" in decision.reason
    assert not marker.exists()
