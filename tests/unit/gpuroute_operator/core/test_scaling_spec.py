"""A WorkerPool's spec.scaling: defaults follow the CRD, every error names its field."""

from __future__ import annotations

from typing import Any

import pytest

from gpuroute_operator.core.scaling_spec import ScalingSpec, normalise_api_server, parse_scaling

NS = "gpuroute-system"


def _scaling(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "kubeconfigSecretRef": {"name": "gpu-kubeconfig"},
        "deployment": {"name": "gpuroute-worker"},
        "maxReplicas": 8,
    }
    base.update(overrides)
    return base


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
        ({"apiServer": "http://gpu-aks.example"}, "spec.scaling.apiServer"),
        ({"apiServer": "https://"}, "spec.scaling.apiServer"),
        ({"apiServer": "https://user:pw@gpu-aks.example"}, "spec.scaling.apiServer"),
        ({"apiServer": "https://gpu-aks.example/?x=1"}, "spec.scaling.apiServer"),
        ({"apiServer": "https://gpu-aks.example:99999"}, "spec.scaling.apiServer"),
        ({"apiServer": "https://gpu-aks.example\n"}, "spec.scaling.apiServer"),
        ({"apiServer": 443}, "spec.scaling.apiServer"),
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


def test_parse_api_server() -> None:
    spec = parse_scaling(_scaling(apiServer="https://gpu-aks.example:443"), default_namespace=NS)
    assert spec is not None and spec.api_server == "https://gpu-aks.example:443"
    unpinned = parse_scaling(_scaling(), default_namespace=NS)
    assert unpinned is not None and unpinned.api_server is None


def test_api_server_spellings_compare_equal() -> None:
    assert normalise_api_server("https://GPU-aks.example/") == normalise_api_server("https://gpu-aks.example:443")
    assert normalise_api_server("https://[::1]:6443/k8s/") == "https://[::1]:6443/k8s"
    assert normalise_api_server("https://gpu-aks.example:6443") != normalise_api_server("https://gpu-aks.example")
    assert normalise_api_server("https://a.example") != normalise_api_server("https://b.example")
