"""A real Kubernetes API for tests and the demo: etcd plus kube-apiserver, no kubelet.

This is the envtest approach: the two binaries run as local processes on free loopback
ports, so several control planes can run side by side (one per modelled cluster), and
nothing needs Docker. Only the API machinery exists: no controller-manager, scheduler
or kubelet, so Pods never run, namespaces other than the built-in ones must be created
by the test, and no ServiceAccounts appear on their own.

Usage::

    with ControlPlane(ControlPlaneConfig(name="mgmt")) as cp:
        api = cp.api_client()
        subprocess.run(["kopf", "run", ...], env=cp.env())
"""

from __future__ import annotations

import atexit
import base64
import collections
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

__all__ = [
    "ControlPlane",
    "ControlPlaneConfig",
    "ControlPlaneError",
    "KubeAssetsError",
    "default_crd_dir",
    "kube_assets",
]

ASSETS_SCRIPT = Path(__file__).with_name("kube-assets.sh")
_BINARIES = ("etcd", "kube-apiserver")
# Tail length for error messages: enough to show a Go panic's first frames.
_LOG_TAIL_LINES = 60


class KubeAssetsError(RuntimeError):
    """The etcd and kube-apiserver binaries could not be found or built."""


class ControlPlaneError(RuntimeError):
    """The local control plane failed to start, or was used before start()."""


def default_crd_dir() -> Path:
    """The repository's ``crds/`` folder, or the copy packaged next to this package."""
    repo_crds = Path(__file__).resolve().parents[2] / "crds"
    packaged = Path(__file__).resolve().parents[1] / "crds"
    if not repo_crds.is_dir() and packaged.is_dir():
        return packaged
    return repo_crds


def _has_binaries(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in _BINARIES)


def _cached_assets() -> Path | None:
    # Same preference order as kube-assets.sh; checked here too so a warm start does
    # not pay for a bash process.
    env_assets = os.environ.get("KUBEBUILDER_ASSETS")
    if env_assets and _has_binaries(Path(env_assets)):
        return Path(env_assets)
    cache_root = Path(os.environ.get("GPUROUTE_CACHE") or Path.home() / ".cache" / "gpuroute")
    cached = cache_root / "kube-assets"
    if _has_binaries(cached):
        return cached
    return None


def kube_assets() -> Path:
    """Return a folder holding executable ``etcd`` and ``kube-apiserver``.

    Uses ``$KUBEBUILDER_ASSETS`` when it has both binaries, else the cache
    (``$GPUROUTE_CACHE``, default ``~/.cache/gpuroute``, subfolder ``kube-assets``),
    else runs the packaged ``kube-assets.sh`` once to build them (several minutes; the
    script takes a lock, so concurrent callers wait for one build). The script's
    progress goes to our stderr.
    """
    found = _cached_assets()
    if found is not None:
        return found
    if not ASSETS_SCRIPT.is_file():
        raise KubeAssetsError(f"{ASSETS_SCRIPT} is missing; cannot obtain etcd and kube-apiserver")
    tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
    try:
        proc = subprocess.Popen(
            ["bash", str(ASSETS_SCRIPT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except OSError as exc:
        raise KubeAssetsError(f"cannot run {ASSETS_SCRIPT}: {exc}") from exc
    assert proc.stdout is not None and proc.stderr is not None
    # The build is silent for minutes otherwise; pass progress through and keep the
    # tail for the error message. stdout carries only the final folder name, so
    # reading it after stderr cannot deadlock.
    for line in proc.stderr:
        sys.stderr.write(line)
        tail.append(line)
    out = proc.stdout.read()
    rc = proc.wait()
    lines = out.strip().splitlines()
    if rc != 0 or not lines:
        raise KubeAssetsError(
            f"{ASSETS_SCRIPT} failed (exit {rc}); set KUBEBUILDER_ASSETS to a folder with "
            f"etcd and kube-apiserver to skip the build. Last output:\n{''.join(tail)}"
        )
    folder = Path(lines[-1])
    if not _has_binaries(folder):
        raise KubeAssetsError(f"{ASSETS_SCRIPT} printed {folder}, which lacks {_BINARIES}")
    return folder


@dataclass(frozen=True)
class ControlPlaneConfig:
    """How to run one local control plane (one modelled cluster)."""

    workdir: Path | None = None
    """Folder for etcd data, certificates, keys, logs and the kubeconfig; kept after stop().
    None: a temporary folder that stop() removes."""
    crd_dir: Path | None = field(default_factory=default_crd_dir)
    """CRD manifests (*.yaml, *.yml) installed at start and waited on until Established; None installs nothing."""
    name: str = "gpuroute-local"
    """Cluster, context and user name in the kubeconfig, so two control planes can model two clusters."""
    startup_timeout: float = 60.0
    """Seconds start() may take in total (etcd, apiserver readiness, CRDs) before it fails."""
    stop_timeout: float = 10.0
    """Seconds each process gets after SIGTERM before SIGKILL."""
    assets: Path | None = None
    """Folder with etcd and kube-apiserver; None resolves it with kube_assets()."""
    service_cluster_ip_range: str = "10.0.0.0/24"
    """Service IP range; the apiserver refuses to start without one, nothing routes it."""
    extra_apiserver_args: tuple[str, ...] = ()
    """Additional kube-apiserver flags, appended last so they override the defaults."""


@dataclass
class _Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    log_offset: int

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        self.log_file.flush()
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self.log_offset)
                data = fh.read()
        except OSError as exc:
            return f"<cannot read {self.log_path}: {exc}>"
        text = data.decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


class _PortInUse(Exception):
    """A child lost the race for a port we picked; start() picks again."""


_LIVE: set[ControlPlane] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for cp in live:
        cp.stop()


atexit.register(_stop_all_at_exit)


def _free_ports(count: int) -> list[int]:
    # Hold every socket until all are bound so the ports are distinct from each other.
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


class ControlPlane:
    """etcd plus kube-apiserver 1.20 on loopback, with the project's CRDs installed.

    Authentication is a static bearer token in group ``system:masters``; authorization
    is RBAC, so RBAC manifests applied by tests are enforced for other identities.
    """

    def __init__(self, config: ControlPlaneConfig | None = None) -> None:
        self.config = config or ControlPlaneConfig()
        self._token = secrets.token_urlsafe(32)
        self._children: list[_Child] = []
        self._workdir: Path | None = None
        self._own_workdir = False
        self._port: int | None = None
        self._etcd_url: str | None = None
        self._kubeconfig: Path | None = None
        self._ca_file: Path | None = None
        self._apiserver_argv: list[str] = []
        self.startup_seconds: float | None = None
        """Wall time of the last successful start(), for reports and regressions."""

    # -- public attributes -------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self._children) and all(c.popen.poll() is None for c in self._children)

    @property
    def workdir(self) -> Path:
        return self._require(self._workdir)

    @property
    def kubeconfig(self) -> str:
        """Path of the kubeconfig for this cluster (token auth, admin)."""
        return str(self._require(self._kubeconfig))

    @property
    def port(self) -> int:
        return self._require(self._port)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        """Static bearer token of the admin user (group system:masters)."""
        return self._token

    @property
    def etcd_url(self) -> str:
        return self._require(self._etcd_url)

    @property
    def ca_file(self) -> Path:
        """The apiserver's self-signed serving certificate bundle, used as the CA."""
        return self._require(self._ca_file)

    def api_client(self) -> ApiClient:
        """A new kubernetes.client.ApiClient for this cluster; the caller closes it."""
        from kubernetes import config as kube_config

        return kube_config.new_client_from_config(config_file=self.kubeconfig)

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess talking to this cluster: ``base`` (default
        os.environ) with KUBECONFIG pointing at this cluster's kubeconfig."""
        env = dict(os.environ if base is None else base)
        env["KUBECONFIG"] = self.kubeconfig
        return env

    def log_path(self, process: str) -> Path:
        """Log file of ``etcd`` or ``kube-apiserver``."""
        return self.workdir / f"{process}.log"

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        """Start etcd and kube-apiserver, write the kubeconfig, install CRDs."""
        if self._children:
            raise ControlPlaneError(f"control plane {self.config.name!r} is already started")
        started = time.monotonic()
        deadline = started + self.config.startup_timeout
        assets = self.config.assets or kube_assets()
        if not _has_binaries(assets):
            raise ControlPlaneError(f"{assets} lacks executable {_BINARIES}")
        self._prepare_workdir()
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            for attempt in range(3):
                try:
                    self._start_processes(assets, deadline)
                    break
                except _PortInUse:
                    self._stop_children()
                    if attempt == 2:
                        raise ControlPlaneError("could not find free loopback ports in 3 tries") from None
            self._write_kubeconfig()
            self._wait_default_namespace(deadline)
            if self.config.crd_dir is not None:
                self._install_crds(self.config.crd_dir, deadline)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def restart_apiserver(self, *, down_s: float = 0.0, timeout: float = 60.0) -> None:
        """Stop kube-apiserver (etcd keeps every object), wait `down_s`, start it again on the
        same port with the same certificates: what clients see during an apiserver upgrade."""
        child = next((c for c in self._children if c.name == "kube-apiserver"), None)
        if child is None:
            raise ControlPlaneError(f"control plane {self.config.name!r} has no kube-apiserver running")
        _terminate(child.popen, self.config.stop_timeout)
        child.log_file.close()
        self._children.remove(child)
        time.sleep(down_s)
        apiserver = self._spawn("kube-apiserver", self._apiserver_argv)
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        self._wait_http(apiserver, f"https://127.0.0.1:{self.port}/readyz", time.monotonic() + timeout, unverified)

    def stop(self) -> None:
        """Stop kube-apiserver, then etcd; remove the workdir only if start() made it."""
        self._stop_children()
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self._own_workdir = False

    # -- internals ---------------------------------------------------------------------

    def _require(self, value: Any) -> Any:
        if value is None:
            raise ControlPlaneError(f"control plane {self.config.name!r} is not started")
        return value

    def _prepare_workdir(self) -> None:
        if self.config.workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"gpuroute-{self.config.name}-"))
            self._own_workdir = True
        else:
            self._workdir = Path(self.config.workdir).resolve()
            self._workdir.mkdir(parents=True, exist_ok=True)
            self._own_workdir = False
        (self._workdir / "certs").mkdir(exist_ok=True)
        self._write_service_account_key()
        # 0600: the file holds a cluster-admin credential.
        tokens = self._workdir / "tokens.csv"
        tokens.write_text(f'{self._token},admin,admin-uid,"system:masters"\n')
        tokens.chmod(0o600)

    def _write_service_account_key(self) -> None:
        assert self._workdir is not None
        key_path = self._workdir / "sa.key"
        pub_path = self._workdir / "sa.pub"
        # Reused across restarts of the same workdir so issued tokens stay valid.
        if key_path.exists() and pub_path.exists():
            return
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        pub_path.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def _spawn(self, name: str, argv: list[str]) -> _Child:
        log_path = self.log_path(name)
        log_file = log_path.open("ab")
        log_file.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
        log_file.flush()
        offset = log_file.tell()
        argv = [*pdeathsig_prefix(), *argv]
        try:
            # Own session (and so process group): a Ctrl-C aimed at the test run does not
            # hit the children mid-shutdown, and stop() can signal the whole group.
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        except OSError as exc:
            log_file.close()
            raise ControlPlaneError(f"cannot start {name}: {exc}") from exc
        child = _Child(name, popen, log_path, log_file, offset)
        self._children.append(child)
        return child

    def _start_processes(self, assets: Path, deadline: float) -> None:
        client_port, peer_port, api_port = _free_ports(3)
        workdir = self.workdir
        client_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd = self._spawn(
            "etcd",
            [
                str(assets / "etcd"),
                "--name=default",
                f"--data-dir={workdir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--initial-cluster-state=new",
                "--logger=zap",
                "--log-outputs=stderr",
            ],
        )
        self._wait_http(etcd, f"{client_url}/health", deadline, ssl_context=None)
        self._apiserver_argv = [
                str(assets / "kube-apiserver"),
                f"--etcd-servers={client_url}",
                "--bind-address=127.0.0.1",
                # Advertising loopback makes the self-signed serving cert carry 127.0.0.1,
                # so clients can verify TLS instead of skipping it.
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                "--insecure-port=0",
                f"--cert-dir={workdir / 'certs'}",
                f"--token-auth-file={workdir / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={workdir / 'sa.pub'}",
                f"--service-account-signing-key-file={workdir / 'sa.key'}",
                f"--service-cluster-ip-range={self.config.service_cluster_ip_range}",
                "--allow-privileged=true",
                # No controller-manager runs, so no namespace ever gets a default
                # ServiceAccount; the plugin would reject every Pod for lack of one.
                "--disable-admission-plugins=ServiceAccount",
                *self.config.extra_apiserver_args,
        ]
        apiserver = self._spawn("kube-apiserver", self._apiserver_argv)
        self._port = api_port
        self._etcd_url = client_url
        # The serving cert only exists once the apiserver has written it, so readiness
        # is polled without verification and the cert is checked right after.
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        self._wait_http(apiserver, f"https://127.0.0.1:{api_port}/readyz", deadline, unverified)
        self._ca_file = workdir / "certs" / "apiserver.crt"
        self._check_tls(apiserver)

    def _wait_http(
        self, child: _Child, url: str, deadline: float, ssl_context: ssl.SSLContext | None
    ) -> None:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self._token}"})
        last_error = "no attempt"
        while True:
            rc = child.popen.poll()
            if rc is not None:
                tail = child.log_tail()
                if "address already in use" in tail:
                    raise _PortInUse(child.name)
                raise ControlPlaneError(
                    f"{child.name} exited with code {rc} during startup of "
                    f"{self.config.name!r}; log {child.log_path}:\n{tail}"
                )
            try:
                with urllib.request.urlopen(request, timeout=2, context=ssl_context) as resp:
                    if resp.status == 200:
                        return
                    last_error = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                # /readyz answers 500 with the failing checks while post-start hooks run.
                last_error = f"HTTP {exc.code}: {exc.read()[:500].decode(errors='replace')}"
            except (urllib.error.URLError, OSError) as exc:
                last_error = str(exc)
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"{child.name} of {self.config.name!r} not ready at {url} within "
                    f"{self.config.startup_timeout}s (last: {last_error}); log "
                    f"{child.log_path}:\n{child.log_tail()}"
                )
            time.sleep(0.05)

    def _check_tls(self, apiserver: _Child) -> None:
        # The kubeconfig names the serving cert as CA; prove that verifies for
        # 127.0.0.1 here, where the failure is easy to read, not in a client later.
        context = ssl.create_default_context(cafile=str(self.ca_file))
        request = urllib.request.Request(
            f"{self.server}/version", headers={"Authorization": f"Bearer {self._token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as exc:
            raise ControlPlaneError(
                f"TLS verification of {self.server} against {self.ca_file} failed: {exc}; "
                f"apiserver log:\n{apiserver.log_tail()}"
            ) from exc

    def inline_kubeconfig(self) -> str:
        """The kubeconfig with its CA certificate inline (certificate-authority-data): what a
        scaling Secret must hold, since the operator refuses kubeconfigs that read files."""
        config = yaml.safe_load(Path(self.kubeconfig).read_text())
        for entry in config["clusters"]:
            path = entry["cluster"].pop("certificate-authority")
            entry["cluster"]["certificate-authority-data"] = base64.b64encode(Path(path).read_bytes()).decode()
        return yaml.safe_dump(config, sort_keys=False)

    def _write_kubeconfig(self) -> None:
        name = self.config.name
        user = f"{name}-admin"
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": name,
                    "cluster": {"server": self.server, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": user, "user": {"token": self._token}}],
            "contexts": [
                {"name": name, "context": {"cluster": name, "user": user, "namespace": "default"}}
            ],
            "current-context": name,
            "preferences": {},
        }
        path = self.workdir / "kubeconfig"
        path.write_text(yaml.safe_dump(kubeconfig, sort_keys=False))
        path.chmod(0o600)
        self._kubeconfig = path

    def _wait_default_namespace(self, deadline: float) -> None:
        # /readyz does not cover the bootstrap controller creating "default"; a test
        # that creates an object there right away would otherwise race it.
        from kubernetes import client as kube_client
        from kubernetes.client.exceptions import ApiException

        with self.api_client() as api:
            core = kube_client.CoreV1Api(api)
            while True:
                try:
                    core.read_namespace("default", _preload_content=False)
                    return
                except ApiException as exc:
                    if exc.status != 404:
                        raise ControlPlaneError(f"reading namespace default: {exc}") from exc
                if time.monotonic() > deadline:
                    raise ControlPlaneError(
                        f"namespace default never appeared in {self.config.name!r}"
                    )
                time.sleep(0.05)

    def _install_crds(self, crd_dir: Path, deadline: float) -> None:
        from kubernetes import client as kube_client
        from kubernetes.client.exceptions import ApiException

        crds = list(_load_crds(crd_dir))
        with self.api_client() as api:
            ext = kube_client.ApiextensionsV1Api(api)
            for path, body in crds:
                name = body["metadata"]["name"]
                try:
                    # Raw responses: the generated models choke on some status shapes
                    # (conditions: null) and nothing here needs them.
                    ext.create_custom_resource_definition(body, _preload_content=False)  # type: ignore[arg-type]
                except ApiException as exc:
                    if exc.status != 409:
                        raise ControlPlaneError(
                            f"installing CRD {name} from {path}: {exc.status} {exc.reason}: "
                            f"{exc.body}"
                        ) from exc
                    # Kept workdir: the CRD exists from a previous run; make it current.
                    raw: Any = ext.read_custom_resource_definition(name, _preload_content=False)
                    current = json.loads(raw.data)
                    body = {**body, "metadata": {**body["metadata"],
                            "resourceVersion": current["metadata"]["resourceVersion"]}}
                    ext.replace_custom_resource_definition(name, body, _preload_content=False)  # type: ignore[arg-type]
            for path, body in crds:
                self._wait_established(ext, body["metadata"]["name"], path, deadline)

    def _wait_established(self, ext: Any, name: str, path: Path, deadline: float) -> None:
        while True:
            crd = json.loads(ext.read_custom_resource_definition(name, _preload_content=False).data)
            conditions = {
                c.get("type"): c for c in (crd.get("status") or {}).get("conditions") or []
            }
            names = conditions.get("NamesAccepted")
            if names is not None and names.get("status") == "False":
                raise ControlPlaneError(
                    f"CRD {name} from {path}: names not accepted: {names.get('message')}"
                )
            established = conditions.get("Established")
            if established is not None and established.get("status") == "True":
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"CRD {name} from {path} not Established within "
                    f"{self.config.startup_timeout}s; conditions: {list(conditions.values())}"
                )
            time.sleep(0.05)

    def _stop_children(self) -> None:
        # Reverse start order: the apiserver goes first so it never sees etcd vanish
        # and spends the stop timeout retrying.
        while self._children:
            child = self._children.pop()
            _terminate(child.popen, self.config.stop_timeout)
            child.log_file.close()

    def __repr__(self) -> str:
        where = self.server if self._port is not None and self._children else "stopped"
        return f"ControlPlane(name={self.config.name!r}, {where})"


def pdeathsig_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL`` when that is safe, else nothing.

    atexit does not run when this process is SIGKILLed (a CI timeout, an OOM kill), so
    the kernel is asked to kill the child when its parent dies. The signal follows the
    thread that forked, not the process, so it is only used from the main thread: a
    control plane started from a short-lived worker thread would otherwise die with it.
    setpriv (util-linux) sets it and execs, avoiding preexec_fn, which is unsafe in a
    process with threads.
    """
    if threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None or not sys.platform.startswith("linux"):
        return []
    return [setpriv, "--pdeathsig", "KILL", "--"]


def _terminate(popen: subprocess.Popen[bytes], timeout: float) -> None:
    if popen.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            # The child leads its own process group (start_new_session), so this also
            # reaches anything it forked.
            os.killpg(popen.pid, sig)
        except ProcessLookupError:
            break
        try:
            popen.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue
    popen.wait()


def _load_crds(crd_dir: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """CustomResourceDefinition documents in ``crd_dir``, sorted by file name.

    Other documents (a kustomization.yaml, say) are skipped: the folder doubles as a
    kustomize base.
    """
    if not crd_dir.is_dir():
        raise ControlPlaneError(f"CRD folder {crd_dir} does not exist")
    files = sorted([*crd_dir.glob("*.yaml"), *crd_dir.glob("*.yml")])
    for path in files:
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError) as exc:
            raise ControlPlaneError(f"cannot read CRD file {path}: {exc}") from exc
        for doc in docs:
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                if doc.get("apiVersion") != "apiextensions.k8s.io/v1":
                    raise ControlPlaneError(
                        f"{path}: CRD {doc.get('metadata', {}).get('name')} is "
                        f"{doc.get('apiVersion')}; only apiextensions.k8s.io/v1 is supported"
                    )
                yield path, doc
