"""The GPU cluster's API client for remote autoscaling, and what its credentials may be.

A WorkerPool with ``spec.scaling`` names a Secret (in the management cluster) holding a
kubeconfig for the GPU cluster; :func:`cluster_from_secret` turns that Secret's data into
a :class:`RemoteCluster`, which reads and patches the worker Deployment's ``apps/v1``
``deployments/scale`` subresource. Its methods block: callers run them in worker threads.

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
  above. An optional ``azure-ad-scope`` key overrides the scope; otherwise kubelogin's
  ``--server-id`` is used when present.

Every problem (bad kubeconfig, refused entry, token failure) is a
:class:`RemoteClusterError`; :func:`describe_error` turns it, or a failed API call, into
the short reason the pool's owner reads.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Protocol

import yaml

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


# -- from the Secret ----------------------------------------------------------------


def _decode(data: Mapping[str, str], key: str, where: str) -> str:
    try:
        return base64.b64decode(data[key], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise RemoteClusterError(f"{where} key {key!r} is not base64-encoded UTF-8 text") from exc


def cluster_from_secret(
    data: Mapping[str, str], kubeconfig_key: str, where: str,
    *, credential_factory: Callable[[], TokenCredential] | None = None,
) -> RemoteCluster:
    """The RemoteCluster a kubeconfig Secret's base64 ``data`` describes.

    ``kubeconfig_key`` holds the kubeconfig; the optional AZURE_AD_KEY and
    AZURE_AD_SCOPE_KEY select Azure AD mode and its scope. Blocking (the kubernetes
    client is built here). ``where`` names the Secret in every error.
    """
    if kubeconfig_key not in data:
        raise RemoteClusterError(f"{where} has no key {kubeconfig_key!r} (keys: {sorted(data)})")
    kubeconfig = _decode(data, kubeconfig_key, where)
    azure_ad = AZURE_AD_KEY in data and _decode(data, AZURE_AD_KEY, where).strip().lower() == "true"
    scope = _decode(data, AZURE_AD_SCOPE_KEY, where).strip() if AZURE_AD_SCOPE_KEY in data else None
    try:
        return RemoteCluster(kubeconfig, azure_ad=azure_ad, scope=scope or None, credential_factory=credential_factory)
    except RemoteClusterError as exc:
        raise RemoteClusterError(f"{where} key {kubeconfig_key!r}: {exc}") from exc


def is_unauthorized(exc: BaseException) -> bool:
    """Whether a failed call was the GPU apiserver answering 401 (a stale or revoked token)."""
    from kubernetes.client.exceptions import ApiException

    return isinstance(exc, ApiException) and exc.status == 401


def describe_error(exc: BaseException) -> str:
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
