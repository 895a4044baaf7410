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
- Every cluster's ``server`` must be an ``https://`` URL, and ``proxy-url`` (other than
  empty) and ``insecure-skip-tls-verify`` (other than false) are refused, in every mode:
  a static token and the operator's Azure AD token alike go only over verified TLS,
  straight to the API server.
- ``spec.scaling.apiServer`` on the WorkerPool (admin-owned, unlike the Secret) pins the
  API server: when it is set, the current context's cluster must name that server.
- Azure AD (AKS with Entra ID authentication): the operator fetches the bearer token
  itself with azure-identity's ``DefaultAzureCredential`` (in a pod with workload
  identity, the federated token of the operator's ServiceAccount) for the AKS server
  application, scope ``6dae42f8-4368-4678-94ff-3960e28e3630/.default``, and refreshes it
  before it expires. Azure AD mode is on when the Secret has ``azure-ad: "true"``, or when
  the kubeconfig user is the one ``az aks get-credentials`` writes for such clusters (an
  ``exec`` plugin running ``kubelogin``, or the legacy ``auth-provider: azure``): the
  operator image has no kubelogin, and the token it would produce is the same. That user
  entry is dropped unread, so its command never runs; every other entry is checked as
  above. The token is the operator's own, so the Secret neither picks where it goes nor
  what it is good for: Azure AD mode requires ``spec.scaling.apiServer``, and a scope the
  Secret names (the ``azure-ad-scope`` key, or kubelogin's ``--server-id``) other than the
  AKS one is refused unless the operator's own configuration allows it
  (``--scaling-azure-ad-scope``, EngineConfig.scaling_azure_ad_scopes); a storage or Key
  Vault token never leaves for a listener the Secret chose.

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

from gpuroute_operator.core.scaling_spec import normalise_api_server

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
"""Optional Secret data key naming the Azure AD scope: honoured only when it is the AKS one
or in the operator's own allow-list (:func:`azure_ad_scope`)."""
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
_INLINE_ONLY = ("only inline credentials (token, client-certificate-data, client-key-data, "
                "certificate-authority-data) or azure-ad mode are accepted")
_VERIFIED_TLS_ONLY = "the operator sends credentials only over verified TLS (https), straight to the API server"
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
    """A kubeconfig entry that could run a command or read a file in the operator, or send
    its credentials anywhere but over verified TLS to the API server."""

    def __init__(self, entry: str, why: str, accepted: str = _INLINE_ONLY) -> None:
        super().__init__(f"kubeconfig entry {entry} is refused: it {why}; {accepted}")
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


def _check_transport(config: Mapping[str, Any]) -> None:
    """Every cluster's server is https, verified, and reached without a proxy."""
    # Shapes were checked by _check_section before.
    for index, entry in enumerate(config.get("clusters") or ()):
        body = entry.get("cluster") or {}
        where = f"clusters[{index}]({entry.get('name')}).cluster"
        # Both keys stay on the allow-list for their harmless values (false, empty), which
        # some tools write out; the kubernetes client reads any other value as "on".
        if body.get("insecure-skip-tls-verify", False) is not False:
            raise UnsafeKubeconfig(f"{where}.insecure-skip-tls-verify",
                                   "turns off the check of the API server's certificate", _VERIFIED_TLS_ONLY)
        if body.get("proxy-url") not in (None, ""):
            raise UnsafeKubeconfig(f"{where}.proxy-url", "sends every request, credentials included, through a "
                                   "proxy the Secret chooses", _VERIFIED_TLS_ONLY)
        server = body.get("server")
        if server is None:
            continue  # the kubernetes client refuses a cluster without one
        # The kubernetes client loads the CA only for a server spelled "https..." exactly.
        if not isinstance(server, str) or not server.startswith("https://"):
            raise UnsafeKubeconfig(f"{where}.server", f"is {server!r}, not an https:// URL", _VERIFIED_TLS_ONLY)
        try:
            normalise_api_server(server)
        except ValueError as exc:
            raise UnsafeKubeconfig(f"{where}.server", f"is not a usable https URL ({exc})", _VERIFIED_TLS_ONLY) from exc


def check_kubeconfig(config: Mapping[str, Any]) -> None:
    """Raise UnsafeKubeconfig naming the first entry that is not an inline credential, or
    that would send credentials other than over verified TLS straight to an https server
    (``http://`` servers, ``proxy-url``, ``insecure-skip-tls-verify``).

    Every user, cluster and context is checked, not only the current context's: the
    kubernetes client picks what it loads, and nothing in the Secret should be able to
    run a command, read a file or divert a credential whichever it picks. The transport
    rules hold in every mode: a static token or the operator's Azure AD token travel the
    same way.
    """
    _check_section(config, "users", "user", _ALLOWED_USER_KEYS)
    _check_section(config, "clusters", "cluster", _ALLOWED_CLUSTER_KEYS)
    _check_section(config, "contexts", "context", _ALLOWED_CONTEXT_KEYS)
    _check_transport(config)


def _current_server(config: Mapping[str, Any]) -> object:
    """The ``server`` of the current context's cluster, as the kubernetes client picks it;
    None when there is none. Call after check_kubeconfig (shapes checked)."""
    contexts = {c.get("name"): c.get("context") or {} for c in config.get("contexts") or ()}
    context = contexts.get(config.get("current-context"))
    if context is None:
        return None
    clusters = [c.get("cluster") or {} for c in config.get("clusters") or () if c.get("name") == context.get("cluster")]
    # Two clusters of one name: the kubernetes client refuses them, so does this check.
    return clusters[0].get("server") if len(clusters) == 1 else None


def azure_ad_scope(named: str | None, origin: str, allowed: frozenset[str]) -> str:
    """The scope the operator asks Azure AD for when the Secret names ``named`` (None: names none).

    The token is the operator's own, so the Secret does not choose what it is good for: the
    AKS server application's scope (any case of its id), or one the operator's own
    configuration lists in ``allowed``. Anything else (a storage, Key Vault or management
    scope) is refused with RemoteClusterError naming ``origin``, where the Secret named it.
    """
    if named is None or named.lower() == AKS_AAD_SCOPE:
        return AKS_AAD_SCOPE
    if named in allowed:
        return named
    raise RemoteClusterError(
        f"{origin} names Azure AD scope {named!r}, which is refused: the operator requests its own Azure AD "
        f"token only for the AKS server application ({AKS_AAD_SCOPE}) or a scope its own configuration allows "
        "(--scaling-azure-ad-scope), never for one a Secret chooses")


class RemoteCluster:
    """A kubernetes ApiClient for one GPU cluster, built from kubeconfig text.

    Blocking: call its methods from a worker thread. In Azure AD mode the kubeconfig
    user's own credentials are dropped and every request carries a token from the
    credential ``credential_factory`` builds, fetched on first use and again when less
    than TOKEN_REFRESH_MARGIN_S remain, for the scope :func:`azure_ad_scope` picks from
    ``scope`` (what the Secret's azure-ad-scope key names) or kubelogin's ``--server-id``
    and the operator's ``allowed_scopes``.

    ``api_server`` (the WorkerPool's spec.scaling.apiServer) pins the API server: the
    current context's cluster must name it. Azure AD mode requires it, so the
    operator's own token never goes to a server only the Secret chose.
    """

    def __init__(
        self,
        kubeconfig: str,
        *,
        azure_ad: bool = False,
        scope: str | None = None,
        allowed_scopes: frozenset[str] = frozenset(),
        api_server: str | None = None,
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
        self.scope = AKS_AAD_SCOPE
        """The scope Azure AD tokens are requested for (used in Azure AD mode only)."""
        if self.azure_ad:
            if api_server is None:
                raise RemoteClusterError(
                    "Azure AD mode needs spec.scaling.apiServer on the WorkerPool: the operator sends its own "
                    "Azure AD token only to the API server the pool pins, not to one the Secret names")
            if scope:
                self.scope = azure_ad_scope(scope, f"the Secret key {AZURE_AD_SCOPE_KEY!r}", allowed_scopes)
            else:
                server_id = _kubelogin_server_id(user)
                self.scope = azure_ad_scope(f"{server_id}/.default" if server_id else None,
                                            f"kubelogin --server-id of kubeconfig user {user_name!r}", allowed_scopes)
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
            pinned = normalise_api_server(api_server) if api_server is not None else None
        except ValueError as exc:  # parse_scaling refuses it already; this is for direct callers
            raise RemoteClusterError(f"spec.scaling.apiServer: {exc}") from exc
        if pinned is not None:
            server = _current_server(parsed)
            if not isinstance(server, str) or normalise_api_server(server) != pinned:
                raise RemoteClusterError(
                    f"kubeconfig server {server!r} of the current context is not spec.scaling.apiServer "
                    f"{api_server!r}: the operator talks only to the API server the WorkerPool pins")
        try:
            self.api_client: ApiClient = kube_config.new_client_from_config_dict(parsed, persist_config=False)
        except (ConfigException, KeyError, TypeError, ValueError, OSError) as exc:
            raise RemoteClusterError(f"kubeconfig cannot be used: {exc}") from exc
        configuration = self.api_client.configuration
        # The client's own reading of the kubeconfig, checked again: the rules above are
        # about where credentials go, and what counts is where the client sends them. (A
        # proxy from the operator's own environment, HTTPS_PROXY, is the admin's choice.)
        try:
            host_ok = pinned is None or normalise_api_server(str(configuration.host)) == pinned
        except ValueError:
            host_ok = False
        if not host_ok or not configuration.verify_ssl:
            self.api_client.close()
            raise RemoteClusterError(f"kubeconfig resolves to {configuration.host!r}"
                                     + ("" if configuration.verify_ssl else " without certificate checks")
                                     + ("" if host_ok else f", not spec.scaling.apiServer {api_server!r}"))
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
    *, api_server: str | None = None, allowed_scopes: frozenset[str] = frozenset(),
    credential_factory: Callable[[], TokenCredential] | None = None,
) -> RemoteCluster:
    """The RemoteCluster a kubeconfig Secret's base64 ``data`` describes.

    ``kubeconfig_key`` holds the kubeconfig; the optional AZURE_AD_KEY and
    AZURE_AD_SCOPE_KEY select Azure AD mode and its scope. ``api_server`` (the WorkerPool's
    spec.scaling.apiServer) and ``allowed_scopes`` (the operator's configuration) are
    what the Secret may not change. Blocking (the kubernetes client is built here).
    ``where`` names the Secret in every error.
    """
    if kubeconfig_key not in data:
        raise RemoteClusterError(f"{where} has no key {kubeconfig_key!r} (keys: {sorted(data)})")
    kubeconfig = _decode(data, kubeconfig_key, where)
    azure_ad = AZURE_AD_KEY in data and _decode(data, AZURE_AD_KEY, where).strip().lower() == "true"
    scope = _decode(data, AZURE_AD_SCOPE_KEY, where).strip() if AZURE_AD_SCOPE_KEY in data else None
    # Checked here, in any mode, so the message names the key rather than the kubeconfig.
    if scope:
        azure_ad_scope(scope, f"{where} key {AZURE_AD_SCOPE_KEY!r}", allowed_scopes)
    try:
        return RemoteCluster(kubeconfig, azure_ad=azure_ad, scope=scope or None, allowed_scopes=allowed_scopes,
                             api_server=api_server, credential_factory=credential_factory)
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
