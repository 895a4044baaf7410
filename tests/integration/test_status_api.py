"""The operator's web surfaces as an attacker meets them (issue 12), against the real
stack: a real apiserver reviewing real ServiceAccount tokens, curl, headless Chromium,
and transfer errors provoked for real, then every place a user or a log can read
searched for a signature."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gpuroute_dev.localenv.stack import LocalStack, PoolConfig

pytestmark = pytest.mark.integration

BUCKET = "gpuroute-status-api"
POOL = "pool-s"
TEAM_A, TEAM_B = "status-team-a", "status-team-b"
# A credential parameter whose value is anything but the redaction marker.
LEAK = re.compile(r"(?i)(x-amz-signature|x-amz-credential|x-amz-security-token|[?&]sig|awsaccesskeyid)"
                  r"(=|%3d)(?!<redacted>)[^&\s\"']{6,}")


@pytest.fixture(scope="module")
def stack(control_plane: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    import io

    from PIL import Image

    s3_server.create_bucket(BUCKET)
    png = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(png, "PNG")
    s3_server.client().put_object(Bucket=BUCKET, Key="in/a.png", Body=png.getvalue())
    stack = LocalStack(tmp_path_factory.mktemp("status-api"), control_plane, s3_server)
    for ns in (TEAM_A, TEAM_B):
        stack.ensure_namespace(ns, read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/", "s3://no-such-bucket/out/"])
    stack.add_pool(PoolConfig(POOL, workers=("w1",)))
    stack.start_operator()
    stack.start_worker(POOL, "w1")
    stack.wait_for_pool(POOL, workers=1)
    for ns in (TEAM_A, TEAM_B):
        stack.create_job(ns, "ok", {"input": {"uri": f"s3://{BUCKET}/in/a.png"},
                                    "output": {"uri": f"s3://{BUCKET}/out/{ns}.png"}, "steps": [{"op": "invert"}]})
    # Transfer errors: a presigned GET of a missing object, a presigned PUT to a bucket that does not exist.
    stack.create_job(TEAM_A, "missing-input", {"input": {"uri": f"s3://{BUCKET}/in/missing.png"},
                                               "output": {"uri": f"s3://{BUCKET}/out/m.png"}, "steps": [{"op": "invert"}],
                                               "maxAttempts": 3})
    stack.create_job(TEAM_A, "missing-bucket", {"input": {"uri": f"s3://{BUCKET}/in/a.png"},
                                                "output": {"uri": "s3://no-such-bucket/out/m.png"},
                                                "steps": [{"op": "invert"}], "maxAttempts": 3})
    stack.wait_for_jobs(TEAM_A, ["ok", "missing-input", "missing-bucket"])
    stack.wait_for_jobs(TEAM_B, ["ok"])
    yield stack
    stack.stop()


def _viewer_token(stack: LocalStack, namespace: str, account: str) -> str:
    """A ServiceAccount that may get imagejobs in `namespace` only."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    rbac = client.RbacAuthorizationV1Api(stack.control_plane.api_client())
    role = {"metadata": {"name": account}, "rules": [
        {"apiGroups": ["gpuroute.io"], "resources": ["imagejobs"], "verbs": ["get", "list"]}]}
    binding = {"metadata": {"name": account}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                          "name": account},
               "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]}
    for create, body in ((rbac.create_namespaced_role, role), (rbac.create_namespaced_role_binding, binding)):
        try:
            create(namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
    return stack.mint_token(namespace, account)


def _curl(url: str, token: str | None = None, *, cacert: str | None = None, check: bool = True) -> tuple[int, str]:
    """HTTP status and body; with check=False a failed connection or TLS handshake is code 0."""
    curl = shutil.which("curl")
    assert curl, "curl is required"
    args = [curl, "-sS", "-o", "-", "-w", "\n%{http_code}", url]
    if token is not None:
        args[1:1] = ["-H", f"Authorization: Bearer {token}"]
    if cacert is not None:
        args[1:1] = ["--cacert", cacert]
    out = subprocess.run(args, capture_output=True, text=True, timeout=30, check=check).stdout
    body, _, code = out.rpartition("\n")
    return int(code or 0), body


def _jobs(body: str) -> set[str]:
    data = json.loads(body)
    return {f"{j['namespace']}/{j['name']}" for j in (*data["activeJobs"], *data["recentJobs"])}


def test_no_token_or_a_bad_one_is_refused(stack: LocalStack) -> None:
    url = f"http://127.0.0.1:{stack.operator_web_port}/api/status"
    for token in (None, "", "not-a-token", "a b", "x" * 20000):
        code, body = _curl(url, token)
        # aiohttp itself refuses a header over 8 KiB (400) before the handler runs.
        assert code == 401 or (code == 400 and token and len(token) > 8000), (token, code, body)
        assert "namespace" not in body and POOL not in body
    # Forged: a token signed by another key.
    forged = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6a3ViZS1zeXN0ZW06ZGVmYXVsdCJ9.c2ln"
    assert _curl(url, forged)[0] == 401


def test_a_namespace_viewer_sees_only_its_namespace(stack: LocalStack) -> None:
    token = _viewer_token(stack, TEAM_A, "status-viewer")
    url = f"http://127.0.0.1:{stack.operator_web_port}/api/status"
    deadline = time.monotonic() + 15
    while True:  # the RBAC authorizer picks up a new binding after a moment
        code, body = _curl(url, token)
        if code == 200 and f"{TEAM_A}/ok" in _jobs(body) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert code == 200, body
    seen = _jobs(body)
    assert f"{TEAM_A}/ok" in seen and all(j.startswith(f"{TEAM_A}/") for j in seen), seen
    data = json.loads(body)
    assert data["pools"] == [] and data["unrouted"] is None, "pools need get on workerpools"
    # Another namespace's viewer sees nothing of team A.
    other = _viewer_token(stack, TEAM_B, "status-viewer")
    time.sleep(1.0)
    code, body = _curl(url, other)
    assert code == 200 and not any(j.startswith(f"{TEAM_A}/") for j in _jobs(body)), body


def test_admin_sees_everything_and_metrics_are_open(stack: LocalStack) -> None:
    code, body = _curl(f"http://127.0.0.1:{stack.operator_web_port}/api/status", stack.control_plane.token)
    assert code == 200
    assert {f"{TEAM_A}/ok", f"{TEAM_B}/ok"} <= _jobs(body)
    assert POOL in [p["name"] for p in json.loads(body)["pools"]]  # other modules' pools share the control plane
    code, metrics = _curl(f"http://127.0.0.1:{stack.operator_metrics_port}/metrics")
    assert code == 200 and "gpuroute" in metrics
    assert _curl(f"http://127.0.0.1:{stack.operator_metrics_port}/api/status")[0] == 404, "no status API on the metrics port"
    assert _curl(f"http://127.0.0.1:{stack.operator_web_port}/healthz")[0] == 200


def test_the_page_in_chromium_shows_what_the_token_allows(stack: LocalStack) -> None:
    from tests.integration.cdp import Browser, chromium_path

    binary = chromium_path()
    assert binary, "chromium is not installed"
    token = _viewer_token(stack, TEAM_A, "status-viewer")
    url = f"http://127.0.0.1:{stack.operator_web_port}/"
    rows = "JSON.stringify([...document.querySelectorAll('tr.job')].map(r => r.dataset.job))"
    browser = Browser(binary)
    try:
        # No token: the sign-in form, no rows.
        state = browser.evaluate_over_time(
            url, "JSON.stringify({form: !document.getElementById('login').hidden, rows: " + rows + "})",
            until=lambda v: bool(v and json.loads(v)["form"]))
        assert json.loads(json.loads(state)["rows"]) == []
        login = (f"(sessionStorage.getItem('gpuroute-token') ? 0 : "
                 f"(sessionStorage.setItem('gpuroute-token', {json.dumps(token)}), refresh())), ")
        seen = json.loads(browser.evaluate_over_time(url, login + rows, until=lambda v: bool(v and json.loads(v))))
        assert f"{TEAM_A}/ok" in seen and all(j.startswith(f"{TEAM_A}/") for j in seen), seen
    finally:
        browser.close()


def test_no_signature_anywhere_after_transfer_errors(stack: LocalStack) -> None:
    failed = {n: stack.get_job(TEAM_A, n)["status"] for n in ("missing-input", "missing-bucket")}
    assert all(s["phase"] == "Failed" for s in failed.values()), failed
    surfaces: dict[str, str] = {"status": json.dumps([stack.get_job(ns, n) for ns, n in (
        (TEAM_A, "missing-input"), (TEAM_A, "missing-bucket"), (TEAM_A, "ok"), (TEAM_B, "ok"))])}
    surfaces["events"] = json.dumps([e.message for ns in (TEAM_A, TEAM_B)
                                     for e in stack.core.list_namespaced_event(ns).items])
    surfaces["api"] = _curl(f"http://127.0.0.1:{stack.operator_web_port}/api/status", stack.control_plane.token)[1]
    surfaces["metrics"] = _curl(f"http://127.0.0.1:{stack.operator_metrics_port}/metrics")[1]
    surfaces["worker metrics"] = _curl(f"http://127.0.0.1:{stack.worker_health_ports['w1']}/metrics")[1]
    for path in stack.workdir.glob("*.log"):
        surfaces[path.name] = path.read_text(errors="replace")
    leaks = {name: LEAK.findall(text)[:3] for name, text in surfaces.items() if LEAK.search(text)}
    assert not leaks, leaks
    # The errors are still useful: they say what failed.
    assert "404" in failed["missing-input"]["message"] or "download" in failed["missing-input"]["message"], failed


# -- audiences, revocation and TLS (security review, finding 5) -----------------------------

GPUROUTE_AUDIENCE = "gpuroute"


def _token_for(stack: LocalStack, namespace: str, account: str, audiences: list[str]) -> str:
    """A TokenRequest token of `account` (a viewer of `namespace`) for `audiences`, as
    `kubectl create token ACCOUNT --audience ...` makes it."""
    from kubernetes import client

    _viewer_token(stack, namespace, account)  # the ServiceAccount and its Role
    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=audiences,
                                                                                 expiration_seconds=3600))
    return str(stack.core.create_namespaced_service_account_token(account, namespace, request).status.token)


def _poll(url: str, token: str, until: Any, *, bound_s: float = 20.0, **curl: Any) -> tuple[int, str]:
    """Ask until `until((code, body))` holds or `bound_s` passes; the last answer either way."""
    deadline = time.monotonic() + bound_s
    while True:
        answer = _curl(url, token, **curl)
        if until(answer) or time.monotonic() > deadline:
            return answer
        time.sleep(0.5)


def test_a_token_for_the_gpuroute_audience_is_accepted(stack: LocalStack) -> None:
    token = _token_for(stack, TEAM_A, "audience-viewer", [GPUROUTE_AUDIENCE])
    url = f"http://127.0.0.1:{stack.operator_web_port}/api/status"
    code, body = _poll(url, token, lambda a: a[0] == 200 and f"{TEAM_A}/ok" in _jobs(a[1]))
    assert code == 200, body
    assert json.loads(body)["user"] == f"system:serviceaccount:{TEAM_A}:audience-viewer"


def test_a_token_for_a_foreign_audience_is_refused(stack: LocalStack) -> None:
    token = _token_for(stack, TEAM_A, "foreign-viewer", ["vault"])
    code, body = _curl(f"http://127.0.0.1:{stack.operator_web_port}/api/status", token)
    assert code == 401, body
    assert "namespace" not in body


def test_a_deleted_service_accounts_token_is_refused_within_seconds(stack: LocalStack) -> None:
    url = f"http://127.0.0.1:{stack.operator_web_port}/api/status"
    for account, audiences in (("revoked-default", []), ("revoked-gpuroute", [GPUROUTE_AUDIENCE])):
        token = _token_for(stack, TEAM_A, account, audiences)
        code, body = _poll(url, token, lambda a: a[0] == 200)
        assert code == 200, (account, body)
        stack.core.delete_namespaced_service_account(account, TEAM_A)
        # The review cache keeps a positive answer a few seconds; the bound is generous,
        # but shorter than the 30 s an answer used to be reused.
        code, body = _poll(url, token, lambda a: a[0] == 401)
        assert code == 401, (account, code, body)


def test_the_status_api_over_https(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Last in this module: restarts the operator serving the status port over TLS, with
    the certificate and key from files as the Deployment mounts them from a Secret."""
    from gpuroute_dev.localenv.tls import self_signed

    cert, key = self_signed(tmp_path_factory.mktemp("status-tls"), ("127.0.0.1", "localhost"))
    assert stack.operator is not None
    stack.operator.stop()
    stack.start_operator(extra_args=["--status-tls-cert", str(cert), "--status-tls-key", str(key)])
    url = f"https://127.0.0.1:{stack.operator_web_port}/api/status"
    token = _token_for(stack, TEAM_A, "tls-viewer", [GPUROUTE_AUDIENCE])
    code, body = _poll(url, token, lambda a: a[0] == 200 and f"{TEAM_A}/ok" in _jobs(a[1]), bound_s=60.0,
                       cacert=str(cert), check=False)
    assert code == 200, body
    assert all(j.startswith(f"{TEAM_A}/") for j in _jobs(body))
    assert _curl(url, "not-a-token", cacert=str(cert))[0] == 401
    # Plain HTTP on that port gets no status; an unknown certificate is refused by the client.
    assert _curl(f"http://127.0.0.1:{stack.operator_web_port}/api/status", token, check=False)[0] != 200
    assert _curl(url, token, check=False)[0] == 0
    code, page = _curl(f"https://127.0.0.1:{stack.operator_web_port}/", cacert=str(cert))
    assert code == 200 and "<html" in page.lower()
    # /metrics stays plain HTTP for Prometheus.
    assert _curl(f"http://127.0.0.1:{stack.operator_metrics_port}/healthz")[0] == 200
