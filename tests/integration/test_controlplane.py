"""The local control plane: real etcd + kube-apiserver 1.20 with the project's CRDs."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from gpuroute_dev.localenv.controlplane import (
    ControlPlane,
    ControlPlaneConfig,
    ControlPlaneError,
    default_crd_dir,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

GROUP = "gpuroute.io"
VERSION = "v1alpha1"


def _image_job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ImageJob",
        "metadata": {"name": name},
        "spec": {
            "input": {"uri": "s3://inputs/cat.png"},
            "output": {"uri": "s3://outputs/cat.png", "format": "png"},
            "steps": [{"op": "grayscale"}],
        },
    }


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_serves_kubernetes_1_20(control_plane: ControlPlane, kube_api: ApiClient) -> None:
    from kubernetes import client

    version = client.VersionApi(kube_api).get_code()
    assert version.git_version.startswith("v1.20."), version.git_version
    assert control_plane.server.startswith("https://127.0.0.1:")
    assert control_plane.startup_seconds is not None


def test_kubeconfig_verifies_tls_with_token(control_plane: ControlPlane) -> None:
    config = yaml.safe_load(Path(control_plane.kubeconfig).read_text())
    cluster = config["clusters"][0]["cluster"]
    assert cluster["server"] == control_plane.server
    assert "insecure-skip-tls-verify" not in cluster
    assert config["users"][0]["user"]["token"] == control_plane.token
    assert config["current-context"] == "gpuroute-test"

    context = ssl.create_default_context(cafile=cluster["certificate-authority"])
    request = urllib.request.Request(
        f"{control_plane.server}/api/v1/namespaces/default",
        headers={"Authorization": f"Bearer {control_plane.token}"},
    )
    with urllib.request.urlopen(request, context=context, timeout=5) as resp:
        assert json.load(resp)["metadata"]["name"] == "default"


def test_rbac_denies_anonymous(control_plane: ControlPlane) -> None:
    context = ssl.create_default_context(cafile=str(control_plane.ca_file))
    request = urllib.request.Request(f"{control_plane.server}/api/v1/namespaces")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, context=context, timeout=5)
    assert info.value.code == 403


def test_env_points_subprocesses_at_the_cluster(control_plane: ControlPlane) -> None:
    env = control_plane.env({"PATH": "/usr/bin"})
    assert env == {"PATH": "/usr/bin", "KUBECONFIG": control_plane.kubeconfig}


def test_uses_repository_crds() -> None:
    crd_dir = ControlPlaneConfig().crd_dir
    assert crd_dir == default_crd_dir()
    assert crd_dir is not None and (crd_dir / "imagejob.yaml").is_file()


@pytest.mark.parametrize("crd", ["imagejobs.gpuroute.io", "workerpools.gpuroute.io"])
def test_crds_established(kube_api: ApiClient, crd: str) -> None:
    from kubernetes import client

    ext = client.ApiextensionsV1Api(kube_api)
    body = json.loads(ext.read_custom_resource_definition(crd, _preload_content=False).data)
    conditions = {c["type"]: c["status"] for c in body["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"


def test_image_job_create_read_and_status_patch(kube_api: ApiClient) -> None:
    from kubernetes import client

    custom = client.CustomObjectsApi(kube_api)
    args = (GROUP, VERSION, "default", "imagejobs")
    created = custom.create_namespaced_custom_object(*args, _image_job("crud"))
    try:
        assert created["metadata"]["uid"]
        # Schema defaults are applied by the apiserver.
        assert "quality" in created["spec"]["output"]

        # With the status subresource, status in a main-resource write is ignored...
        custom.patch_namespaced_custom_object(
            *args, "crud", {"status": {"phase": "Completed"}}
        )
        assert "status" not in custom.get_namespaced_custom_object(*args, "crud")

        # ...and only the /status endpoint writes it.
        custom.patch_namespaced_custom_object_status(
            *args, "crud", {"status": {"phase": "Processing", "attempts": 1, "pool": "a"}}
        )
        job = custom.get_namespaced_custom_object(*args, "crud")
        assert job["status"] == {"phase": "Processing", "attempts": 1, "pool": "a"}
        assert job["spec"]["steps"] == [{"op": "grayscale"}]
    finally:
        custom.delete_namespaced_custom_object(*args, "crud")


def test_schema_rejects_invalid_image_job(kube_api: ApiClient) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    bad = _image_job("bad")
    bad["spec"]["steps"] = []
    custom = client.CustomObjectsApi(kube_api)
    with pytest.raises(ApiException) as info:
        custom.create_namespaced_custom_object(GROUP, VERSION, "default", "imagejobs", bad)
    assert info.value.status == 422


def test_two_clusters_side_by_side(control_plane: ControlPlane, tmp_path: Path) -> None:
    from kubernetes import client

    with ControlPlane(ControlPlaneConfig(workdir=tmp_path / "gpu", name="gpu")) as other:
        assert other.port != control_plane.port
        assert other.etcd_url != control_plane.etcd_url
        assert yaml.safe_load(Path(other.kubeconfig).read_text())["current-context"] == "gpu"
        with other.api_client() as api_other, control_plane.api_client() as api_main:
            args = (GROUP, VERSION, "default", "imagejobs")
            client.CustomObjectsApi(api_other).create_namespaced_custom_object(
                *args, _image_job("only-in-gpu")
            )
            names_main = [
                i["metadata"]["name"]
                for i in client.CustomObjectsApi(api_main).list_namespaced_custom_object(*args)[
                    "items"
                ]
            ]
            assert "only-in-gpu" not in names_main


def test_stop_leaves_nothing_running(tmp_path: Path) -> None:
    workdir = tmp_path / "keep"
    cp = ControlPlane(ControlPlaneConfig(workdir=workdir, name="short", crd_dir=None))
    cp.start()
    pids = [child.popen.pid for child in cp._children]
    assert len(pids) == 2
    assert all(os.getpgid(pid) == pid for pid in pids), "children lead their own groups"
    cp.stop()
    assert all(_process_gone(pid) and _group_gone(pid) for pid in pids)
    assert not cp.running
    # A caller-supplied workdir is kept, logs included.
    assert (workdir / "kube-apiserver.log").stat().st_size > 0
    assert (workdir / "etcd.log").stat().st_size > 0
    cp.stop()  # idempotent


_KILLED_PARENT = """
import sys, time
from pathlib import Path
from gpuroute_dev.localenv.controlplane import ControlPlane, ControlPlaneConfig
cp = ControlPlane(ControlPlaneConfig(workdir=Path(sys.argv[1]), name="orphan", crd_dir=None))
cp.start()
print(" ".join(str(c.popen.pid) for c in cp._children), flush=True)
time.sleep(300)
"""


def test_killed_parent_takes_children_along(tmp_path: Path) -> None:
    # SIGKILL skips atexit; the kernel's parent-death signal must still end both.
    parent = subprocess.Popen(
        [sys.executable, "-c", _KILLED_PARENT, str(tmp_path / "wd")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2, "the child script did not start a control plane"
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while not all(_process_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_process_gone(pid) for pid in pids)


def test_own_temporary_workdir_is_removed() -> None:
    cp = ControlPlane(ControlPlaneConfig(name="tmp", crd_dir=None))
    with cp:
        workdir = cp.workdir
        assert (workdir / "kubeconfig").is_file()
    assert not workdir.exists()


def test_startup_failure_reports_log_tail(tmp_path: Path) -> None:
    cp = ControlPlane(
        ControlPlaneConfig(
            workdir=tmp_path / "bad",
            name="bad",
            crd_dir=None,
            extra_apiserver_args=("--no-such-flag=1",),
        )
    )
    with pytest.raises(ControlPlaneError) as info:
        cp.start()
    message = str(info.value)
    assert "kube-apiserver exited" in message
    assert "no-such-flag" in message
    assert not cp.running


def test_bad_crd_fails_with_its_file(tmp_path: Path) -> None:
    crds = tmp_path / "crds"
    crds.mkdir()
    (crds / "broken.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": "widgets.example.com"},
                # No versions: the apiserver rejects it.
                "spec": {
                    "group": "example.com",
                    "scope": "Namespaced",
                    "names": {"plural": "widgets", "kind": "Widget"},
                    "versions": [],
                },
            }
        )
    )
    cp = ControlPlane(ControlPlaneConfig(workdir=tmp_path / "wd", name="crd", crd_dir=crds))
    with pytest.raises(ControlPlaneError, match="broken.yaml"):
        cp.start()
    assert not cp.running
