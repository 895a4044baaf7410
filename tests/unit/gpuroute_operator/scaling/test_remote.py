"""The GPU cluster client: Azure AD detection and scope, and hostile kubeconfigs refused
before the kubernetes client sees them (nothing runs, nothing is read)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from gpuroute_operator.scaling.remote import (
    AKS_AAD_SCOPE,
    AKS_AAD_SERVER_ID,
    RemoteCluster,
    RemoteClusterError,
    UnsafeKubeconfig,
    azure_ad_user,
    check_kubeconfig,
)
from tests.unit.gpuroute_operator.scaling.kubeconfigs import (
    CA,
    SERVER,
    exec_marker_kubeconfig,
    gpu_kubeconfig,
    hostile,
)

# -- Azure AD detection ---------------------------------------------------------------


def test_azure_ad_user_detects_kubelogin_and_auth_provider() -> None:
    kubelogin = {"exec": {"command": "/usr/local/bin/kubelogin", "args": ["get-token", "--server-id", "x"]}}
    assert azure_ad_user(gpu_kubeconfig(kubelogin))
    assert azure_ad_user(gpu_kubeconfig({"auth-provider": {"name": "azure"}}))
    assert not azure_ad_user(gpu_kubeconfig({"token": "abc"}))
    assert not azure_ad_user(gpu_kubeconfig({"exec": {"command": "aws", "args": ["eks", "get-token"]}}))


def _kubelogin(server_id: str) -> str:
    return yaml.safe_dump(gpu_kubeconfig({"exec": {"command": "kubelogin", "args": ["get-token", "--server-id",
                                                                                     server_id]}}))


def test_azure_ad_scope_is_the_aks_one_by_default() -> None:
    for cluster in (RemoteCluster(yaml.safe_dump(gpu_kubeconfig({})), azure_ad=True, api_server=SERVER),
                    RemoteCluster(_kubelogin(AKS_AAD_SERVER_ID), api_server=SERVER),
                    RemoteCluster(_kubelogin(AKS_AAD_SERVER_ID.upper()), api_server=SERVER),
                    RemoteCluster(yaml.safe_dump(gpu_kubeconfig({})), azure_ad=True, api_server=SERVER,
                                  scope=AKS_AAD_SCOPE)):
        try:
            assert cluster.azure_ad and cluster.scope == AKS_AAD_SCOPE
        finally:
            cluster.close()


def test_azure_ad_scope_from_kubelogin_server_id_is_refused_unless_the_operator_allows_it() -> None:
    # A storage scope: the operator's token for it would open its storage accounts to the listener.
    with pytest.raises(RemoteClusterError, match=r"kubelogin --server-id of kubeconfig user 'u' names Azure AD "
                                                 r"scope 'https://storage\.azure\.com/\.default', which is refused"):
        RemoteCluster(_kubelogin("https://storage.azure.com"), api_server=SERVER)
    with pytest.raises(RemoteClusterError, match=r"--server-id .* 'abc/\.default', which is refused"):
        RemoteCluster(_kubelogin("abc"), api_server=SERVER)
    cluster = RemoteCluster(_kubelogin("abc"), api_server=SERVER, allowed_scopes=frozenset({"abc/.default"}))
    try:
        assert cluster.azure_ad and cluster.scope == "abc/.default"
    finally:
        cluster.close()


def test_azure_ad_scope_argument_is_held_to_the_same_rule() -> None:
    kubeconfig = yaml.safe_dump(gpu_kubeconfig({}))
    with pytest.raises(RemoteClusterError, match=r"azure-ad-scope.*'https://vault\.azure\.net/\.default'"):
        RemoteCluster(kubeconfig, azure_ad=True, api_server=SERVER, scope="https://vault.azure.net/.default")
    cluster = RemoteCluster(kubeconfig, azure_ad=True, api_server=SERVER, scope="api://x/.default",
                            allowed_scopes=frozenset({"api://x/.default"}))
    try:
        assert cluster.scope == "api://x/.default"
    finally:
        cluster.close()


@pytest.mark.parametrize(("kubeconfig", "azure_ad"), [
    (yaml.safe_dump(gpu_kubeconfig({})), True),
    (_kubelogin(AKS_AAD_SERVER_ID), False),
    (yaml.safe_dump(gpu_kubeconfig({"auth-provider": {"name": "azure"}})), False),
], ids=["azure-ad key", "kubelogin", "auth-provider azure"])
def test_azure_ad_mode_needs_a_pinned_api_server(kubeconfig: str, azure_ad: bool) -> None:
    with pytest.raises(RemoteClusterError, match=r"Azure AD mode needs spec\.scaling\.apiServer"):
        RemoteCluster(kubeconfig, azure_ad=azure_ad)


# -- the pinned API server -------------------------------------------------------------


@pytest.mark.parametrize("azure_ad", [False, True], ids=["static token", "azure-ad"])
def test_a_server_other_than_the_pinned_one_is_refused(azure_ad: bool) -> None:
    config = gpu_kubeconfig({"token": "t"})
    config["clusters"][0]["cluster"]["server"] = "https://listener.example:443"
    with pytest.raises(RemoteClusterError, match=r"kubeconfig server 'https://listener\.example:443' of the "
                                                 r"current context is not spec\.scaling\.apiServer "
                                                 r"'https://aks\.example:443'"):
        RemoteCluster(yaml.safe_dump(config), azure_ad=azure_ad, api_server=SERVER)
    # The pinned server is the current context's: another context naming it does not help.
    config["clusters"].append({"name": "pinned", "cluster": {"server": SERVER}})
    config["contexts"].append({"name": "other", "context": {"cluster": "pinned", "user": "u"}})
    with pytest.raises(RemoteClusterError, match=r"not spec\.scaling\.apiServer"):
        RemoteCluster(yaml.safe_dump(config), azure_ad=azure_ad, api_server=SERVER)


def test_the_pinned_server_in_another_spelling_is_accepted() -> None:
    cluster = RemoteCluster(yaml.safe_dump(gpu_kubeconfig({"token": "t"})), api_server="https://AKS.example/")
    try:
        assert cluster.host == SERVER
    finally:
        cluster.close()


# -- hostile kubeconfigs: nothing runs, nothing is read --------------------------------


HOSTILE = [
    # (case, kubeconfig, entry the message must name)
    ("exec plugin", hostile({"exec": {"command": "sh", "args": ["-c", "id"], "apiVersion":
                                       "client.authentication.k8s.io/v1beta1"}}), "users[0](u).user.exec"),
    ("exec beside a token", hostile({"token": "t", "exec": {"command": "sh"}}), "users[0](u).user.exec"),
    ("aws eks exec", hostile({"exec": {"command": "aws", "args": ["eks", "get-token"]}}), "users[0](u).user.exec"),
    ("gcp auth-provider", hostile({"auth-provider": {"name": "gcp", "config": {"cmd-path": "/bin/sh"}}}),
     "users[0](u).user.auth-provider"),
    ("oidc auth-provider", hostile({"auth-provider": {"name": "oidc", "config": {"idp-issuer-url": "x"}}}),
     "users[0](u).user.auth-provider"),
    ("tokenFile", hostile({"tokenFile": "/var/run/secrets/kubernetes.io/serviceaccount/token"}),
     "users[0](u).user.tokenFile"),
    ("client-certificate path", hostile({"client-certificate": "/etc/gpuroute/curve/server.key_secret",
                                          "client-key-data": "a2V5"}), "users[0](u).user.client-certificate"),
    ("client-key path", hostile({"client-certificate-data": "Y2VydA==", "client-key": "/etc/shadow"}),
     "users[0](u).user.client-key"),
    ("certificate-authority path", hostile(cluster={"certificate-authority": "/etc/passwd"}),
     "clusters[0](c).cluster.certificate-authority"),
    ("basic auth", hostile({"username": "admin", "password": "pw"}), "users[0](u).user.password"),
    ("unknown user entry", hostile({"token": "t", "as": "system:admin"}), "users[0](u).user.as"),
    ("exec in a user the context does not use",
     hostile(users=[{"name": "u", "user": {"token": "t"}}, {"name": "evil", "user": {"exec": {"command": "sh"}}}]),
     "users[1](evil).user.exec"),
    ("exec at the entry level", hostile(users=[{"name": "u", "user": {"token": "t"}, "exec": {"command": "sh"}}]),
     "users[0](u).exec"),
    ("unknown context entry", hostile(context={"exec": {"command": "sh"}}), "contexts[0](ctx).context.exec"),
    # Where the credentials go: only over verified TLS, straight to an https server.
    ("http server", hostile(cluster={"server": "http://aks.example:80"}), "clusters[0](c).cluster.server"),
    ("http server in uppercase", hostile(cluster={"server": "HTTP://aks.example"}), "clusters[0](c).cluster.server"),
    ("server without a scheme", hostile(cluster={"server": "aks.example:443"}), "clusters[0](c).cluster.server"),
    ("proxy-url", hostile(cluster={"proxy-url": "http://listener.example:3128"}), "clusters[0](c).cluster.proxy-url"),
    ("insecure-skip-tls-verify", hostile(cluster={"insecure-skip-tls-verify": True}),
     "clusters[0](c).cluster.insecure-skip-tls-verify"),
    # The kubernetes client reads `not "false"`, which turns the check off.
    ("insecure-skip-tls-verify as a string", hostile(cluster={"insecure-skip-tls-verify": "false"}),
     "clusters[0](c).cluster.insecure-skip-tls-verify"),
    ("http server in a cluster the context does not use",
     hostile(clusters=[{"name": "c", "cluster": {"server": SERVER}},
                       {"name": "plain", "cluster": {"server": "http://listener.example"}}]),
     "clusters[1](plain).cluster.server"),
]


@pytest.mark.parametrize(("case", "config", "entry"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_kubeconfig_is_refused_naming_the_entry(case: str, config: dict[str, Any], entry: str) -> None:
    with pytest.raises(UnsafeKubeconfig) as raised:
        check_kubeconfig(config)
    assert raised.value.entry == entry
    assert entry in str(raised.value)
    with pytest.raises(UnsafeKubeconfig, match=re.escape(entry)):
        RemoteCluster(yaml.safe_dump(config)).close()


@pytest.mark.parametrize("shape", [
    {"users": {"u": {"exec": {"command": "sh"}}}},
    {"users": ["exec"]},
    {"users": [{"name": "u", "user": "exec"}]},
    {"contexts": "ctx"},
    {"contexts": [{"name": "ctx", "context": ["user", "u"]}]},
])
def test_malformed_kubeconfig_is_an_error_not_a_crash(shape: dict[str, Any]) -> None:
    config = hostile(**shape)
    with pytest.raises(RemoteClusterError):
        RemoteCluster(yaml.safe_dump(config)).close()


def test_inline_credentials_are_accepted() -> None:
    accepted = [
        hostile({"token": "t"}, cluster={"certificate-authority-data": CA}),
        hostile({"client-certificate-data": "Y2VydA==", "client-key-data": "a2V5"}),
        hostile({}, cluster={"insecure-skip-tls-verify": False, "tls-server-name": "gpu", "proxy-url": ""}),
        hostile({}, cluster={"server": "https://[::1]:6443/k8s/clusters/c-1"}),
        hostile(context={"namespace": "ops"}, preferences={}, apiVersion="v1", kind="Config"),
    ]
    for config in accepted:
        check_kubeconfig(config)


def test_azure_ad_mode_drops_the_exec_user_unrun(tmp_path: Any) -> None:
    marker = tmp_path / "ran"
    # Named like kubelogin, so it selects azure-ad mode; it would leave a marker if run.
    script = tmp_path / "kubelogin"
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    config = hostile({"exec": {"command": str(script), "apiVersion": "client.authentication.k8s.io/v1beta1",
                                "args": ["get-token", "--server-id", "srv"]}})
    cluster = RemoteCluster(yaml.safe_dump(config), api_server=SERVER, allowed_scopes=frozenset({"srv/.default"}))
    try:
        assert cluster.azure_ad and cluster.scope == "srv/.default"
    finally:
        cluster.close()
    assert not marker.exists()
    # The same exec in a second user is not the Azure AD user: refused, still not run.
    config["users"].append({"name": "other", "user": {"exec": {"command": str(script)}}})
    with pytest.raises(UnsafeKubeconfig, match=r"users\[1\]\(other\)\.user\.exec"):
        RemoteCluster(yaml.safe_dump(config), api_server=SERVER, allowed_scopes=frozenset({"srv/.default"}))
    assert not marker.exists()


def test_the_exec_kubeconfig_really_runs_without_the_check(tmp_path: Any) -> None:
    # The control for the test below: the kubernetes client itself does run the command.
    from kubernetes import config as kube_config

    config, marker = exec_marker_kubeconfig(tmp_path)
    kube_config.new_client_from_config_dict(config, persist_config=False).close()
    assert marker.exists()
