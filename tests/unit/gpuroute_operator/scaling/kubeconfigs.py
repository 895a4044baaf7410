"""Kubeconfigs and scaling specs the scaling unit tests share."""

from __future__ import annotations

import base64
from typing import Any

from gpuroute_operator.core.scaling_spec import ScalingSpec

NS = "gpuroute-system"
SERVER = "https://aks.example:443"
"""The API server every kubeconfig here names."""

CA = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").decode()


def scaling_spec(*, lo: int = 0, hi: int = 8, per: int = 4, idle: int = 300,
                 api_server: str | None = None) -> ScalingSpec:
    return ScalingSpec(
        kubeconfig_secret=(NS, "k"), kubeconfig_key="kubeconfig", deployment_namespace="w",
        deployment_name="d", min_replicas=lo, max_replicas=hi, target_queue_per_worker=per,
        scale_down_idle_seconds=idle, api_server=api_server,
    )


def gpu_kubeconfig(user: dict[str, Any]) -> dict[str, Any]:
    return {
        "clusters": [{"name": "c", "cluster": {"server": SERVER}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "ctx",
    }


def hostile(user: dict[str, Any] | None = None, cluster: dict[str, Any] | None = None,
            context: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    config = gpu_kubeconfig(user if user is not None else {"token": "t"})
    config["clusters"][0]["cluster"].update(cluster or {})
    config["contexts"][0]["context"].update(context or {})
    config.update(top)
    return config


def exec_marker_kubeconfig(tmp_path: Any) -> tuple[dict[str, Any], Any]:
    marker = tmp_path / "exec-ran"
    script = tmp_path / "credential-helper"
    # A valid ExecCredential, so the kubernetes client would be satisfied after running it.
    script.write_text(f"#!/bin/sh\ntouch {marker}\n"
                      'echo \'{"apiVersion":"client.authentication.k8s.io/v1beta1","kind":"ExecCredential",'
                      '"status":{"token":"stolen"}}\'\n')
    script.chmod(0o755)
    return hostile({"exec": {"command": str(script), "apiVersion": "client.authentication.k8s.io/v1beta1"}}), marker
