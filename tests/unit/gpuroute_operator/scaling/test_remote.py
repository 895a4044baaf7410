"""The GPU cluster client: Azure AD detection and scope, and hostile kubeconfigs refused
before the kubernetes client sees them (nothing runs, nothing is read)."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from gpuroute_operator.scaling.remote import (
    AKS_AAD_SCOPE,
    RemoteCluster,
    RemoteClusterError,
    UnsafeKubeconfig,
    azure_ad_user,
    check_kubeconfig,
)
from tests.unit.gpuroute_operator.scaling.kubeconfigs import CA, exec_marker_kubeconfig, gpu_kubeconfig, hostile

# -- Azure AD detection ---------------------------------------------------------------


def test_azure_ad_user_detects_kubelogin_and_auth_provider() -> None:
    kubelogin = {"exec": {"command": "/usr/local/bin/kubelogin", "args": ["get-token", "--server-id", "x"]}}
    assert azure_ad_user(gpu_kubeconfig(kubelogin))
    assert azure_ad_user(gpu_kubeconfig({"auth-provider": {"name": "azure"}}))
    assert not azure_ad_user(gpu_kubeconfig({"token": "abc"}))
    assert not azure_ad_user(gpu_kubeconfig({"exec": {"command": "aws", "args": ["eks", "get-token"]}}))


def test_remote_cluster_scope_from_kubelogin_server_id() -> None:
    cluster = RemoteCluster(yaml.safe_dump(gpu_kubeconfig(
        {"exec": {"command": "kubelogin", "args": ["get-token", "--server-id", "abc"]}}
    )))
    try:
        assert cluster.azure_ad and cluster.scope == "abc/.default"
    finally:
        cluster.close()
    cluster = RemoteCluster(yaml.safe_dump(gpu_kubeconfig({})), azure_ad=True)
    try:
        assert cluster.scope == AKS_AAD_SCOPE
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
        hostile({}, cluster={"insecure-skip-tls-verify": True, "tls-server-name": "gpu", "proxy-url": ""}),
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
    cluster = RemoteCluster(yaml.safe_dump(config))
    try:
        assert cluster.azure_ad and cluster.scope == "srv/.default"
    finally:
        cluster.close()
    assert not marker.exists()
    # The same exec in a second user is not the Azure AD user: refused, still not run.
    config["users"].append({"name": "other", "user": {"exec": {"command": str(script)}}})
    with pytest.raises(UnsafeKubeconfig, match=r"users\[1\]\(other\)\.user\.exec"):
        RemoteCluster(yaml.safe_dump(config))
    assert not marker.exists()


def test_the_exec_kubeconfig_really_runs_without_the_check(tmp_path: Any) -> None:
    # The control for the test below: the kubernetes client itself does run the command.
    from kubernetes import config as kube_config

    config, marker = exec_marker_kubeconfig(tmp_path)
    kube_config.new_client_from_config_dict(config, persist_config=False).close()
    assert marker.exists()
