"""The operator's HTTP endpoints.

Two listeners:
- the status page (/) and /api/status on `WebConfig.port`, bound to `WebConfig.bind`,
  over HTTPS with the certificate and key of `WebConfig.tls` (plain HTTP only on a
  loopback address, or when `WebConfig.insecure_http` says so). /api/status
  authenticates the caller's bearer token with a TokenReview for `WebConfig.audiences`
  (and the API server's own audience unless turned off), and shows it only the
  ImageJobs of namespaces where a SubjectAccessReview says it may `get
  imagejobs.gpuroute.io`, and the (cluster-scoped) pools only with `get
  workerpools.gpuroute.io`: what kube-rbac-proxy and controller-runtime's secure
  metrics do. Review answers are reused for `WebConfig.cache_ttl_s` (5 s), so a
  deleted ServiceAccount or RoleBinding counts within seconds. The page itself holds
  no data and is served to anyone.
- /metrics and /healthz on `WebConfig.metrics_port`, without authentication, for
  Prometheus and probes (a NetworkPolicy admits only the monitoring namespace).

Every string served is passed through `redact`, so no presigned URL leaves here.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gpuroute.redact import redact, redact_json
from gpuroute_operator.kube.api import TRANSPORT_ERRORS

if TYPE_CHECKING:
    from gpuroute_operator.kube.api import AsyncKube

log = logging.getLogger(__name__)

GROUP = "gpuroute.io"
MAX_TOKEN_BYTES = 16 * 1024
"""A longer Authorization header is refused without asking the API server."""
MAX_CACHED = 4096
"""Review results kept (least recently used dropped first): random tokens cannot grow memory."""
MAX_CONCURRENT_REVIEWS = 8
"""Reviews in flight to the API server at once; more callers wait."""
DEFAULT_AUDIENCES = ("gpuroute",)
"""What `kubectl create token ACCOUNT --audience gpuroute` puts in a token for the status API."""


@dataclass(frozen=True)
class TLSFiles:
    """The status listener's certificate, read from files (a mounted kubernetes.io/tls Secret)."""

    cert: str
    """PEM certificate chain (tls.crt)."""
    key: str
    """PEM private key of that certificate (tls.key)."""


@dataclass(frozen=True)
class WebConfig:
    """Where the operator serves HTTP, and how callers are checked."""

    port: int | None = 9091
    """Status page and /api/status (authenticated); None disables."""
    metrics_port: int | None = 9090
    """/metrics and /healthz, open for Prometheus and probes; None disables."""
    bind: str = "0.0.0.0"
    """Address both listeners bind to (127.0.0.1 keeps them local)."""
    cache_ttl_s: float = 5.0
    """How long a TokenReview or SubjectAccessReview answer, positive or negative, is reused:
    a deleted ServiceAccount, an expired token or a removed RoleBinding counts after this."""
    audiences: tuple[str, ...] = DEFAULT_AUDIENCES
    """Token audiences the status API accepts (TokenReview spec.audiences)."""
    apiserver_audience: bool = True
    """Also accept tokens for the API server's own audience (a plain `kubectl create token`)."""
    tls: TLSFiles | None = None
    """Serve the status port over HTTPS with these; None: plain HTTP (see plain_http_refusal)."""
    insecure_http: bool = False
    """Allow plain HTTP on the status port on a non-loopback address (tokens cross the network in clear)."""


def _is_loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


def plain_http_refusal(config: WebConfig) -> str | None:
    """Why `config` must not start (bearer tokens over plain HTTP on a reachable address), or None."""
    if not config.port or config.tls is not None or config.insecure_http or _is_loopback(config.bind):
        return None
    return (f"the status API would take bearer tokens over plain HTTP on {config.bind}:{config.port}; give it a "
            f"certificate (--status-tls-cert/--status-tls-key), bind it to 127.0.0.1 (--web-bind, behind a TLS "
            f"proxy), disable it (--web-port 0) or accept clear-text tokens (--status-insecure-http)")


def audience_accepted(status: dict[str, Any], requested: tuple[str, ...], *, apiserver_audience: bool) -> bool:
    """Whether a TokenReview `status`, asked for `requested` audiences, admits the token.

    The API server answers the audiences the token is valid for among those asked; an
    authenticator that ignores audiences answers none, which the TokenReview API defines
    as valid for the API server's own audience only."""
    if not status.get("authenticated"):
        return False
    granted = {str(a) for a in status.get("audiences") or ()}
    if not granted:
        return apiserver_audience
    return bool(granted & set(requested))


@dataclass(frozen=True)
class Caller:
    """An authenticated user, as the TokenReview reported it."""

    username: str
    """e.g. system:serviceaccount:team-a:viewer."""
    uid: str
    """The user's uid, passed on to SubjectAccessReviews."""
    groups: tuple[str, ...]
    """Groups the user is in."""
    extra: tuple[tuple[str, tuple[str, ...]], ...]
    """Extra attributes (sorted), passed on to SubjectAccessReviews."""


class Reviewer:
    """TokenReview and SubjectAccessReview with a short cache, as kube-rbac-proxy does.

    A token is first reviewed for `audiences`; unless `apiserver_audience` is False, one
    that fails is reviewed again for the API server's own audience. A token is cached
    under its SHA-256, never in clear; failed reviews (API server unreachable) are not
    cached and answer 503."""

    def __init__(self, api: AsyncKube, *, ttl_s: float = 5.0, audiences: tuple[str, ...] = DEFAULT_AUDIENCES,
                 apiserver_audience: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self._api = api
        self._ttl_s = ttl_s
        self._audiences = audiences
        self._apiserver_audience = apiserver_audience
        self._clock = clock
        self._tokens: OrderedDict[str, tuple[float, Caller | None]] = OrderedDict()
        self._access: OrderedDict[tuple[Any, ...], tuple[float, bool]] = OrderedDict()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_REVIEWS)
        self.reviews = 0
        """Reviews sent to the API server (the cache keeps this low)."""

    def _cached(self, cache: OrderedDict[Any, tuple[float, Any]], key: Any) -> tuple[bool, Any]:
        hit = cache.get(key)
        if hit is None or self._clock() - hit[0] > self._ttl_s:
            return False, None
        cache.move_to_end(key)
        return True, hit[1]

    def _store(self, cache: OrderedDict[Any, tuple[float, Any]], key: Any, value: Any) -> None:
        cache[key] = (self._clock(), value)
        cache.move_to_end(key)
        while len(cache) > MAX_CACHED:
            cache.popitem(last=False)

    async def _create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self._slots:
            self.reviews += 1
            _, answer = await self._api.request("POST", path, body)
        return dict(answer or {})

    async def _review_token(self, token: str, audiences: tuple[str, ...] | None) -> dict[str, Any]:
        """The TokenReview status for `audiences` (None: the API server's own)."""
        spec: dict[str, Any] = {"token": token}
        if audiences is not None:
            spec["audiences"] = list(audiences)
        answer = await self._create("/apis/authentication.k8s.io/v1/tokenreviews", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec})
        return dict(answer.get("status") or {})

    async def authenticate(self, token: str) -> Caller | None:
        key = hashlib.sha256(token.encode()).hexdigest()
        hit, caller = self._cached(self._tokens, key)
        if hit:
            return caller  # type: ignore[no-any-return]
        status: dict[str, Any] | None = None
        if self._audiences:
            status = await self._review_token(token, self._audiences)
            if not audience_accepted(status, self._audiences, apiserver_audience=self._apiserver_audience):
                status = None
        if status is None and self._apiserver_audience:
            status = await self._review_token(token, None)
            if not status.get("authenticated"):
                status = None
        caller = None
        if status is not None:
            user = status.get("user") or {}
            extra = tuple(sorted((str(k), tuple(str(x) for x in v)) for k, v in (user.get("extra") or {}).items()))
            caller = Caller(str(user.get("username") or ""), str(user.get("uid") or ""),
                            tuple(str(g) for g in user.get("groups") or ()), extra)
        self._store(self._tokens, key, caller)
        return caller

    async def allowed(self, caller: Caller, resource: str, namespace: str = "") -> bool:
        """May `caller` get `resource` (gpuroute.io) in `namespace` ("" = all namespaces, or cluster-scoped)?"""
        key = (caller, resource, namespace)
        hit, value = self._cached(self._access, key)
        if hit:
            return bool(value)
        attributes = {"verb": "get", "group": GROUP, "resource": resource}
        if namespace:
            attributes["namespace"] = namespace
        answer = await self._create("/apis/authorization.k8s.io/v1/subjectaccessreviews", {
            "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
            "spec": {"user": caller.username, "uid": caller.uid, "groups": list(caller.groups),
                     "extra": {k: list(v) for k, v in caller.extra}, "resourceAttributes": attributes}})
        allowed = bool((answer.get("status") or {}).get("allowed"))
        self._store(self._access, key, allowed)
        return allowed


async def visible_snapshot(snapshot: dict[str, Any], caller: Caller, reviewer: Reviewer) -> dict[str, Any]:
    """What `caller` may see of `snapshot`: jobs of namespaces it may get, pools only
    with get on workerpools, cluster-wide counts only with cluster-wide rights."""
    everywhere = await reviewer.allowed(caller, "imagejobs")
    namespaces = {j.get("namespace", "") for j in (*snapshot["activeJobs"], *snapshot["recentJobs"])}
    readable = set(namespaces) if everywhere else {
        ns for ns in sorted(namespaces) if ns and await reviewer.allowed(caller, "imagejobs", ns)}
    pools = await reviewer.allowed(caller, "workerpools")
    return {
        "pools": snapshot["pools"] if pools else [],
        "activeJobs": [j for j in snapshot["activeJobs"] if j.get("namespace") in readable],
        "recentJobs": [j for j in snapshot["recentJobs"] if j.get("namespace") in readable],
        "unrouted": snapshot["unrouted"] if everywhere else None,
        "statusBacklog": snapshot["statusBacklog"] if pools else None,
        "user": caller.username,
    }


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_BYTES or any(c.isspace() for c in token):
        return None
    return token


def _unauthorized(reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=401, headers={"WWW-Authenticate": 'Bearer realm="gpuroute"'})


class WebServer:
    """Both listeners; `cleanup` stops them."""

    def __init__(self, runners: list[web.AppRunner], reviewer: Reviewer | None) -> None:
        self.runners = runners
        self.reviewer = reviewer
        """The status API's reviewer (None when that listener is disabled)."""

    async def cleanup(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


async def start_web(snapshot: Callable[[], dict[str, Any]], api: AsyncKube, config: WebConfig) -> WebServer:
    """Serve /metrics and the status page; `snapshot` is what the operator shows (shell.engine.Engine.snapshot),
    filtered here per caller. Raises ValueError where plain_http_refusal says no, ssl.SSLError
    or OSError when the certificate files cannot be loaded."""
    refusal = plain_http_refusal(config)
    if refusal is not None:
        raise ValueError(refusal)
    reviewer = Reviewer(api, ttl_s=config.cache_ttl_s, audiences=config.audiences,
                        apiserver_audience=config.apiserver_audience)

    async def metrics(_: web.Request) -> web.Response:
        # Label values come from code, but a reason or pool name could one day carry a URL.
        return web.Response(body=redact(generate_latest().decode()).encode(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def api_status(request: web.Request) -> web.Response:
        token = bearer_token(request)
        if token is None:
            return _unauthorized("a bearer token is required (Authorization: Bearer <token>)")
        try:
            caller = await reviewer.authenticate(token)
            if caller is None:
                return _unauthorized("token not authenticated")
            body = await visible_snapshot(snapshot(), caller, reviewer)
        except TRANSPORT_ERRORS as exc:
            log.warning("status API: review failed: %s", exc)
            return web.json_response({"error": "cannot review the caller now"}, status=503)
        return web.json_response(redact_json(body), headers={"Cache-Control": "no-store"})

    page = resources.files("gpuroute_operator.web").joinpath("static/status.html").read_text()

    async def status_page(_: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html", headers={
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "connect-src 'self'; form-action 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    runners: list[web.AppRunner] = []
    if config.metrics_port:
        app = web.Application()
        app.add_routes([web.get("/metrics", metrics), web.get("/healthz", healthz)])
        runners.append(await _serve(app, config.bind, config.metrics_port))
    if config.port:
        app = web.Application()
        app.add_routes([web.get("/", status_page), web.get("/api/status", api_status), web.get("/healthz", healthz)])
        tls = server_tls_context(config.tls) if config.tls is not None else None
        if tls is None and config.insecure_http and not _is_loopback(config.bind):
            log.warning("status API on %s:%s over plain HTTP (--status-insecure-http): bearer tokens cross the "
                        "network in clear", config.bind, config.port)
        runners.append(await _serve(app, config.bind, config.port, tls))
    return WebServer(runners, reviewer if config.port else None)


def server_tls_context(files: TLSFiles) -> ssl.SSLContext:
    """A TLS 1.2+ server context presenting `files`' certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert, files.key)
    return context


async def _serve(app: web.Application, host: str, port: int, tls: ssl.SSLContext | None = None) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=tls).start()
    return runner
