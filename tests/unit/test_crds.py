"""The CRDs in crds/ and the deployment artefacts, checked without a cluster.

The CRDs must be structural (Kubernetes 1.20 rejects anything else), document every
field for `kubectl explain`, and list exactly the ops and parameters of the op
catalogue, so that the API and gpuroute/ops_catalog.py cannot drift apart.
tests/integration/test_manifests.py checks the same files against a real apiserver.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpuroute.ops_catalog import CATALOG, MAX_STEPS, Param

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
MANIFESTS = ROOT / "manifests"

# What the step schema types each catalogue kind as.
KIND_TYPES = {
    "number": "number",
    "integer": "integer",
    "boolean": "boolean",
    "string": "string",
    "enum": "string",
    "color": "string",
}
# Keys that may not appear inside oneOf/anyOf/allOf/not of a structural schema.
_JUNCTOR_FORBIDDEN = {
    "type",
    "description",
    "default",
    "nullable",
    "additionalProperties",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
}
_JUNCTORS = ("oneOf", "anyOf", "allOf", "not")
# Keys apiextensions.k8s.io/v1 JSONSchemaProps accepts (minus the ones never used here).
_SCHEMA_KEYS = {
    "type", "description", "properties", "items", "required", "enum", "default", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "pattern", "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties",
    "additionalProperties", "nullable", "title", "example", "multipleOf",
    *_JUNCTORS,
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
}


def _load_crd(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((CRD_DIR / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: expected exactly one document, found {len(docs)}"
    return docs[0]


@pytest.fixture(scope="module")
def imagejob() -> dict[str, Any]:
    return _load_crd("imagejob.yaml")


@pytest.fixture(scope="module")
def workerpool() -> dict[str, Any]:
    return _load_crd("workerpool.yaml")


def _version(crd: dict[str, Any]) -> dict[str, Any]:
    versions = crd["spec"]["versions"]
    assert [v["name"] for v in versions] == ["v1alpha1"]
    return versions[0]


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    return _version(crd)["schema"]["openAPIV3Schema"]


def _walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node reachable through properties/items (not through junctors)."""
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _junctor_nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key in _JUNCTORS:
            value = node.get(key)
            if isinstance(value, list):
                for v in value:
                    yield v
                    yield from _junctor_nodes(v)
            elif isinstance(value, dict):
                yield value
                yield from _junctor_nodes(value)


def _at(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = schema
    for part in dotted.split("."):
        if part == "[]":
            node = node["items"]
        else:
            node = node["properties"][part]
    return node


def _fits(schema: dict[str, Any], value: Any) -> bool:
    """Whether a (default) value satisfies the scalar constraints of its own schema."""
    typ = schema.get("type")
    if typ == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        return False
    if typ == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return False
    if typ == "boolean" and not isinstance(value, bool):
        return False
    if typ == "string" and not isinstance(value, str):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if "minimum" in schema and value < schema["minimum"]:
        return False
    if "maximum" in schema and value > schema["maximum"]:
        return False
    if "pattern" in schema and not re.search(schema["pattern"], value):
        return False
    return True


# ----------------------------------------------------------------------------- names


def test_imagejob_names_and_scope(imagejob: dict[str, Any]) -> None:
    assert imagejob["apiVersion"] == "apiextensions.k8s.io/v1"
    assert imagejob["kind"] == "CustomResourceDefinition"
    assert imagejob["metadata"]["name"] == "imagejobs.gpuroute.io"
    spec = imagejob["spec"]
    assert spec["group"] == "gpuroute.io"
    assert spec["scope"] == "Namespaced"
    names = spec["names"]
    assert (names["kind"], names["plural"], names["singular"]) == ("ImageJob", "imagejobs", "imagejob")
    assert names["shortNames"] == ["ij"]
    assert names["categories"] == ["gpuroute"]
    version = _version(imagejob)
    assert version["served"] is True and version["storage"] is True
    assert version["subresources"] == {"status": {}}


def test_workerpool_names_and_scope(workerpool: dict[str, Any]) -> None:
    assert workerpool["metadata"]["name"] == "workerpools.gpuroute.io"
    spec = workerpool["spec"]
    assert spec["group"] == "gpuroute.io"
    assert spec["scope"] == "Cluster"
    names = spec["names"]
    assert (names["kind"], names["plural"]) == ("WorkerPool", "workerpools")
    assert names["shortNames"] == ["wp"]
    version = _version(workerpool)
    assert version["served"] is True and version["storage"] is True
    assert version["subresources"] == {"status": {}}


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", ["imagejob.yaml", "workerpool.yaml"])
def test_every_property_is_documented_and_typed(name: str) -> None:
    schema = _schema(_load_crd(name))
    undocumented, untyped = [], []
    root = name.split(".")[0]
    for path, node in _walk(schema, root):
        # Kubernetes forbids anything but the type on the implicit ObjectMeta
        # ("must not specify anything other than name and generateName").
        if path == f"{root}.metadata":
            assert node == {"type": "object"}, f"{path}: only `type: object` is allowed"
            continue
        if not str(node.get("description") or "").strip():
            undocumented.append(path)
        if node.get("type") not in {"object", "array", "string", "integer", "number", "boolean"}:
            untyped.append(path)
    assert not undocumented, f"properties without a description: {undocumented}"
    assert not untyped, f"schema nodes without a valid type: {untyped}"


@pytest.mark.parametrize("name", ["imagejob.yaml", "workerpool.yaml"])
def test_schema_is_structural(name: str) -> None:
    schema = _schema(_load_crd(name))
    assert schema["type"] == "object"
    assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    # metadata: only the implicit ObjectMeta; the apiserver rejects even a description.
    assert schema["properties"]["metadata"] == {"type": "object"}
    for path, node in _walk(schema, name):
        unknown = set(node) - _SCHEMA_KEYS
        assert not unknown, f"{path}: keys not allowed in a CRD schema: {unknown}"
        if node["type"] == "object":
            assert "properties" in node or path.endswith(".metadata"), (
                f"{path}: an object without properties would need x-kubernetes-preserve-unknown-fields"
            )
            for req in node.get("required", []):
                assert req in node["properties"], f"{path}: required {req!r} is not a property"
        if node["type"] == "array":
            assert isinstance(node.get("items"), dict), f"{path}: an array needs a single items schema"
        for key in ("minimum", "maximum"):
            if key in node:
                assert node["type"] in ("integer", "number"), f"{path}: {key} on a {node['type']}"
        for key in ("minLength", "maxLength", "pattern"):
            if key in node:
                assert node["type"] == "string", f"{path}: {key} on a {node['type']}"
        if "pattern" in node:
            re.compile(node["pattern"])
        if "default" in node:
            assert _fits(node, node["default"]), f"{path}: default {node['default']!r} violates its schema"
        if node.get("x-kubernetes-list-type") == "map":
            item = node["items"]
            for key in node["x-kubernetes-list-map-keys"]:
                assert key in item.get("required", []), f"{path}: list-map key {key} must be required"
                assert not item["properties"][key].get("nullable"), f"{path}: list-map key {key} may not be nullable"
    for junctor in _junctor_nodes(schema):
        assert not (set(junctor) & _JUNCTOR_FORBIDDEN), f"{name}: {junctor} inside a oneOf/anyOf/allOf/not"


@pytest.mark.parametrize("name", ["imagejob.yaml", "workerpool.yaml"])
def test_no_unknown_fields_preserved(name: str) -> None:
    text = (CRD_DIR / name).read_text()
    assert "x-kubernetes-preserve-unknown-fields" not in text
    assert "x-kubernetes-validations" not in text, "Kubernetes 1.20 has no CEL validation rules"


# ----------------------------------------------------------------------------- steps vs catalogue


def _catalog_params() -> dict[str, list[tuple[str, Param]]]:
    params: dict[str, list[tuple[str, Param]]] = {}
    for op, spec in CATALOG.items():
        for name, param in spec.params.items():
            params.setdefault(name, []).append((op, param))
    return params


def test_steps_array_bounds(imagejob: dict[str, Any]) -> None:
    steps = _at(_schema(imagejob), "spec.steps")
    assert steps["type"] == "array"
    assert steps["minItems"] == 1
    assert steps["maxItems"] == MAX_STEPS
    assert steps["items"]["required"] == ["op"]


def test_step_op_enum_is_the_catalogue(imagejob: dict[str, Any]) -> None:
    op = _at(_schema(imagejob), "spec.steps.[].op")
    assert op["type"] == "string"
    assert sorted(op["enum"]) == sorted(CATALOG)
    for name in CATALOG:
        assert re.search(rf"\b{name}\b", op["description"]), f"op description does not name {name}"


def test_step_parameters_match_the_catalogue(imagejob: dict[str, Any]) -> None:
    props = _at(_schema(imagejob), "spec.steps.[]")["properties"]
    params = _catalog_params()
    assert set(props) - {"op"} == set(params), (
        f"missing from the CRD: {sorted(set(params) - set(props))}; "
        f"not in the catalogue: {sorted(set(props) - {'op'} - set(params))}"
    )
    for name, uses in params.items():
        prop = props[name]
        kinds = {p.kind for _, p in uses}
        types = {KIND_TYPES[k] for k in kinds}
        expected_type = "number" if types == {"number", "integer"} else types.pop()
        assert prop["type"] == expected_type, f"{name}: type {prop['type']}, catalogue {kinds}"
        # Defaults differ per op (and would leak parameters into ops that lack them).
        assert "default" not in prop, f"{name}: step parameters must not carry schema defaults"
        for op, _ in uses:
            assert re.search(rf"\b{op}\b", prop["description"]), f"{name}: description does not name op {op}"
        if expected_type in ("number", "integer"):
            lows = [p.minimum for _, p in uses if p.minimum is not None]
            highs = [p.maximum for _, p in uses if p.maximum is not None]
            # The widest bound over the ops sharing the name; the operator checks per op.
            assert math.isclose(prop["minimum"], min(lows)), f"{name}: minimum {prop['minimum']} != {min(lows)}"
            assert math.isclose(prop["maximum"], max(highs)), f"{name}: maximum {prop['maximum']} != {max(highs)}"
        if kinds == {"enum"}:
            choices = {c for _, p in uses for c in p.choices}
            assert set(prop["enum"]) == choices, f"{name}: enum {prop['enum']} != {sorted(choices)}"
        if kinds == {"color"}:
            for _, p in uses:
                assert re.search(prop["pattern"], p.default), f"{name}: default {p.default} fails the pattern"
            assert not re.search(prop["pattern"], "red")


def test_catalogue_defaults_fit_the_step_schema(imagejob: dict[str, Any]) -> None:
    props = _at(_schema(imagejob), "spec.steps.[]")["properties"]
    for name, uses in _catalog_params().items():
        for op, param in uses:
            if param.default is not None:
                assert _fits(props[name], param.default), f"{op}.{name}: default {param.default!r} rejected by the CRD"


# ----------------------------------------------------------------------------- ImageJob API


def test_placement_lists_are_bounded_as_the_parser_bounds_them(imagejob: dict[str, Any]) -> None:
    # An unbounded list let one ImageJob name ~20,000 pools, each looked at on every routing pass.
    from gpuroute_operator.core.spec import MAX_PLACEMENT_NAMES, PLACEMENT_NAME_LENGTHS

    schema = _schema(imagejob)
    for field, max_length in PLACEMENT_NAME_LENGTHS.items():
        names = _at(schema, f"spec.placement.{field}")
        assert names["maxItems"] == MAX_PLACEMENT_NAMES == 32
        assert names["items"]["maxLength"] == max_length
        assert names["items"]["minLength"] == 1


def test_imagejob_spec_fields(imagejob: dict[str, Any]) -> None:
    schema = _schema(imagejob)
    spec = _at(schema, "spec")
    assert set(spec["required"]) >= {"input", "steps"}
    assert set(spec["properties"]) == {
        "input", "output", "steps", "priority", "timeoutSeconds", "itemTimeoutSeconds", "maxAttempts", "placement",
    }
    # 256 KiB decoded, as base64 text.
    assert _at(schema, "spec.input.inline")["maxLength"] == 4 * math.ceil(256 * 1024 / 3) == 349528
    assert {tuple(c["required"]) for c in _at(schema, "spec.input")["oneOf"]} == {("uri",), ("inline",), ("prefix",), ("list",)}
    assert {tuple(c["required"]) for c in _at(schema, "spec.output")["oneOf"]} == {("uri",), ("prefix",)}
    out = _at(schema, "spec.output")
    assert out["properties"]["format"]["enum"] == ["png", "jpeg", "webp", "avif"]
    assert out["properties"]["format"]["default"] == "png"
    quality = out["properties"]["quality"]
    assert (quality["minimum"], quality["maximum"], quality["default"]) == (1, 100, 90)
    priority = _at(schema, "spec.priority")
    assert priority["enum"] == ["realtime", "batch"] and priority["default"] == "batch"
    timeout = _at(schema, "spec.timeoutSeconds")
    assert (timeout["type"], timeout["minimum"], timeout["maximum"], timeout["default"]) == ("integer", 1, 86400, 600)
    attempts = _at(schema, "spec.maxAttempts")
    assert (attempts["minimum"], attempts["maximum"], attempts["default"]) == (1, 10, 3)
    placement = _at(schema, "spec.placement")
    for key in ("pools", "clouds", "regions"):
        assert placement["properties"][key]["type"] == "array"
        assert placement["properties"][key]["items"]["type"] == "string"
    strategy = placement["properties"]["strategy"]
    assert strategy["enum"] == ["fastest", "cheapest", "balanced"] and strategy["default"] == "balanced"


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("s3://inputs/cat.png", True),
        ("s3://my.bucket/dir/with space.png", True),
        ("azure://account/container/dir/blob.jpg", True),
        ("https://images.example.com/cat.png", True),
        ("http://images.example.com/cat.png", False),
        ("file:///etc/passwd", False),
        ("s3://bucket-only", False),
        ("azure://account/container", False),
    ],
)
def test_input_uri_pattern(imagejob: dict[str, Any], uri: str, ok: bool) -> None:
    pattern = _at(_schema(imagejob), "spec.input.uri")["pattern"]
    assert bool(re.search(pattern, uri)) is ok


@pytest.mark.parametrize(("uri", "ok"), [
    ("s3://photos/", True), ("s3://photos/2024/jpg/", True), ("azure://acct/cont/", True),
    ("azure://acct/cont/folder/", True), ("s3://photos/no-slash", False), ("s3://photos", False),
    ("https://example.com/folder/", False),
])
def test_batch_prefix_patterns(imagejob: dict[str, Any], uri: str, ok: bool) -> None:
    schema = _schema(imagejob)
    for path in ("spec.input.prefix", "spec.output.prefix"):
        assert bool(re.search(_at(schema, path)["pattern"], uri)) is ok, (path, uri)


def test_batch_status_fields(imagejob: dict[str, Any]) -> None:
    schema = _schema(imagejob)
    status = _at(schema, "status")["properties"]
    assert {"items", "progress", "percent", "itemsPerSecond", "estimatedCompletionAt", "failures", "results"} <= set(status)
    assert set(status["items"]["properties"]) == {"total", "succeeded", "failed", "running", "queued", "listingComplete"}
    assert set(status["failures"]["items"]["properties"]) == {"input", "reason", "message"}


def test_output_uri_pattern_is_storage_only(imagejob: dict[str, Any]) -> None:
    pattern = _at(_schema(imagejob), "spec.output.uri")["pattern"]
    assert re.search(pattern, "s3://outputs/cat.png")
    assert re.search(pattern, "azure://acct/results/cat.webp")
    assert not re.search(pattern, "https://example.com/upload")


def test_imagejob_status_fields(imagejob: dict[str, Any]) -> None:
    schema = _schema(imagejob)
    status = _at(schema, "status")
    assert set(status["properties"]) >= {
        "phase", "message", "reason", "attempts", "pool", "worker", "gpu", "decision",
        "output", "conditions", "observedGeneration", "timing",
    }
    assert _at(schema, "status.phase")["enum"] == [
        "Queued", "Dispatched", "Processing", "Completed", "Failed", "Cancelled",
    ]
    assert set(_at(schema, "status.output")["properties"]) == {"uri", "bytes", "width", "height", "sha256", "format"}
    condition = _at(schema, "status.conditions.[]")
    assert set(condition["properties"]) == {
        "type", "status", "reason", "message", "lastTransitionTime", "observedGeneration",
    }
    assert condition["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    for word in ("Succeeded", "Failed", "Dispatched"):
        assert word in condition["properties"]["type"]["description"]
    timing = _at(schema, "status.timing")["properties"]
    for key in ("queuedAt", "dispatchedAt", "startedAt", "completedAt"):
        assert (timing[key]["type"], timing[key]["format"]) == ("string", "date-time")
    for key in ("queueMs", "networkMs", "downloadMs", "decodeMs", "gpuMs", "encodeMs", "uploadMs", "totalMs"):
        assert timing[key]["type"] == "number"


# ----------------------------------------------------------------------------- WorkerPool API


def test_workerpool_fields(workerpool: dict[str, Any]) -> None:
    schema = _schema(workerpool)
    spec = _at(schema, "spec")["properties"]
    assert set(spec) == {
        "cloud", "region", "gpu", "pricePerGpuHour", "spot", "workerKeysSecretRef",
        "allowedSourceCIDRs", "endpoints", "maxInFlightPerWorker", "maxConnectionsPerKey", "allowedNamespaces",
        "models", "scaling",
    }
    assert set(spec["gpu"]["properties"]) == {"model", "memoryGiB"}
    assert set(spec["workerKeysSecretRef"]["properties"]) == {"name", "namespace"}
    assert "Z85" in spec["workerKeysSecretRef"]["description"]
    assert "<worker>.key" in spec["workerKeysSecretRef"]["description"]
    inflight = spec["maxInFlightPerWorker"]
    assert (inflight["minimum"], inflight["maximum"], inflight["default"]) == (1, 1024, 4)
    assert set(spec["models"]["items"]["properties"]) == {"name", "uri", "sha256"}
    endpoint = spec["endpoints"]["items"]["pattern"]
    assert re.search(endpoint, "tcp://gpu.example.com:7700")
    assert not re.search(endpoint, "ipc:///tmp/sock")
    scaling = spec["scaling"]["properties"]
    assert set(scaling) == {
        "kubeconfigSecretRef", "deployment", "minReplicas", "maxReplicas",
        "targetQueuePerWorker", "scaleDownIdleSeconds", "apiServer",
    }
    assert set(scaling["kubeconfigSecretRef"]["properties"]) == {"name", "namespace", "key"}
    api_server = scaling["apiServer"]["pattern"]
    assert re.search(api_server, "https://gpu-aks.hcp.westeurope.azmk8s.io:443")
    assert re.search(api_server, "https://rancher.example/k8s/clusters/c-1")
    for refused in ("http://gpu-aks.example", "https://user:pw@gpu-aks.example", "https://gpu/?x=1", "gpu-aks:443"):
        assert not re.search(api_server, refused), refused
    assert "Azure AD" in scaling["apiServer"]["description"]
    assert scaling["minReplicas"]["minimum"] == 0
    status = _at(schema, "status")["properties"]
    assert set(status) == {
        "phase", "connectedWorkers", "workers", "inFlight", "queued", "rttMs",
        "throughputMpixPerS", "pipelines", "lastHeartbeat", "conditions", "observedGeneration",
    }
    assert set(status["pipelines"]["items"]["properties"]) == {"costClass", "jobs", "overheadMs", "msPerMpix"}
    assert status["phase"]["enum"] == ["Available", "Degraded", "Unavailable"]
    assert set(status["workers"]["items"]["properties"]) == {
        "id", "key", "gpu", "capacity", "inFlight", "rttMs", "lastHeartbeat",
    }
    assert "Available" in status["conditions"]["items"]["properties"]["type"]["description"]


# ----------------------------------------------------------------------------- printer columns


def _columns(crd: dict[str, Any]) -> list[dict[str, Any]]:
    return _version(crd)["additionalPrinterColumns"]


def test_imagejob_printer_columns(imagejob: dict[str, Any]) -> None:
    cols = _columns(imagejob)
    default = [(c["name"], c["type"], c["jsonPath"]) for c in cols if c.get("priority", 0) == 0]
    assert default == [
        ("Phase", "string", ".status.phase"),
        ("Pool", "string", ".status.pool"),
        ("Worker", "string", ".status.worker"),
        ("Total ms", "number", ".status.timing.totalMs"),
        ("Progress", "string", ".status.progress"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    wide = [(c["name"], c["jsonPath"]) for c in cols if c.get("priority", 0) == 1]
    assert wide == [("Reason", ".status.reason")]


def test_workerpool_printer_columns(workerpool: dict[str, Any]) -> None:
    names = [c["name"] for c in _columns(workerpool) if c.get("priority", 0) == 0]
    assert names == ["Cloud", "Region", "GPU", "Workers", "Queued", "$/h", "Age"]


@pytest.mark.parametrize("name", ["imagejob.yaml", "workerpool.yaml"])
def test_printer_columns_point_at_schema_fields(name: str) -> None:
    crd = _load_crd(name)
    schema = _schema(crd)
    for col in _columns(crd):
        path = col["jsonPath"].lstrip(".")
        if path == "metadata.creationTimestamp":
            continue
        node = _at(schema, path)
        if col["type"] in ("number", "integer"):
            assert node["type"] in ("number", "integer"), f"{col['name']}: {path} is a {node['type']}"
        else:
            assert node["type"] == col["type"], f"{col['name']}: {path} is a {node['type']}"


# ----------------------------------------------------------------------------- deployment artefacts


def test_crd_kustomization_lists_both_crds() -> None:
    kustomization = yaml.safe_load((CRD_DIR / "Kustomization").read_text())
    assert sorted(kustomization["resources"]) == ["imagejob.yaml", "workerpool.yaml"]


def test_manifests_parse() -> None:
    files = sorted(MANIFESTS.rglob("*.yaml"))
    assert files, "manifests/ is empty"
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path}: a document that is not a mapping"
            assert "kind" in doc or "patch" in doc or "apiVersion" in doc, f"{path}: not a Kubernetes document"


def test_argocd_health_checks_cover_every_phase() -> None:
    cm = yaml.safe_load((MANIFESTS / "argocd" / "argocd-cm-health.yaml").read_text())
    assert (cm["kind"], cm["metadata"]["name"]) == ("ConfigMap", "argocd-cm")
    job = cm["data"]["resource.customizations.health.gpuroute.io_ImageJob"]
    for phase in ("Completed", "Failed", "Cancelled"):
        assert f'"{phase}"' in job
    for status in ("Healthy", "Degraded", "Suspended", "Progressing"):
        assert f'"{status}"' in job
    assert "return hs" in job
    assert "resource.customizations.health.gpuroute.io_WorkerPool" in cm["data"]


@pytest.mark.parametrize(
    ("kind", "obj", "expected"),
    [
        ("ImageJob", {"metadata": {}}, "Progressing"),
        ("ImageJob", {"status": {"phase": "Queued"}}, "Progressing"),
        ("ImageJob", {"status": {"phase": "Processing", "pool": "a"}}, "Progressing"),
        ("ImageJob", {"status": {"phase": "Completed", "timing": {"totalMs": 12.5}}}, "Healthy"),
        ("ImageJob", {"status": {"phase": "Failed", "reason": "InvalidSpec"}}, "Degraded"),
        ("ImageJob", {"status": {"phase": "Cancelled"}}, "Suspended"),
        ("ImageJob", {"status": {"phase": "Processing", "percent": 42.5,
                                 "items": {"total": 200, "succeeded": 80, "failed": 5}}}, "Progressing"),
        ("ImageJob", {"status": {"phase": "Completed", "items": {"total": 200, "succeeded": 200, "failed": 0}}}, "Healthy"),
        ("ImageJob", {"status": {"phase": "Failed", "reason": "ItemsFailed",
                                 "items": {"total": 200, "succeeded": 195, "failed": 5}}}, "Degraded"),
        ("ImageJob", {"status": {"phase": "Failed", "reason": "Timeout", "items": {"total": 9, "succeeded": 3}}}, "Degraded"),
        ("ImageJob", {"status": {"phase": "Cancelled", "items": {"total": 9, "succeeded": 3}}}, "Suspended"),
        ("WorkerPool", {"spec": {}}, "Progressing"),
        ("WorkerPool", {"spec": {}, "status": {"phase": "Available", "connectedWorkers": 2}}, "Healthy"),
        ("WorkerPool", {"spec": {}, "status": {"phase": "Unavailable"}}, "Degraded"),
        ("WorkerPool", {"spec": {"scaling": {"minReplicas": 0}}, "status": {"phase": "Unavailable"}}, "Healthy"),
    ],
)
def test_argocd_health_check_runs(kind: str, obj: dict[str, Any], expected: str) -> None:
    """Runs the Lua health checks the way Argo CD does (a global `obj`, a returned table)."""
    lupa = pytest.importorskip("lupa", reason="lupa (Lua in Python) is not installed")
    cm = yaml.safe_load((MANIFESTS / "argocd" / "argocd-cm-health.yaml").read_text())
    script = cm["data"][f"resource.customizations.health.gpuroute.io_{kind}"]
    lua = lupa.LuaRuntime()

    def table(value: Any) -> Any:
        if isinstance(value, dict):
            return lua.table_from({k: table(v) for k, v in value.items()})
        return value

    lua.globals().obj = table(obj)
    hs = lua.execute(f"return (function() {script} end)()")
    assert hs["status"] == expected
    assert hs["message"]
    items = obj.get("status", {}).get("items")
    if items and expected == "Progressing":
        assert hs["message"].startswith("42.5% (85/200 items, 5 failed)"), hs["message"]
    elif items and expected == "Degraded" and items.get("failed"):
        assert hs["message"] == "5 of 200 items failed"


def _metric_names(module: Any) -> set[str]:
    """Series names a prometheus_client module exports (counters as _total, histograms
    as _bucket/_sum/_count)."""
    from prometheus_client.metrics import MetricWrapperBase

    names: set[str] = set()
    for value in vars(module).values():
        if isinstance(value, MetricWrapperBase):
            base, kind = value._name, value._type
            if kind == "counter":
                names |= {f"{base}_total", f"{base}_created"}
            elif kind == "histogram":
                names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
            else:
                names.add(base)
    return names


def test_grafana_dashboard_uses_exported_metrics() -> None:
    import json

    operator_metrics = pytest.importorskip("gpuroute_operator.metrics")
    worker_metrics = pytest.importorskip("gpuroute_worker.metrics")
    exported = _metric_names(operator_metrics) | _metric_names(worker_metrics)
    path = MANIFESTS / "management" / "components" / "monitoring" / "gpuroute-dashboard.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    used = {name for expr in exprs for name in re.findall(r"\bgpuroute_[a-z0-9_]+", expr)}
    unknown = used - exported
    assert not unknown, f"dashboard queries series nobody exports: {sorted(unknown)}"


def _dockerfile(name: str) -> list[str]:
    """Instructions of a Dockerfile, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / name).read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    assert not current, f"{name}: dangling line continuation"
    return lines


def _instr(lines: list[str], keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in lines if line.split(None, 1)[0].upper() == keyword]


def test_dockerfile_operator() -> None:
    lines = _dockerfile("Dockerfile.operator")
    assert _instr(lines, "FROM") == ["python:3.11-slim"]
    copied = " ".join(_instr(lines, "COPY"))
    for path in ("pyproject.toml", "README.md", "gpuroute/", "operator/"):
        assert path in copied, f"Dockerfile.operator does not copy {path}"
    assert "worker_image/" not in copied, "the operator image installs the worker (tests/unit/test_images.py)"
    assert any('pip install ".[operator]"' in run for run in _instr(lines, "RUN"))
    user = _instr(lines, "USER")
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert _instr(lines, "ENTRYPOINT") == ['["gpuroute"]']


def test_dockerfile_worker() -> None:
    lines = _dockerfile("Dockerfile.worker")
    base = _instr(lines, "FROM")
    assert len(base) == 1 and ("nvidia/cuda" in base[0] or "pytorch/pytorch" in base[0])
    runs = " ".join(_instr(lines, "RUN"))
    assert "python3.11" in runs
    assert "download.pytorch.org/whl/cu" in " ".join(lines), "torch must come from the CUDA index"
    assert 'pip install ".[worker]"' in runs
    user = _instr(lines, "USER")
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert _instr(lines, "EXPOSE")
    assert _instr(lines, "ENTRYPOINT") == ['["gpuroute", "worker"]']


def _containers(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "Deployment"]
    assert len(docs) == 1, path
    return docs[0]["spec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize(
    "path", ["management/base/deployment.yaml", "gpu/base/deployment.yaml"], ids=["operator", "worker"]
)
def test_manifest_commands_parse_with_the_cli(path: str) -> None:
    """The Deployments' command lines are accepted by `gpuroute` itself."""
    from gpuroute.cli import build_parser

    (container,) = _containers(MANIFESTS / path)
    command = [re.sub(r"\$\((\w+)\)", "x", arg) for arg in container["command"]]
    assert command[0] == "gpuroute"
    args = build_parser().parse_args(command[1:])
    ports = {p["containerPort"] for p in container["ports"]}
    if args.command == "operator":
        assert {args.web_port, args.liveness_port} <= ports
        assert args.bind.endswith(":7700") and 7700 in ports
    else:
        assert args.health_port in ports


def test_mounted_secrets_match_gpuroute_keys() -> None:
    """Secret names and data keys the Deployments mount are the ones `gpuroute keys` writes."""
    from gpuroute.curve_keys import KeyPair, operator_secrets, worker_secrets

    pair = KeyPair.generate()
    made = {
        s["metadata"]["name"]: set(s["data"])
        for s in [
            *operator_secrets(pair, namespace="gpuroute-system", worker_namespace="gpuroute-workers"),
            *worker_secrets(pair, pool="pool-a", worker="w1", namespace="gpuroute-system",
                            worker_namespace="gpuroute-workers"),
        ]
    }
    for path in ("management/base/deployment.yaml", "gpu/base/deployment.yaml"):
        doc = next(d for d in yaml.safe_load_all((MANIFESTS / path).read_text()) if d)
        pod = doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        (container,) = pod["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        files = {arg for arg in container["command"] if arg.startswith("/etc/gpuroute/")}
        for file in files:
            volume = next(name for name, mount in mounts.items() if file.startswith(mount + "/"))
            secret = volumes[volume]
            assert secret in made, f"{path}: Secret {secret} is not one `gpuroute keys` creates ({sorted(made)})"
            key = file.rsplit("/", 1)[1]
            assert key in made[secret], f"{path}: {file}: Secret {secret} has no key {key}"


def test_dockerignore_keeps_the_venv_out() -> None:
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git"} <= entries
    for needed in ("gpuroute", "operator", "worker_image", "pyproject.toml", "README.md"):
        assert needed not in entries


def test_alert_rules_use_exported_metrics() -> None:
    operator_metrics = pytest.importorskip("gpuroute_operator.metrics")
    worker_metrics = pytest.importorskip("gpuroute_worker.metrics")
    exported = _metric_names(operator_metrics) | _metric_names(worker_metrics)
    rule = yaml.safe_load((MANIFESTS / "management" / "components" / "monitoring" / "prometheusrule.yaml").read_text())
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    alerts = {r["alert"] for r in rules}
    assert {"GpuroutePoolHasNoWorkers", "GpurouteGpuErrors", "GpurouteSocketDisconnectStorm",
            "GpurouteHighP95Latency", "GpurouteJobsStuckQueued"} <= alerts
    used = {name for r in rules for name in re.findall(r"\bgpuroute_[a-z0-9_]+", r["expr"])}
    assert used and not used - exported, f"alerts query series nobody exports: {sorted(used - exported)}"
