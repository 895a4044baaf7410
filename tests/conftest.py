"""Shared fixtures and markers for the whole suite.

Heavy modules (torch, kubernetes, moto) are imported inside hooks and fixtures, so a
unit-test run that needs none of them does not pay for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from gpuroute_dev.localenv.controlplane import ControlPlane
    from gpuroute_dev.localenv.objectstore import S3Server

TESTS_DIR = Path(__file__).resolve().parent
# Folder under tests/ -> marker added to every test collected there.
_FOLDER_MARKERS = {"integration": "integration", "e2e": "e2e", "chaos": "chaos"}
_CONTROL_PLANE_FIXTURES = {"control_plane", "kube_api"}
_assets_key = pytest.StashKey["Path | Exception"]()


def _cuda_available() -> bool:
    try:
        import torch
    except (ImportError, OSError):
        # OSError: a torch build whose CUDA libraries are broken or missing.
        return False
    return bool(torch.cuda.is_available())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: the markers must exist before `-m integration` deselects by them.
    gpu_items: list[pytest.Item] = []
    for item in items:
        try:
            rel = Path(str(item.path)).resolve().relative_to(TESTS_DIR)
        except ValueError:
            rel = None
        if rel is not None and rel.parts and rel.parts[0] in _FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, _FOLDER_MARKERS[rel.parts[0]]))
        if item.get_closest_marker("gpu") is not None:
            gpu_items.append(item)
    # Importing torch takes seconds: only when a gpu test was actually collected.
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="no CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    # Obtaining the binaries may mean a build of several minutes on a fresh machine;
    # doing it here keeps it out of the per-test timeout, and only when a collected
    # test needs a control plane.
    if session.config.option.collectonly:
        return
    if not any(_CONTROL_PLANE_FIXTURES & set(getattr(i, "fixturenames", ())) for i in session.items):
        return
    from gpuroute_dev.localenv.controlplane import KubeAssetsError, kube_assets

    try:
        session.config.stash[_assets_key] = kube_assets()
    except KubeAssetsError as exc:
        session.config.stash[_assets_key] = exc


@pytest.fixture(scope="session")
def control_plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver with the repo's CRDs, started once per session.

    Never skips: a missing control plane is a failure, with the reason.
    """
    from gpuroute_dev.localenv.controlplane import (
        ControlPlane,
        ControlPlaneConfig,
        ControlPlaneError,
        KubeAssetsError,
        kube_assets,
    )

    assets = request.config.stash.get(_assets_key, None)
    if assets is None:
        try:
            assets = kube_assets()
        except KubeAssetsError as exc:
            assets = exc
    if isinstance(assets, Exception):
        pytest.fail(
            f"cannot obtain etcd and kube-apiserver for the local control plane "
            f"(set KUBEBUILDER_ASSETS to a folder holding both to skip the build): {assets}",
            pytrace=False,
        )
    cp = ControlPlane(
        ControlPlaneConfig(
            workdir=tmp_path_factory.mktemp("controlplane"), name="gpuroute-test", assets=assets
        )
    )
    try:
        cp.start()
    except ControlPlaneError as exc:
        pytest.fail(f"local control plane failed to start: {exc}", pytrace=False)
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def kube_api(control_plane: ControlPlane) -> Iterator[ApiClient]:
    """A fresh kubernetes ApiClient for the session's control plane, closed after the test."""
    with control_plane.api_client() as api:
        yield api


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto S3 over real HTTP on a free loopback port, for the whole session."""
    from gpuroute_dev.localenv.objectstore import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def azurite_server() -> Iterator[object]:
    """Azurite's Blob service (installed from npm on first use) for the whole session."""
    from gpuroute_dev.localenv.azurite import AzuriteServer

    with AzuriteServer() as server:
        yield server
