"""Every kustomize overlay under manifests/ renders and is accepted by a real apiserver.

Each overlay is rendered with `kubectl kustomize` and every object is applied with
server-side apply and `dryRun=All` to the local kube-apiserver 1.20 (the
`control_plane` fixture, which has already installed crds/). Kinds whose CRDs that
apiserver lacks (ServiceMonitor, Argo CD Application) are only checked to parse.
The operator's RBAC is also created for real (under test-only names) and probed with
SubjectAccessReviews, so least privilege is tested and not only stated.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from gpuroute.ops_catalog import CATALOG, MAX_STEPS, normalize_step

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
FIELD_MANAGER = "gpuroute-manifest-test"
OPERATOR_SA = "system:serviceaccount:gpuroute-system:gpuroute-operator"

# Every overlay that must render, relative to manifests/.
OVERLAYS = [
    "management/base",
    "management/overlays/eks",
    "management/overlays/monitoring",
    "gpu/base",
    "gpu/overlays/aks",
    "gpu/overlays/monitoring",
    "argocd",
]
# API groups whose CRDs the test apiserver does not have: parse-only.
PARSE_ONLY_GROUPS = {"monitoring.coreos.com", "argoproj.io"}

KUBECTL = shutil.which("kubectl")


@pytest.fixture
def kubectl() -> str:
    """kubectl is part of the test environment (it renders the kustomize overlays): its
    absence is a broken environment, so these tests fail rather than pass as skipped."""
    if KUBECTL is None:
        pytest.fail("kubectl is not on PATH (expected /usr/bin/kubectl): cannot render the kustomize overlays")
    return KUBECTL


needs_kubectl = pytest.mark.usefixtures("kubectl")


def _render(overlay: str) -> list[dict[str, Any]]:
    assert KUBECTL is not None, "kubectl is not on PATH (expected /usr/bin/kubectl)"
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(MANIFESTS / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize {overlay} failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d is not None]
    assert docs, f"{overlay} rendered nothing"
    return docs


_rendered: dict[str, list[dict[str, Any]]] = {}


def rendered(overlay: str) -> list[dict[str, Any]]:
    if overlay not in _rendered:
        _rendered[overlay] = _render(overlay)
    return _rendered[overlay]


def _group(obj: dict[str, Any]) -> str:
    api_version = obj["apiVersion"]
    return api_version.split("/")[0] if "/" in api_version else ""


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in {[(d['kind'], d['metadata']['name']) for d in docs]}")


@pytest.fixture(scope="module")
def dyn(control_plane: Any) -> Iterator[Any]:
    from kubernetes.dynamic import DynamicClient

    api = control_plane.api_client()
    try:
        yield DynamicClient(api)
    finally:
        api.close()


def _ensure_namespace(dyn: Any, name: str) -> None:
    """Create a namespace for real, once. Never deleted: without kube-controller-manager
    a deleted namespace stays Terminating and would break later tests that use it."""
    from kubernetes.dynamic.exceptions import ConflictError

    namespaces = dyn.resources.get(api_version="v1", kind="Namespace")
    try:
        namespaces.create(body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    except ConflictError:
        pass


# Versions the target clusters serve but the local 1.20 apiserver predates, mapped to
# the older version with the same schema for what the manifests use: validated as that.
# (policy/v1 PodDisruptionBudget is 1.21+; clusters from 1.25 on serve only policy/v1.)
OLDER_VERSION_ON_TEST_APISERVER = {("policy/v1", "PodDisruptionBudget"): "policy/v1beta1"}


def _dry_run_apply(dyn: Any, obj: dict[str, Any]) -> dict[str, Any]:
    from kubernetes.dynamic.exceptions import DynamicApiError, ResourceNotFoundError

    try:
        resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    except ResourceNotFoundError:
        older = OLDER_VERSION_ON_TEST_APISERVER.get((obj["apiVersion"], obj["kind"]))
        if older is None:
            raise
        obj = {**obj, "apiVersion": older}
        resource = dyn.resources.get(api_version=older, kind=obj["kind"])
    try:
        result = resource.server_side_apply(
            body=obj,
            namespace=obj["metadata"].get("namespace") if resource.namespaced else None,
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
            dry_run="All",
        )
    except DynamicApiError as exc:
        raise AssertionError(
            f"apiserver rejected {obj['kind']}/{obj['metadata']['name']}: {exc.status} {exc.body}"
        ) from None
    return result.to_dict()


def _check_parse_only(obj: dict[str, Any]) -> None:
    assert obj["metadata"].get("name"), obj
    if obj["kind"] == "ServiceMonitor":
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert obj["spec"]["selector"]["matchLabels"]
        assert obj["spec"]["endpoints"] and all(e.get("port") for e in obj["spec"]["endpoints"])
    elif obj["kind"] == "PodMonitor":
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert obj["spec"]["selector"]["matchLabels"]
        assert obj["spec"]["podMetricsEndpoints"] and all(e.get("port") for e in obj["spec"]["podMetricsEndpoints"])
    elif obj["kind"] == "PrometheusRule":
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        rules = [r for group in obj["spec"]["groups"] for r in group["rules"]]
        assert rules and all(r.get("alert") and r.get("expr") for r in rules)
    elif obj["kind"] == "Application":
        assert obj["apiVersion"] == "argoproj.io/v1alpha1"
        source = obj["spec"]["source"]
        path = source["path"]
        assert path in {f"manifests/{o}" for o in OVERLAYS}, f"Application points at {path}"
        assert obj["spec"]["destination"]["server"]
        assert obj["spec"]["destination"]["namespace"]
    else:
        raise AssertionError(f"unexpected parse-only kind {obj['kind']}")


# ----------------------------------------------------------------------------- render + dry-run


def test_every_overlay_is_listed() -> None:
    found = {
        str(p.parent.relative_to(MANIFESTS))
        for p in MANIFESTS.rglob("kustomization.yaml")
        if yaml.safe_load(p.read_text()).get("kind", "Kustomization") == "Kustomization"
    }
    assert found == set(OVERLAYS)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_applies_with_server_dry_run(overlay: str, dyn: Any) -> None:
    docs = rendered(overlay)
    for obj in docs:
        assert obj.get("apiVersion") and obj.get("kind") and obj.get("metadata", {}).get("name"), obj
    # Namespaced objects need their namespace to exist: create those for real first.
    namespaces = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    namespaces |= {
        d["metadata"]["namespace"]
        for d in docs
        if d["metadata"].get("namespace") and _group(d) not in PARSE_ONLY_GROUPS
    }
    for ns in sorted(namespaces):
        _ensure_namespace(dyn, ns)
    applied = 0
    for obj in docs:
        if _group(obj) in PARSE_ONLY_GROUPS:
            _check_parse_only(obj)
            continue
        result = _dry_run_apply(dyn, obj)
        assert result["kind"] == obj["kind"]
        assert result["metadata"]["name"] == obj["metadata"]["name"]
        applied += 1
    if overlay != "argocd":
        assert applied, f"{overlay}: nothing was applied"


# ----------------------------------------------------------------------------- what the overlays say


@needs_kubectl
def test_management_base_contents() -> None:
    docs = rendered("management/base")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("CustomResourceDefinition", "imagejobs.gpuroute.io") in kinds
    assert ("CustomResourceDefinition", "workerpools.gpuroute.io") in kinds
    assert ("Namespace", "gpuroute-system") in kinds
    assert not any(d["kind"] == "ServiceMonitor" for d in docs), "the base must not need the Prometheus CRDs"
    deploy = _find(docs, "Deployment", "gpuroute-operator")
    assert deploy["metadata"]["namespace"] == "gpuroute-system"
    # Two replicas, leader election: a new pod joins as follower before an old one stops.
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deploy["spec"]["template"]["spec"]
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert {t["podAffinityTerm"]["topologyKey"] for t in anti} >= {"kubernetes.io/hostname"}
    assert all(t["podAffinityTerm"]["labelSelector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
               for t in anti)
    assert pod["serviceAccountName"] == "gpuroute-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["command"] == [
        "gpuroute", "operator",
        "--server-key-file", "/etc/gpuroute/server/server.key_secret",
        "--bind", "tcp://0.0.0.0:7700",
        "--identity", "$(POD_NAME)",
    ]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in container["env"]}
    assert env["GPUROUTE_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # The Lease identity and the pod the leader labels, from the downward API.
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"zmq": 7700, "health": 8080, "metrics": 9090, "web": 9091}
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["port"] in ("health", 8080)
    assert container["resources"]["requests"] and container["resources"]["limits"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["server-curve"]["secret"]["secretName"] == "gpuroute-operator-curve"
    assert mounts["server-curve"] == "/etc/gpuroute/server"
    svc = _find(docs, "Service", "gpuroute-operator")
    assert svc["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in svc["spec"]["ports"]] == [7700]
    metrics = _find(docs, "Service", "gpuroute-operator-metrics")
    assert [p["port"] for p in metrics["spec"]["ports"]] == [9090, 9091]
    # Only the leader serves the socket and the engine's metrics: both Services have no
    # selector, and the leader writes its pod IP into their Endpoints (kube.leader.LeaderService),
    # with the ports the CLI's defaults give (gpuroute.cli: --socket-service, --web-service).
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for service in (svc, metrics):
        assert "selector" not in service["spec"]
        assert _find(docs, "Endpoints", service["metadata"]["name"])["subsets"] == []
        assert all(container_ports[p["targetPort"]] == p["port"] for p in service["spec"]["ports"])
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    pdb = _find(docs, "PodDisruptionBudget", "gpuroute-operator")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]


@needs_kubectl
def test_eks_overlay_exposes_the_socket_through_an_nlb() -> None:
    docs = rendered("management/overlays/eks")
    svc = _find(docs, "Service", "gpuroute-operator")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["loadBalancerSourceRanges"], "the socket must not be open to the internet"
    annotations = svc["metadata"]["annotations"]
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-type"] == "external"
    assert annotations["service.beta.kubernetes.io/aws-load-balancer-nlb-target-type"] == "ip"
    assert "preserve_client_ip.enabled=true" in annotations[
        "service.beta.kubernetes.io/aws-load-balancer-target-group-attributes"
    ]
    sa = _find(docs, "ServiceAccount", "gpuroute-operator")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    deploy = _find(docs, "Deployment", "gpuroute-operator")
    image = deploy["spec"]["template"]["spec"]["containers"][0]["image"]
    assert ".dkr.ecr." in image and "/gpuroute-operator:" in image
    # The metrics Service stays internal.
    assert _find(docs, "Service", "gpuroute-operator-metrics")["spec"]["type"] == "ClusterIP"


@needs_kubectl
def test_monitoring_overlay_adds_a_servicemonitor_for_the_metrics_service() -> None:
    docs = rendered("management/overlays/monitoring")
    monitor = _find(docs, "ServiceMonitor", "gpuroute-operator")
    metrics = _find(docs, "Service", "gpuroute-operator-metrics")
    labels = metrics["metadata"]["labels"]
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert labels.get(key) == value, f"ServiceMonitor selector {key}={value} misses the metrics Service"
    port_names = {p["name"] for p in metrics["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    dashboard = _find(docs, "ConfigMap", "gpuroute-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["gpuroute.json"])["uid"] == "gpuroute-overview"
    # Only the metrics Service: the socket Service must not be scraped.
    socket_labels = _find(docs, "Service", "gpuroute-operator")["metadata"]["labels"]
    assert not all(socket_labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())


@needs_kubectl
def test_gpu_monitoring_overlay_scrapes_the_worker_port() -> None:
    docs = rendered("gpu/overlays/monitoring")
    monitor = _find(docs, "PodMonitor", "gpuroute-worker")
    deploy = _find(docs, "Deployment", "gpuroute-worker")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    ports = {p["name"] for c in deploy["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports


def _worker(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    deploy = _find(docs, "Deployment", "gpuroute-worker")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


@needs_kubectl
def test_gpu_base_worker() -> None:
    docs = rendered("gpu/base")
    assert ("Namespace", "gpuroute-workers") in {(d["kind"], d["metadata"]["name"]) for d in docs}
    pod, container = _worker(docs)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    command = container["command"]
    assert command[:2] == ["gpuroute", "worker"]
    flags = dict(zip(command[2::2], command[3::2], strict=False))
    assert set(flags) == {"--operator", "--pool", "--key-file", "--server-public-key-file"}
    assert flags["--key-file"] == "/etc/gpuroute/worker/worker.key_secret"
    assert flags["--server-public-key-file"] == "/etc/gpuroute/server/server.key"
    # $(VAR) references resolve from the generated ConfigMap.
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("gpuroute-worker-config"))
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    assert flags["--operator"] == "$(GPUROUTE_OPERATOR)" and config["data"]["GPUROUTE_OPERATOR"].startswith("tcp://")
    assert flags["--pool"] == "$(GPUROUTE_POOL)" and config["data"]["GPUROUTE_POOL"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8081}, "the worker serves /healthz, /readyz and /metrics on --health-port"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    # `gpuroute keys worker --pool POOL` names the worker's Secret after its pool.
    assert volumes["worker-curve"]["secret"]["secretName"] == f"gpuroute-worker-{config['data']['GPUROUTE_POOL']}"
    assert mounts["worker-curve"] == "/etc/gpuroute/worker"
    assert volumes["operator-public"]["secret"]["secretName"] == "gpuroute-operator-public"
    assert mounts["operator-public"] == "/etc/gpuroute/server"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


@needs_kubectl
def test_aks_overlay() -> None:
    docs = rendered("gpu/overlays/aks")
    deploy = _find(docs, "Deployment", "gpuroute-worker")
    pod, container = _worker(docs)
    assert pod["nodeSelector"] == {"kubernetes.azure.com/accelerator": "nvidia"}
    assert deploy["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    sa = _find(docs, "ServiceAccount", pod["serviceAccountName"])
    assert sa["metadata"]["annotations"]["azure.workload.identity/client-id"]
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config["data"]["GPUROUTE_OPERATOR"] != "tcp://gpuroute-operator.gpuroute-system.svc:7700"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["worker-curve"]["secret"]["secretName"] == f"gpuroute-worker-{config['data']['GPUROUTE_POOL']}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].startswith("gpuroute.azurecr.io/gpuroute-worker:")


# ----------------------------------------------------------------------------- RBAC, enforced


_RBAC_KINDS = ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


def _rbac_under_test_names(overlay: str, account: str, suffix: str) -> list[dict[str, Any]]:
    """An overlay's RBAC for one ServiceAccount, renamed so it cannot clash with other tests."""
    docs = [d for d in rendered(overlay) if d["kind"] in _RBAC_KINDS]
    bindings = [
        d for d in docs
        if "roleRef" in d and any(s.get("name") == account for s in d["subjects"])
    ]
    roles = {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bindings}
    out = []
    for doc in docs:
        if doc not in bindings and (doc["kind"], doc["metadata"]["name"]) not in roles:
            continue
        doc = json.loads(json.dumps(doc))
        doc["metadata"]["name"] = f"{doc['metadata']['name']}-{suffix}"
        if "roleRef" in doc:
            doc["roleRef"]["name"] = f"{doc['roleRef']['name']}-{suffix}"
            for subject in doc["subjects"]:
                assert subject["kind"] == "ServiceAccount" and subject["name"] == account, subject
                subject["name"] = f"{account}-{suffix}"
        out.append(doc)
    return out


@contextmanager
def _rbac_applied(dyn: Any, objs: list[dict[str, Any]]) -> Iterator[None]:
    from kubernetes.dynamic.exceptions import NotFoundError

    created: list[tuple[Any, dict[str, Any]]] = []
    try:
        for obj in objs:
            namespace = obj["metadata"].get("namespace")
            if namespace:
                _ensure_namespace(dyn, namespace)
            resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
            resource.create(body=obj, namespace=namespace)
            created.append((resource, obj))
        yield
    finally:
        for resource, obj in reversed(created):
            try:
                resource.delete(name=obj["metadata"]["name"], namespace=obj["metadata"].get("namespace"))
            except NotFoundError:
                pass


def _can(api: ApiClient, user: str, verb: str, resource: str, *, group: str = "",
         namespace: str | None = None, subresource: str | None = None, name: str | None = None) -> bool:
    from kubernetes import client

    attrs = client.V1ResourceAttributes(
        verb=verb, group=group, resource=resource, namespace=namespace, subresource=subresource, name=name
    )
    ns = user.split(":")[2]
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user,
            groups=["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"],
            resource_attributes=attrs,
        )
    )
    return bool(client.AuthorizationV1Api(api).create_subject_access_review(review).status.allowed)


_Check = tuple[str, str, str, "str | None", "str | None"]  # verb, resource, group, namespace, subresource


def _eventually(check: Any, timeout: float = 15.0) -> bool:
    """The RBAC authorizer reads from an informer cache: new bindings apply after a moment."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _wrong(api: ApiClient, user: str, allowed: list[_Check], denied: list[_Check]) -> tuple[list[_Check], list[_Check]]:
    missing = [a for a in allowed if not _can(api, user, a[0], a[1], group=a[2], namespace=a[3], subresource=a[4])]
    extra = [d for d in denied if _can(api, user, d[0], d[1], group=d[2], namespace=d[3], subresource=d[4])]
    return missing, extra


@needs_kubectl
def test_operator_rbac_is_least_privilege(control_plane: Any, dyn: Any) -> None:
    suffix = uuid.uuid4().hex[:8]
    objs = _rbac_under_test_names("management/base", "gpuroute-operator", suffix)
    assert {d["kind"] for d in objs} == set(_RBAC_KINDS)
    user = f"system:serviceaccount:gpuroute-system:gpuroute-operator-{suffix}"
    g = "gpuroute.io"
    allowed: list[_Check] = [
        # kopf watches (cluster-wide); the engine patches status.
        ("list", "imagejobs", g, None, None),
        ("watch", "imagejobs", g, None, None),
        ("patch", "imagejobs", g, "team-a", "status"),
        ("list", "workerpools", g, None, None),
        ("watch", "workerpools", g, None, None),
        ("patch", "workerpools", g, None, "status"),
        # Namespace annotations (storage grants); Events on transitions.
        ("get", "namespaces", "", None, None),
        ("create", "events", "", "team-a", None),
        ("create", "events", "", "default", None),
        # Worker public keys, in the operator's namespace only.
        ("get", "secrets", "", "gpuroute-system", None),
        # Leader election: the Lease (the leader's Endpoints are checked by name below).
        ("create", "leases", "coordination.k8s.io", "gpuroute-system", None),
        # The status API's TokenReview and SubjectAccessReviews.
        ("create", "tokenreviews", "authentication.k8s.io", None, None),
        ("create", "subjectaccessreviews", "authorization.k8s.io", None, None),
    ]
    denied: list[_Check] = [
        # Nothing reads a single ImageJob or WorkerPool, lists namespaces, enumerates
        # Secrets or patches Events.
        ("get", "imagejobs", g, "team-a", None),
        ("update", "imagejobs", g, "team-a", "status"),
        ("get", "workerpools", g, None, None),
        ("list", "namespaces", "", None, None),
        ("watch", "namespaces", "", None, None),
        ("list", "secrets", "", "gpuroute-system", None),
        ("watch", "secrets", "", "gpuroute-system", None),
        ("patch", "events", "", "team-a", None),
        ("create", "localsubjectaccessreviews", "authorization.k8s.io", "team-a", None),
        ("create", "imagejobs", g, "team-a", None),
        ("delete", "imagejobs", g, "team-a", None),
        # kopf runs only event handlers: no annotations or finalizers on the objects.
        ("patch", "imagejobs", g, "team-a", None),
        ("update", "imagejobs", g, "team-a", None),
        ("create", "workerpools", g, None, None),
        ("delete", "workerpools", g, None, None),
        ("patch", "workerpools", g, None, None),
        # settings.scanning.disabled: no CRD access at all.
        ("list", "customresourcedefinitions", "apiextensions.k8s.io", None, None),
        ("create", "customresourcedefinitions", "apiextensions.k8s.io", None, None),
        ("get", "secrets", "", "team-a", None),
        ("get", "secrets", "", "gpuroute-workers", None),
        ("list", "secrets", "", None, None),
        ("create", "secrets", "", "gpuroute-system", None),
        ("list", "pods", "", None, None),
        ("create", "pods", "", "gpuroute-system", None),
        ("list", "configmaps", "", None, None),
        ("create", "namespaces", "", None, None),
        ("patch", "namespaces", "", None, None),
        ("patch", "deployments", "apps", "gpuroute-system", None),
        ("create", "clusterrolebindings", "rbac.authorization.k8s.io", None, None),
        ("create", "leases", "coordination.k8s.io", "team-a", None),
        ("delete", "leases", "coordination.k8s.io", "gpuroute-system", None),
        ("list", "leases", "coordination.k8s.io", "gpuroute-system", None),
        ("patch", "pods", "", "team-a", None),
        # No pod verb at all: a pod patch can change a container's image.
        ("patch", "pods", "", "gpuroute-system", None),
        ("update", "pods", "", "gpuroute-system", None),
        ("delete", "pods", "", "gpuroute-system", None),
        ("create", "endpoints", "", "gpuroute-system", None),
        ("list", "endpoints", "", "gpuroute-system", None),
        ("list", "clusterkopfpeerings", "kopf.dev", None, None),
    ]
    api = control_plane.api_client()
    try:
        with _rbac_applied(dyn, objs):
            first = allowed[0]
            _eventually(lambda: _can(api, user, first[0], first[1], group=first[2], namespace=first[3]))
            missing, extra = _wrong(api, user, allowed, denied)
            # get and update only on the operator's own Lease (resourceNames).
            lease_named = {(verb, name): _can(api, user, verb, "leases", group="coordination.k8s.io",
                                              namespace="gpuroute-system", name=name)
                           for verb in ("get", "update") for name in ("gpuroute-operator", "someone-elses")}
            endpoints_named = {(verb, name): _can(api, user, verb, "endpoints", namespace="gpuroute-system", name=name)
                               for verb in ("get", "patch")
                               for name in ("gpuroute-operator", "gpuroute-operator-metrics", "kube-dns")}
    finally:
        api.close()
    assert endpoints_named == {(verb, name): name != "kube-dns" for verb, name in endpoints_named}, endpoints_named
    assert lease_named == {("get", "gpuroute-operator"): True, ("update", "gpuroute-operator"): True,
                           ("get", "someone-elses"): False, ("update", "someone-elses"): False}, lease_named
    assert not missing, f"the operator lacks permissions it needs: {missing}"
    assert not extra, f"the operator has permissions it should not: {extra}"


# Every rule the operator is granted, and the code that needs it: (file, text that makes
# the call). A granted verb missing here, or a row whose code is gone, fails the test.
_OPERATOR_RULE_USES: dict[tuple[str, str, str, tuple[str, ...]], tuple[str, str]] = {
    ("gpuroute.io", "imagejobs", "list", ()): ("kube/job_watch.py", 'self.api.request("GET", self.config.path + query)'),
    ("gpuroute.io", "imagejobs", "watch", ()): ("kube/job_watch.py", 'params = {"watch": "1"'),
    ("gpuroute.io", "imagejobs/status", "patch", ()): ("kube/api.py", 'name) + "/status"'),
    ("gpuroute.io", "workerpools", "list", ()): ("shell/handlers.py", '@kopf.on.event(GROUP, VERSION, "workerpools")'),
    ("gpuroute.io", "workerpools", "watch", ()): ("shell/handlers.py", '@kopf.on.event(GROUP, VERSION, "workerpools")'),
    ("gpuroute.io", "workerpools/status", "patch", ()): ("kube/api.py", 'name) + "/status"'),
    ("", "namespaces", "get", ()): ("kube/api.py", '"GET", object_path("Namespace", None, name)'),
    ("", "events", "create", ()): ("kube/api.py", '"POST", f"/api/v1/namespaces/{quote(namespace)}/events"'),
    ("authentication.k8s.io", "tokenreviews", "create", ()): ("web/console.py", "authentication.k8s.io/v1/tokenreviews"),
    ("authorization.k8s.io", "subjectaccessreviews", "create", ()): ("web/console.py",
                                                                    "authorization.k8s.io/v1/subjectaccessreviews"),
    ("", "secrets", "get", ()): ("kube/client.py", "pykube.Secret.objects("),
    ("coordination.k8s.io", "leases", "create", ()): ("kube/leader.py", "create_namespaced_lease"),
    ("coordination.k8s.io", "leases", "get", ("gpuroute-operator",)): ("kube/leader.py", "read_namespaced_lease"),
    ("coordination.k8s.io", "leases", "update", ("gpuroute-operator",)): ("kube/leader.py", "replace_namespaced_lease"),
    ("", "endpoints", "get", ("gpuroute-operator", "gpuroute-operator-metrics")): ("kube/leader.py",
                                                                                  "read_namespaced_endpoints"),
    ("", "endpoints", "patch", ("gpuroute-operator", "gpuroute-operator-metrics")): ("kube/leader.py",
                                                                                    "patch_namespaced_endpoints"),
}


def test_every_granted_verb_is_used_by_the_code() -> None:
    granted = set()
    for doc in (d for d in rendered("management/base") if d["kind"] in ("ClusterRole", "Role")):
        for rule in doc["rules"]:
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    for verb in rule.get("verbs", []):
                        granted.add((group, resource, verb, tuple(rule.get("resourceNames", ()))))
    unused = granted - set(_OPERATOR_RULE_USES)
    assert not unused, f"granted but no code path uses them (remove them, or add the code path to the table): {unused}"
    assert not set(_OPERATOR_RULE_USES) - granted, "table rows no rule grants"
    code = ROOT / "operator" / "gpuroute_operator"
    for rule, (module, text) in _OPERATOR_RULE_USES.items():
        assert text in (code / module).read_text(), f"{rule}: {module} no longer contains {text!r}"


@needs_kubectl
def test_scaler_rbac_only_scales_the_worker_deployment(control_plane: Any, dyn: Any) -> None:
    suffix = uuid.uuid4().hex[:8]
    objs = _rbac_under_test_names("gpu/base", "gpuroute-scaler", suffix)
    assert {d["kind"] for d in objs} == {"Role", "RoleBinding"}
    user = f"system:serviceaccount:gpuroute-workers:gpuroute-scaler-{suffix}"
    ns = "gpuroute-workers"

    def can(verb: str, resource: str, name: str, subresource: str | None = None) -> bool:
        from kubernetes import client

        attrs = client.V1ResourceAttributes(
            verb=verb, group="apps", resource=resource, namespace=ns, name=name, subresource=subresource
        )
        review = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(user=user, resource_attributes=attrs)
        )
        return bool(client.AuthorizationV1Api(api).create_subject_access_review(review).status.allowed)

    api = control_plane.api_client()
    try:
        with _rbac_applied(dyn, objs):
            assert _eventually(lambda: can("get", "deployments", "gpuroute-worker"))
            assert can("patch", "deployments", "gpuroute-worker", "scale")
            assert can("update", "deployments", "gpuroute-worker", "scale")
            assert not can("patch", "deployments", "gpuroute-worker")
            assert not can("patch", "deployments", "other", "scale")
            assert not can("delete", "deployments", "gpuroute-worker")
    finally:
        api.close()


# ----------------------------------------------------------------------------- CRD vs catalogue, on the server


def _image_job(name: str, steps: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "gpuroute.io/v1alpha1",
        "kind": "ImageJob",
        "metadata": {"name": name, "namespace": "gpuroute-system"},
        "spec": {
            "input": {"uri": "s3://inputs/cat.png"},
            "output": {"uri": "s3://outputs/cat.png"},
            "steps": steps,
        },
    }
    body["spec"].update(spec)
    return body


_REQUIRED_EXAMPLES = {
    "upscale": {"scale": 2.0},
    "resize": {"width": 640},
    "crop": {"width": 32, "height": 32},
    "rotate": {"angle": 30.0},
    "gamma": {"gamma": 2.2},
    "brightness": {"factor": 1.2},
    "contrast": {"factor": 0.8},
    "saturation": {"factor": 1.5},
}


def _normalized_steps() -> list[dict[str, Any]]:
    steps = []
    for op in CATALOG:
        step = normalize_step(len(steps), {"op": op, **_REQUIRED_EXAMPLES.get(op, {})})
        steps.append({k: v for k, v in step.items() if v is not None})
    return steps


def test_schema_accepts_every_normalized_step(dyn: Any) -> None:
    """What normalize_step produces (every default filled in) passes the CRD schema."""
    _ensure_namespace(dyn, "gpuroute-system")
    steps = _normalized_steps()
    for i in range(0, len(steps), MAX_STEPS):
        chunk = steps[i : i + MAX_STEPS]
        result = _dry_run_apply(dyn, _image_job(f"all-ops-{i}", chunk))
        assert [s["op"] for s in result["spec"]["steps"]] == [s["op"] for s in chunk]
        # Nothing pruned: every parameter is in the schema.
        assert result["spec"]["steps"] == chunk


def test_schema_fills_spec_defaults(dyn: Any) -> None:
    _ensure_namespace(dyn, "gpuroute-system")
    result = _dry_run_apply(dyn, _image_job("defaults", [{"op": "invert"}]))
    spec = result["spec"]
    assert spec["priority"] == "batch"
    assert spec["timeoutSeconds"] == 600
    assert spec["maxAttempts"] == 3
    assert spec["output"]["format"] == "png"
    assert spec["output"]["quality"] == 90
    assert spec["steps"] == [{"op": "invert"}], "step parameters must not get schema defaults"


@pytest.mark.parametrize(
    ("case", "body"),
    [
        ("unknown-op", _image_job("bad", [{"op": "explode"}])),
        ("no-steps", _image_job("bad", [])),
        ("too-many-steps", _image_job("bad", [{"op": "invert"}] * (MAX_STEPS + 1))),
        ("radius-too-large", _image_job("bad", [{"op": "blur", "radius": 51}])),
        ("width-not-integer", _image_job("bad", [{"op": "resize", "width": "wide"}])),
        ("bad-fill", _image_job("bad", [{"op": "pad", "fill": "red"}])),
        ("bad-priority", _image_job("bad", [{"op": "invert"}], priority="urgent")),
        ("timeout-too-long", _image_job("bad", [{"op": "invert"}], timeoutSeconds=86401)),
        ("http-input", _image_job("bad", [{"op": "invert"}], input={"uri": "http://example.com/a.png"})),
        ("both-inputs", _image_job("bad", [{"op": "invert"}], input={"uri": "s3://a/b.png", "inline": "AAAA"})),
        ("inline-too-large", _image_job("bad", [{"op": "invert"}], input={"inline": "A" * 349532})),
        ("https-output", _image_job("bad", [{"op": "invert"}], output={"uri": "https://example.com/x"})),
    ],
)
def test_schema_rejects_invalid_jobs(dyn: Any, case: str, body: dict[str, Any]) -> None:
    from kubernetes.dynamic.exceptions import DynamicApiError

    _ensure_namespace(dyn, "gpuroute-system")
    resource = dyn.resources.get(api_version=body["apiVersion"], kind=body["kind"])
    with pytest.raises(DynamicApiError) as info:
        resource.create(body=body, namespace="gpuroute-system", dry_run="All")
    assert info.value.status == 422, f"{case}: {info.value.status} {info.value.body}"


def test_workerpool_example_is_accepted(dyn: Any) -> None:
    pool = {
        "apiVersion": "gpuroute.io/v1alpha1",
        "kind": "WorkerPool",
        "metadata": {"name": "aks-westeurope-a100"},
        "spec": {
            "cloud": "azure",
            "region": "westeurope",
            "gpu": {"model": "NVIDIA A100 80GB", "memoryGiB": 80},
            "pricePerGpuHour": 3.67,
            "spot": False,
            "workerKeysSecretRef": {"name": "aks-a100-worker-keys", "namespace": "gpuroute-system"},
            "allowedSourceCIDRs": ["20.50.0.0/16"],
            "endpoints": ["tcp://gpu-a.example.com:7701"],
            "allowedNamespaces": ["team-a"],
            "models": [{"name": "realesrgan-x4", "uri": "azure://acct/models/x4.pth", "sha256": "0" * 64}],
            "scaling": {
                "kubeconfigSecretRef": {"name": "aks-kubeconfig"},
                "apiServer": "https://gpu-aks-dns-1a2b3c4d.hcp.westeurope.azmk8s.io:443",
                "deployment": {"name": "gpuroute-worker"},
                "maxReplicas": 8,
            },
        },
    }
    result = _dry_run_apply(dyn, pool)
    spec = result["spec"]
    assert spec["maxInFlightPerWorker"] == 4
    assert spec["scaling"]["minReplicas"] == 0
    assert spec["scaling"]["deployment"]["namespace"] == "gpuroute-workers"
    assert spec["scaling"]["kubeconfigSecretRef"]["key"] == "kubeconfig"
    assert spec["scaling"]["apiServer"] == pool["spec"]["scaling"]["apiServer"]  # not pruned
    # A plain-http API server is refused by the schema already.
    pool["spec"]["scaling"]["apiServer"] = "http://gpu-aks.example:80"
    from kubernetes.dynamic.exceptions import DynamicApiError

    resource = dyn.resources.get(api_version=pool["apiVersion"], kind=pool["kind"])
    with pytest.raises(DynamicApiError) as info:
        resource.create(body=pool, dry_run="All")
    assert info.value.status == 422, info.value.body


def _kubectl(control_plane: Any, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert KUBECTL is not None
    return subprocess.run(
        [KUBECTL, "--kubeconfig", control_plane.kubeconfig, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_kubectl
def test_kubectl_explain_documents_the_steps(control_plane: Any) -> None:
    # The apiserver publishes a new CRD's OpenAPI a moment after it is Established.
    deadline = time.monotonic() + 60
    while True:
        proc = _kubectl(control_plane, "explain", "imagejob.spec.steps")
        if proc.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert proc.returncode == 0, proc.stderr
    for name in ("op", "radius", "factor", "fill"):
        assert name in proc.stdout
    assert "Used by" in proc.stdout
    # The same published schema lets kubectl reject a misspelt parameter, which the
    # apiserver would otherwise prune silently.
    job = _image_job("typo", [{"op": "sharpen", "radiuss": 3}])
    proc = _kubectl(control_plane, "apply", "--dry-run=server", "-f", "-", stdin=json.dumps(job))
    assert proc.returncode != 0
    assert "radiuss" in proc.stderr


# ----------------------------------------------------------------------------- status as the operator writes it


def _patch_status_roundtrip(dyn: Any, body: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """Create the object for real, merge-patch its status subresource, read it back, delete it."""
    resource = dyn.resources.get(api_version=body["apiVersion"], kind=body["kind"])
    namespace = body["metadata"].get("namespace")
    name = body["metadata"]["name"]
    resource.create(body=body, namespace=namespace)
    try:
        path = resource.path(name=name, namespace=namespace) + "/status"
        dyn.request("patch", path, body={"status": status}, content_type="application/merge-patch+json")
        return resource.get(name=name, namespace=namespace).to_dict()
    finally:
        resource.delete(name=name, namespace=namespace)


def test_imagejob_status_as_the_operator_writes_it(dyn: Any) -> None:
    _ensure_namespace(dyn, "gpuroute-system")
    conditions = [
        {"type": "Dispatched", "status": "True", "reason": "Dispatched", "message": "",
         "lastTransitionTime": "2026-01-02T03:04:05.123Z", "observedGeneration": 1},
        {"type": "Succeeded", "status": "True", "reason": "Succeeded", "message": "64x64 png written",
         "lastTransitionTime": "2026-01-02T03:04:06.456Z", "observedGeneration": 1},
        {"type": "Failed", "status": "False", "reason": "NotFailed", "message": "",
         "lastTransitionTime": "2026-01-02T03:04:05.123Z", "observedGeneration": 1},
    ]
    status = {
        "phase": "Completed", "reason": "Succeeded", "message": "64x64 png written", "attempts": 1,
        "pool": "pool-a", "worker": "w1", "gpu": "", "decision": "pool-a: fastest (score 0.12)",
        "timing": {
            "queuedAt": "2026-01-02T03:04:05.000Z", "dispatchedAt": "2026-01-02T03:04:05.123Z",
            "startedAt": "2026-01-02T03:04:05.123Z", "completedAt": "2026-01-02T03:04:06.456Z",
            "queueMs": 123.0, "networkMs": 1.5, "downloadMs": 0.0, "decodeMs": 0.4, "gpuMs": 2.25,
            "encodeMs": 0.9, "uploadMs": 3.0, "totalMs": 1456.0,
        },
        # A cached or partial answer may leave fields empty; the schema must not reject it.
        "output": {"uri": "s3://outputs/cat.png", "bytes": 0, "width": 0, "height": 0, "sha256": "", "format": ""},
        "conditions": conditions,
        "observedGeneration": 1,
    }
    body = _image_job(f"status-{uuid.uuid4().hex[:8]}", [{"op": "invert"}])
    got = _patch_status_roundtrip(dyn, body, status)
    assert _blank(got["status"]) == _blank(status), "the API server pruned or changed status fields"


def _blank(value: Any) -> Any:
    """"" and None alike: the local 1.20 apiserver decodes "" in custom resources as null
    (a real one keeps ""); the status strings are nullable so both are accepted."""
    if isinstance(value, dict):
        return {k: _blank(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_blank(v) for v in value]
    return None if value == "" else value


def test_workerpool_status_as_the_operator_writes_it(dyn: Any) -> None:
    status = {
        "phase": "Available", "connectedWorkers": 1,
        "workers": [{"id": "w1", "gpu": "cpu", "capacity": 4, "inFlight": 0, "rttMs": None,
                     "lastHeartbeat": "2026-01-02T03:04:05.123Z"}],
        "inFlight": 0, "queued": 0, "rttMs": None, "throughputMpixPerS": 12.5,
        "pipelines": [{"costClass": "upscale(method=lanczos,scale=2)>sharpen(radius=2)", "jobs": 12,
                       "overheadMs": 21.5, "msPerMpix": 84.25}],
        "lastHeartbeat": "2026-01-02T03:04:05.123Z",
        "conditions": [{"type": "Available", "status": "True", "reason": "WorkersConnected",
                        "message": "1 workers connected", "lastTransitionTime": "2026-01-02T03:04:05.123Z"}],
        "observedGeneration": 1,
    }
    body = {
        "apiVersion": "gpuroute.io/v1alpha1",
        "kind": "WorkerPool",
        "metadata": {"name": f"status-{uuid.uuid4().hex[:8]}"},
        "spec": {"cloud": "onprem", "region": "local", "workerKeysSecretRef": {"name": "keys"}},
    }
    got = _patch_status_roundtrip(dyn, body, status)["status"]
    # Nulls are how the operator says "not measured yet": merge patch drops top-level
    # ones, the API server prunes the nested ones (non-nullable fields).
    expected = {k: v for k, v in status.items() if v is not None}
    expected["workers"] = [{k: v for k, v in w.items() if v is not None} for w in status["workers"]]
    assert got == expected


# ----------------------------------------------------------------------------- NetworkPolicies


@needs_kubectl
def test_network_policies_admit_only_what_they_must() -> None:
    """Rendered (and dry-run applied by test_overlay_applies_with_server_dry_run)."""
    operator = _find(rendered("management/base"), "NetworkPolicy", "gpuroute-operator-ingress")["spec"]
    assert operator["policyTypes"] == ["Ingress"]
    by_port = {p["port"]: rule["from"] for rule in operator["ingress"] for p in rule["ports"]}
    assert set(by_port) == {7700, 9090, 9091}
    assert all("ipBlock" in peer for peer in by_port[7700]), "the socket admits listed CIDRs only"
    for port in (9090, 9091):
        assert by_port[port] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]

    worker = _find(rendered("gpu/base"), "NetworkPolicy", "gpuroute-worker-egress")["spec"]
    assert set(worker["policyTypes"]) == {"Egress", "Ingress"} and worker["ingress"] == []
    blocks = [peer["ipBlock"] for rule in worker["egress"] for peer in rule["to"] if "ipBlock" in peer]
    import ipaddress

    def reachable(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip.version == ipaddress.ip_network(b["cidr"]).version and ip in ipaddress.ip_network(b["cidr"])
                   and not any(ip in ipaddress.ip_network(e) for e in b.get("except", [])) for b in blocks)

    for denied in ("169.254.169.254", "168.63.129.16", "fd00:ec2::254", "10.0.0.1", "172.16.5.5", "192.168.1.1",
                   "127.0.0.1", "100.100.100.200", "fe80::1", "fec0::1", "2002:a9fe:a9fe::1"):
        assert not reachable(denied), denied
    for allowed in ("52.216.0.1", "20.60.0.1", "2600:1f18::1", "198.51.100.10"):
        assert reachable(allowed), allowed
