"""Remote autoscaling: the operator scales a pool's worker Deployment in the GPU cluster.

A WorkerPool with ``spec.scaling`` names a Secret (in the management cluster) holding a
kubeconfig for the GPU cluster and the worker Deployment there. From the pool's queue
depth and jobs in flight the operator computes a replica count between minReplicas and
maxReplicas and writes it through the GPU cluster's own API (``apps/v1``
``deployments/scale``), scaling to zero only after the pool has been idle for
scaleDownIdleSeconds.

Credentials, in the Secret named by ``kubeconfigSecretRef``:

- ``kubeconfig`` (or the data key named by ``kubeconfigSecretRef.key``): a kubeconfig
  whose current context reaches the GPU cluster. Only inline credentials are accepted: a
  static ``token``, ``client-certificate-data``/``client-key-data`` and
  ``certificate-authority-data``. Entries that run a command (``exec``,
  ``auth-provider``) or read a file in the operator's container (``tokenFile``,
  ``client-certificate``, ``client-key``, ``certificate-authority``), and any entry not
  on that list, are refused before the kubernetes client sees the kubeconfig: whoever
  can write the Secret must not run code inside the operator, which holds its
  ServiceAccount token, cloud credentials and CURVE key (:func:`check_kubeconfig`).
- Azure AD (AKS with Entra ID authentication): the operator fetches the bearer token
  itself with azure-identity's ``DefaultAzureCredential`` (in a pod with workload
  identity, the federated token of the operator's ServiceAccount) for the AKS server
  application, scope ``6dae42f8-4368-4678-94ff-3960e28e3630/.default``, and refreshes it
  before it expires. Azure AD mode is on when the Secret has ``azure-ad: "true"``, or when
  the kubeconfig user is the one ``az aks get-credentials`` writes for such clusters (an
  ``exec`` plugin running ``kubelogin``, or the legacy ``auth-provider: azure``): the
  operator image has no kubelogin, and the token it would produce is the same. That user
  entry is dropped unread, so its command never runs; every other entry is checked as
  above. An
  optional ``azure-ad-scope`` key overrides the scope; otherwise kubelogin's
  ``--server-id`` is used when present.

Everything that blocks runs in worker threads; errors (unreachable API, bad kubeconfig,
missing Secret, RBAC refusals) end at :meth:`Autoscaler.reconcile`, which logs them and
returns a decision with ``applied=False``: they never reach the engine.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from gpuroute_operator.core.scaling_spec import ScalingSpec

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, Configuration

log = logging.getLogger(__name__)

AKS_AAD_SERVER_ID = "6dae42f8-4368-4678-94ff-3960e28e3630"
"""Application id of the AKS Azure AD server app, the audience of AKS user tokens."""
AKS_AAD_SCOPE = f"{AKS_AAD_SERVER_ID}/.default"
"""Scope requested from Azure AD for an AKS API token."""
AZURE_AD_KEY = "azure-ad"
"""Secret data key that switches on Azure AD tokens when it holds "true"."""
AZURE_AD_SCOPE_KEY = "azure-ad-scope"
"""Optional Secret data key overriding the Azure AD scope."""
TOKEN_REFRESH_MARGIN_S = 300.0
"""Refresh an Azure AD token this long before it expires: a request signed with a token
that expires in flight fails, and Azure AD tokens live about an hour."""
REQUEST_TIMEOUT = (5.0, 15.0)
"""(connect, read) seconds for GPU-cluster API calls, so a dead apiserver costs seconds."""


@dataclass(frozen=True)
class ScaleDecision:
    """What one reconcile of one pool found and did."""

    pool: str
    """WorkerPool name."""
    current: int | None
    """spec.replicas of the remote Deployment as read; None when it could not be read."""
    desired: int | None
    """Replica count the autoscaler wants; None when it could not decide (error before reading)."""
    reason: str
    """Human-readable explanation, e.g. "queue 37 / 4 per worker -> 10, capped at max 8", or the error."""
    applied: bool
    """True when a patch changed the remote replica count in this reconcile."""


def desired_replicas(
    spec: ScalingSpec, *, queued: int, in_flight: int, current: int, idle_since: float | None, now: float
) -> tuple[int, str]:
    """The replica count the pool should have, and why.

    - demand = queued + in_flight; target = ceil(demand / targetQueuePerWorker),
      clamped to [minReplicas, maxReplicas].
    - A higher target applies at once (scale-up is never delayed).
    - A lower target while there is demand applies, but never below the number of jobs
      in flight (capped at the current count): Kubernetes, not the operator, picks which
      pods to delete, and any of them may hold one of those jobs, which would then be
      retried elsewhere.
    - With no demand the count holds until demand has been zero for
      scaleDownIdleSeconds (``idle_since`` is when it became zero; None means just now),
      then drops to minReplicas, possibly 0.
    - maxReplicas is a hard cap and minReplicas a hard floor, also for the current count.
    """
    queued = max(0, queued)
    in_flight = max(0, in_flight)
    lo, hi = spec.min_replicas, spec.max_replicas
    per = spec.target_queue_per_worker
    demand = queued + in_flight
    if demand == 0:
        idle_for = max(0.0, now - idle_since) if idle_since is not None else 0.0
        if idle_for >= spec.scale_down_idle_seconds:
            return lo, f"idle for {idle_for:.0f}s >= {spec.scale_down_idle_seconds}s -> min {lo}"
        held = min(max(current, lo), hi)
        reason = f"idle for {idle_for:.0f}s < {spec.scale_down_idle_seconds}s, holding {held}"
        if held != current:
            reason += f" (current {current} outside [{lo}, {hi}])"
        return held, reason
    raw = math.ceil(demand / per)
    target = min(max(raw, lo), hi)
    reason = f"queue {demand} / {per} per worker -> {raw}"
    if in_flight:
        reason = f"queue {demand} ({queued} queued + {in_flight} in flight) / {per} per worker -> {raw}"
    if raw > hi:
        reason += f", capped at max {hi}"
    elif raw < lo:
        reason += f", raised to min {lo}"
    if target < current:
        floor = min(current, in_flight, hi)
        if floor > target:
            return floor, f"{reason}, holding {floor} for {in_flight} in flight"
    return target, reason


# -- GPU-cluster access ---------------------------------------------------------------


class AccessTokenLike(Protocol):
    """azure.core.credentials.AccessToken: a token and its expiry (epoch seconds)."""

    token: str
    expires_on: int


class TokenCredential(Protocol):
    """The part of azure-identity's credentials the autoscaler uses."""

    def get_token(self, *scopes: str) -> AccessTokenLike: ...


def default_credential_factory() -> TokenCredential:
    """DefaultAzureCredential: workload identity in a pod, az CLI or env vars elsewhere."""
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()  # type: ignore[return-value]


class RemoteClusterError(RuntimeError):
    """The GPU cluster's credentials cannot be used (bad kubeconfig, token failure)."""


def _kubelogin_server_id(user: Mapping[str, Any]) -> str | None:
    exec_cfg = user.get("exec")
    if not isinstance(exec_cfg, Mapping):
        return None
    args = [str(a) for a in exec_cfg.get("args") or ()]
    for index, arg in enumerate(args):
        if arg == "--server-id" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--server-id="):
            return arg.split("=", 1)[1]
    return None


def _current_user(config: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
    """(user name, user entry) of the kubeconfig's current context."""
    # A hostile Secret may put anything anywhere: what is not the expected shape counts as
    # absent here, and check_kubeconfig names it afterwards.
    contexts_list = config.get("contexts")
    contexts = {c.get("name"): c.get("context") for c in contexts_list if isinstance(c, Mapping)} \
        if isinstance(contexts_list, list) else {}
    context = contexts.get(config.get("current-context"))
    name = context.get("user") if isinstance(context, Mapping) else None
    users = config.get("users")
    for entry in users if isinstance(users, list) else ():
        if isinstance(entry, Mapping) and entry.get("name") == name:
            user = entry.get("user")
            return name, user if isinstance(user, Mapping) else {}
    return name, {}


def azure_ad_user(config: Mapping[str, Any]) -> bool:
    """Whether the current user is an AKS Azure AD user (kubelogin exec or auth-provider azure)."""
    _, user = _current_user(config)
    exec_cfg = user.get("exec")
    if isinstance(exec_cfg, Mapping) and PurePath(str(exec_cfg.get("command") or "")).name.startswith("kubelogin"):
        return True
    provider = user.get("auth-provider")
    return isinstance(provider, Mapping) and provider.get("name") == "azure"


# What a kubeconfig may hold, per section. An allow-list, not a deny-list: the kubernetes
# client grows new ways to run commands or read files (exec plugins, tokenFile,
# auth-provider plugins that write back to disk), and an entry nobody reviewed is refused.
_ALLOWED_USER_KEYS = frozenset({"token", "client-certificate-data", "client-key-data", "extensions"})
_ALLOWED_CLUSTER_KEYS = frozenset({
    "server", "certificate-authority-data", "tls-server-name", "insecure-skip-tls-verify", "proxy-url",
    "disable-compression", "extensions",
})
_ALLOWED_CONTEXT_KEYS = frozenset({"cluster", "user", "namespace", "extensions"})
# Why each refused entry is dangerous, for the message the pool's owner reads.
_REFUSED_WHY = {
    "exec": "runs a command",
    "auth-provider": "runs a credential plugin",
    "tokenFile": "reads a file",
    "client-certificate": "reads a file",
    "client-key": "reads a file",
    "certificate-authority": "reads a file",
    "username": "is basic authentication",
    "password": "is basic authentication",
}


class UnsafeKubeconfig(RemoteClusterError):
    """A kubeconfig entry that could run a command or read a file in the operator."""

    def __init__(self, entry: str, why: str) -> None:
        super().__init__(
            f"kubeconfig entry {entry} is refused: it {why}; only inline credentials (token, "
            "client-certificate-data, client-key-data, certificate-authority-data) or azure-ad mode are accepted")
        self.entry = entry
        """Where the entry sits, e.g. users[0](gpu).user.exec."""


def _check_section(config: Mapping[str, Any], section: str, inner: str, allowed: frozenset[str]) -> None:
    entries = config.get(section)
    if entries is None:
        return
    if not isinstance(entries, list):
        raise RemoteClusterError(f"kubeconfig {section} must be a list")
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise RemoteClusterError(f"kubeconfig {section}[{index}] must be a mapping")
        where = f"{section}[{index}]({entry.get('name')})"
        extra = sorted(str(k) for k in entry if k not in ("name", inner))
        if extra:
            raise UnsafeKubeconfig(f"{where}.{extra[0]}", "is not a kubeconfig field the operator accepts")
        body = entry.get(inner)
        if body is None:
            continue
        if not isinstance(body, Mapping):
            raise RemoteClusterError(f"kubeconfig {where}.{inner} must be a mapping")
        # Sorted, so the message names the same entry every time.
        for key in sorted(body, key=str):
            if key in allowed:
                continue
            why = _REFUSED_WHY.get(str(key), "is not an entry the operator accepts")
            raise UnsafeKubeconfig(f"{where}.{inner}.{key}", why)


def check_kubeconfig(config: Mapping[str, Any]) -> None:
    """Raise UnsafeKubeconfig naming the first entry that is not an inline credential.

    Every user, cluster and context is checked, not only the current context's: the
    kubernetes client picks what it loads, and nothing in the Secret should be able to
    run a command or read a file whichever it picks.
    """
    _check_section(config, "users", "user", _ALLOWED_USER_KEYS)
    _check_section(config, "clusters", "cluster", _ALLOWED_CLUSTER_KEYS)
    _check_section(config, "contexts", "context", _ALLOWED_CONTEXT_KEYS)


class RemoteCluster:
    """A kubernetes ApiClient for one GPU cluster, built from kubeconfig text.

    Blocking: call its methods from a worker thread. In Azure AD mode the kubeconfig
    user's own credentials are dropped and every request carries a token from the
    credential ``credential_factory`` builds, for ``scope``, fetched on first use and
    again when less than TOKEN_REFRESH_MARGIN_S remain.
    """

    def __init__(
        self,
        kubeconfig: str,
        *,
        azure_ad: bool = False,
        scope: str | None = None,
        credential_factory: Callable[[], TokenCredential] | None = None,
    ) -> None:
        from kubernetes import client
        from kubernetes import config as kube_config
        from kubernetes.config.config_exception import ConfigException

        try:
            parsed = yaml.safe_load(kubeconfig)
        except yaml.YAMLError as exc:
            raise RemoteClusterError(f"kubeconfig is not valid YAML: {exc}") from exc
        if not isinstance(parsed, dict):
            raise RemoteClusterError("kubeconfig is not a YAML mapping")
        self.azure_ad = azure_ad or azure_ad_user(parsed)
        self._credential_factory = credential_factory or default_credential_factory
        self._credential: TokenCredential | None = None
        self._token: str | None = None
        self._expires_on = 0.0
        self._token_lock = threading.Lock()
        self.token_fetches = 0
        """How many tokens were fetched from Azure AD (for status and tests)."""
        user_name, user = _current_user(parsed)
        server_id = _kubelogin_server_id(user)
        self.scope = scope or (f"{server_id}/.default" if server_id else AKS_AAD_SCOPE)
        if self.azure_ad:
            # The kubelogin exec plugin (or auth-provider) would run here otherwise;
            # the operator supplies the same token itself.
            users = parsed.get("users")
            if isinstance(users, list):  # anything else is left for check_kubeconfig to name
                parsed = dict(parsed)
                parsed["users"] = [
                    {"name": e.get("name"), "user": {}} if isinstance(e, Mapping) and e.get("name") == user_name else e
                    for e in users
                ]
        # After the Azure AD user is dropped, before the client reads anything: the client
        # would run an exec plugin or open a file while it loads the config.
        check_kubeconfig(parsed)
        try:
            self.api_client: ApiClient = kube_config.new_client_from_config_dict(parsed, persist_config=False)
        except (ConfigException, KeyError, TypeError, ValueError, OSError) as exc:
            raise RemoteClusterError(f"kubeconfig cannot be used: {exc}") from exc
        configuration = self.api_client.configuration
        # One retry at most: the reconcile loop retries anyway, and urllib3's default
        # three retries multiply the wait on a dead apiserver.
        configuration.retries = 1
        if self.azure_ad:
            configuration.api_key.pop("authorization", None)
            configuration.api_key["BearerToken"] = "Bearer "
            configuration.refresh_api_key_hook = self._refresh_token
        self._apps = client.AppsV1Api(self.api_client)

    @property
    def host(self) -> str:
        return str(self.api_client.configuration.host)

    def _refresh_token(self, configuration: Configuration) -> None:
        # Called by the client before each request; the lock keeps two threads from
        # fetching at once.
        with self._token_lock:
            if self._token is None or self._expires_on - time.time() < TOKEN_REFRESH_MARGIN_S:
                try:
                    if self._credential is None:
                        self._credential = self._credential_factory()
                    access = self._credential.get_token(self.scope)
                except Exception as exc:
                    # azure-identity raises ClientAuthenticationError and friends, and a
                    # credential factory may raise anything; the request must not go out
                    # unauthenticated, and the reconcile boundary reports the reason.
                    raise RemoteClusterError(f"Azure AD token for {self.scope}: {exc}") from exc
                self._token = access.token
                self._expires_on = float(access.expires_on)
                self.token_fetches += 1
                log.info("fetched Azure AD token for %s, expires in %.0fs", self.host, self._expires_on - time.time())
            configuration.api_key["BearerToken"] = f"Bearer {self._token}"

    def invalidate_token(self) -> None:
        """Forget the cached Azure AD token, e.g. after the apiserver answered 401."""
        with self._token_lock:
            self._token = None

    def get_scale(self, namespace: str, name: str) -> int:
        """spec.replicas of the Deployment, read through its scale subresource."""
        scale = self._apps.read_namespaced_deployment_scale(name, namespace, _request_timeout=REQUEST_TIMEOUT)
        return int(scale.spec.replicas or 0) if scale.spec is not None else 0

    def patch_scale(self, namespace: str, name: str, replicas: int) -> int:
        """Patch the Deployment's scale subresource; returns spec.replicas as written."""
        scale = self._apps.patch_namespaced_deployment_scale(
            name, namespace, {"spec": {"replicas": replicas}}, _request_timeout=REQUEST_TIMEOUT
        )
        return int(scale.spec.replicas or 0) if scale.spec is not None else 0

    def close(self) -> None:
        self.api_client.close()


# -- the reconcile loop's boundary ----------------------------------------------------


def _decode(data: Mapping[str, str], key: str, where: str) -> str:
    try:
        return base64.b64decode(data[key], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise RemoteClusterError(f"{where} key {key!r} is not base64-encoded UTF-8 text") from exc


def _describe_error(exc: BaseException) -> str:
    """A short reason for a failed remote call, without secrets."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, ApiException):
        detail = ""
        try:
            detail = str(json.loads(exc.body or "{}").get("message") or "")
        except (ValueError, AttributeError):
            detail = ""
        return f"GPU cluster API answered {exc.status} {exc.reason}" + (f": {detail}" if detail else "")
    if isinstance(exc, Urllib3Error):
        return f"GPU cluster API unreachable: {exc}"
    if isinstance(exc, RemoteClusterError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


@dataclass
class _PoolState:
    idle_since: float | None = None
    last_attempt: float | None = None
    cluster: RemoteCluster | None = None
    fingerprint: str | None = None


class Autoscaler:
    """Scales each pool's remote worker Deployment; one instance per operator.

    ``read_secret(namespace, name)`` returns a Secret's base64 ``data`` (the engine
    passes ``Kube.read_secret_data``); it is called in a worker thread.
    ``credential_factory`` builds the Azure AD credential (default
    DefaultAzureCredential). Each pool talks to its GPU cluster at most once per
    ``min_interval_s``; calls in between only track idleness and return None.
    """

    def __init__(
        self,
        read_secret: Callable[[str, str], dict[str, str]],
        *,
        min_interval_s: float = 5.0,
        credential_factory: Callable[[], TokenCredential] | None = None,
    ) -> None:
        self._read_secret = read_secret
        self.min_interval_s = min_interval_s
        self._credential_factory = credential_factory
        self._pools: dict[str, _PoolState] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def remote(self, pool: str) -> RemoteCluster | None:
        """The cached GPU-cluster client of a pool, if one was built."""
        state = self._pools.get(pool)
        return state.cluster if state is not None else None

    async def reconcile(
        self, pool_name: str, scaling: ScalingSpec, *, queued: int, in_flight: int, now: float
    ) -> ScaleDecision | None:
        """One autoscaling step for ``pool_name``; None when rate-limited (nothing was read).

        ``now`` is a monotonic clock reading (the engine's tick time); idleness and the
        rate limit are measured on it. Never raises for remote or credential problems:
        those come back as ``applied=False`` with the reason.
        """
        state = self._pools.setdefault(pool_name, _PoolState())
        # Idleness is tracked on every call, also rate-limited ones, so the idle clock
        # starts when demand really reached zero.
        if queued + in_flight > 0:
            state.idle_since = None
        elif state.idle_since is None:
            state.idle_since = now
        if state.last_attempt is not None and now - state.last_attempt < self.min_interval_s:
            return None
        lock = self._locks.setdefault(pool_name, asyncio.Lock())
        if lock.locked():
            # A previous step is still talking to the GPU cluster (slow apiserver).
            return None
        async with lock:
            state.last_attempt = now
            return await self._step(pool_name, state, scaling, queued=queued, in_flight=in_flight, now=now)

    async def _step(
        self, pool: str, state: _PoolState, scaling: ScalingSpec, *, queued: int, in_flight: int, now: float
    ) -> ScaleDecision:
        from kubernetes.client.exceptions import ApiException

        namespace, name = scaling.deployment_namespace, scaling.deployment_name
        current: int | None = None
        desired: int | None = None
        try:
            cluster = await self._cluster(state, scaling)
            current = await asyncio.to_thread(cluster.get_scale, namespace, name)
            desired, reason = desired_replicas(
                scaling, queued=queued, in_flight=in_flight, current=current, idle_since=state.idle_since, now=now
            )
            if desired == current:
                return ScaleDecision(pool, current, desired, reason, applied=False)
            written = await asyncio.to_thread(cluster.patch_scale, namespace, name, desired)
        except Exception as exc:
            # The boundary this module promises: remote API down, bad kubeconfig,
            # missing Secret (whatever read_secret raises), RBAC refusal, Azure AD
            # failure. The engine keeps running; the reason goes to the pool.
            if isinstance(exc, ApiException) and exc.status == 401 and state.cluster is not None:
                state.cluster.invalidate_token()
            reason = _describe_error(exc)
            log.warning("autoscaling pool %s (%s/%s): %s", pool, namespace, name, reason)
            return ScaleDecision(pool, current, desired, reason, applied=False)
        log.info("pool %s: scaled %s/%s from %d to %d (%s)", pool, namespace, name, current, written, reason)
        return ScaleDecision(pool, current, written, reason, applied=True)

    async def _cluster(self, state: _PoolState, scaling: ScalingSpec) -> RemoteCluster:
        secret_ns, secret_name = scaling.kubeconfig_secret
        where = f"Secret {secret_ns}/{secret_name}"
        data = await asyncio.to_thread(self._read_secret, secret_ns, secret_name)
        if scaling.kubeconfig_key not in data:
            raise RemoteClusterError(f"{where} has no key {scaling.kubeconfig_key!r} (keys: {sorted(data)})")
        # Only a digest is kept, so the Secret's content does not linger in memory twice.
        fingerprint = hashlib.sha256(
            json.dumps({"key": scaling.kubeconfig_key, "data": dict(data)}, sort_keys=True).encode()
        ).hexdigest()
        if state.cluster is not None and state.fingerprint == fingerprint:
            return state.cluster
        kubeconfig = _decode(data, scaling.kubeconfig_key, where)
        azure_ad = AZURE_AD_KEY in data and _decode(data, AZURE_AD_KEY, where).strip().lower() == "true"
        scope = _decode(data, AZURE_AD_SCOPE_KEY, where).strip() if AZURE_AD_SCOPE_KEY in data else None
        try:
            cluster = await asyncio.to_thread(
                RemoteCluster, kubeconfig, azure_ad=azure_ad, scope=scope or None,
                credential_factory=self._credential_factory,
            )
        except RemoteClusterError as exc:
            raise RemoteClusterError(f"{where} key {scaling.kubeconfig_key!r}: {exc}") from exc
        old, state.cluster, state.fingerprint = state.cluster, cluster, fingerprint
        if old is not None:
            old.close()
        return cluster

    def forget(self, pool: str) -> None:
        """Drop a pool's state and client (the WorkerPool or its scaling was removed)."""
        state = self._pools.pop(pool, None)
        self._locks.pop(pool, None)
        if state is not None and state.cluster is not None:
            state.cluster.close()

    def close(self) -> None:
        """Close every GPU-cluster client."""
        for pool in list(self._pools):
            self.forget(pool)
