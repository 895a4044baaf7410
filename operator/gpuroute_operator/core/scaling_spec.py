"""A WorkerPool's `spec.scaling`, validated (pure): where the GPU cluster's worker Deployment
is, the bounds the autoscaler keeps it within and, optionally, the API server it may talk to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

DEFAULT_DEPLOYMENT_NAMESPACE = "gpuroute-workers"
"""Namespace of the worker Deployment when spec.scaling.deployment.namespace is unset."""


DEFAULT_KUBECONFIG_KEY = "kubeconfig"
"""Secret data key holding the kubeconfig when kubeconfigSecretRef.key is unset."""


# Bounds from crds/workerpool.yaml spec.scaling, checked again here because the CRD is
# not the only way a spec arrives (tests, an older CRD still installed).
_MAX_REPLICAS_LIMIT = 10000


_MAX_TARGET_QUEUE = 100000


_MAX_IDLE_SECONDS = 86400


@dataclass(frozen=True)
class ScalingSpec:
    """A validated WorkerPool ``spec.scaling``."""

    kubeconfig_secret: tuple[str, str]
    """(namespace, name) of the management-cluster Secret holding the GPU cluster's kubeconfig."""
    kubeconfig_key: str
    """Data key in that Secret holding the kubeconfig."""
    deployment_namespace: str
    """Namespace of the worker Deployment in the GPU cluster."""
    deployment_name: str
    """Name of the worker Deployment in the GPU cluster."""
    min_replicas: int
    """Fewest workers; 0 lets an idle pool scale to zero."""
    max_replicas: int
    """Most workers."""
    target_queue_per_worker: int
    """Jobs (queued plus in flight) one worker is expected to handle."""
    scale_down_idle_seconds: int
    """Seconds without any demand before the pool scales down to min_replicas."""
    api_server: str | None = None
    """The GPU cluster's API server (https URL) the kubeconfig must name, pinned by the pool's
    admin rather than the Secret; required for Azure AD mode. None: not pinned."""


def normalise_api_server(url: str) -> str:
    """``https://host:port[/path]`` with the host lower-cased and the port explicit, so two
    spellings of one API server compare equal. Raises ValueError for anything but an https
    URL with a host and no credentials, query or fragment."""
    if any(ch.isspace() or ord(ch) < 0x20 or ch == "\x7f" for ch in url):
        raise ValueError(f"{url!r} contains whitespace or control characters")
    parts = urlsplit(url)
    if parts.scheme.lower() != "https":
        raise ValueError(f"{url!r} is not an https URL")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise ValueError(f"{url!r} may not carry credentials, a query or a fragment")
    try:
        port = parts.port or 443
    except ValueError as exc:
        raise ValueError(f"{url!r} has an invalid port") from exc
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"https://{host}:{port}{parts.path.rstrip('/')}"


def _int_field(scaling: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int) -> int:
    value = scaling.get(key, default)
    if value is None:
        raise ValueError(f"spec.scaling.{key} is required")
    # bool is an int subclass; a YAML `true` here is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"spec.scaling.{key} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"spec.scaling.{key} must be between {lo} and {hi}, got {value}")
    return value


def _str_field(ref: Mapping[str, Any], path: str, key: str, default: str | None) -> str:
    value = ref.get(key, default)
    if value is None or value == "":
        if default is not None:
            return default
        raise ValueError(f"{path}.{key} is required")
    if not isinstance(value, str):
        raise ValueError(f"{path}.{key} must be a string, got {value!r}")
    return value


def _object_field(scaling: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = scaling.get(key)
    if value is None:
        raise ValueError(f"spec.scaling.{key} is required")
    if not isinstance(value, Mapping):
        raise ValueError(f"spec.scaling.{key} must be an object")
    return value


def _api_server_field(scaling: Mapping[str, Any]) -> str | None:
    value = scaling.get("apiServer")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"spec.scaling.apiServer must be a string, got {value!r}")
    try:
        normalise_api_server(value)
    except ValueError as exc:
        raise ValueError(f"spec.scaling.apiServer must be an https URL of the GPU cluster's API server: {exc}") from exc
    return value


def parse_scaling(spec: Mapping[str, Any] | None, *, default_namespace: str) -> ScalingSpec | None:
    """Validate a WorkerPool ``spec.scaling``; None when the pool has no scaling.

    ``default_namespace`` is the operator's namespace, where the kubeconfig Secret lives
    when its ref names none. Raises ValueError naming the offending field.
    """
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise ValueError("spec.scaling must be an object")
    # The CRD leaves kubeconfigSecretRef optional, but remote scaling cannot work
    # without it: say so on the pool instead of failing at every reconcile.
    ref = _object_field(spec, "kubeconfigSecretRef")
    deployment = _object_field(spec, "deployment")
    ref_path = "spec.scaling.kubeconfigSecretRef"
    dep_path = "spec.scaling.deployment"
    min_replicas = _int_field(spec, "minReplicas", 0, 0, _MAX_REPLICAS_LIMIT)
    max_replicas = _int_field(spec, "maxReplicas", None, 1, _MAX_REPLICAS_LIMIT)
    if min_replicas > max_replicas:
        raise ValueError(
            f"spec.scaling.minReplicas ({min_replicas}) must not exceed spec.scaling.maxReplicas ({max_replicas})"
        )
    return ScalingSpec(
        kubeconfig_secret=(
            _str_field(ref, ref_path, "namespace", default_namespace),
            _str_field(ref, ref_path, "name", None),
        ),
        kubeconfig_key=_str_field(ref, ref_path, "key", DEFAULT_KUBECONFIG_KEY),
        deployment_namespace=_str_field(deployment, dep_path, "namespace", DEFAULT_DEPLOYMENT_NAMESPACE),
        deployment_name=_str_field(deployment, dep_path, "name", None),
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        target_queue_per_worker=_int_field(spec, "targetQueuePerWorker", 8, 1, _MAX_TARGET_QUEUE),
        scale_down_idle_seconds=_int_field(spec, "scaleDownIdleSeconds", 300, 0, _MAX_IDLE_SECONDS),
        api_server=_api_server_field(spec),
    )
