"""The gpuroute side of a local environment: keys, pools, operator and worker processes.

Used by the demo and by the integration and end-to-end tests, on top of a real
ControlPlane and a moto S3 server. Every process is a real `gpuroute` process with its
own log file; nothing is simulated.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuroute.curve_keys import KeyPair, write_key_file
from gpuroute_dev.localenv.controlplane import ControlPlane, pdeathsig_prefix
from gpuroute_dev.localenv.objectstore import S3Server

GROUP, VERSION = "gpuroute.io", "v1alpha1"
MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
OPERATOR_ACCOUNT = "gpuroute-operator"
TERMINAL_PHASES = frozenset({"Completed", "Failed", "Cancelled"})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(url: str, name: str, labels: Mapping[str, str] | None) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


@dataclass
class ManagedProcess:
    """A child process in its own process group, logging to a file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass(frozen=True)
class PoolConfig:
    """A WorkerPool to create locally."""

    name: str
    """WorkerPool name."""
    cloud: str = "local"
    """Declared cloud."""
    region: str = "local-1"
    """Declared region."""
    price_per_gpu_hour: float = 1.0
    """Declared USD per GPU-hour."""
    spot: bool = False
    """Declared preemptible capacity."""
    workers: tuple[str, ...] = ("w1",)
    """Worker key names to generate and admit."""
    max_in_flight_per_worker: int = 4
    """Jobs per worker at once."""
    allowed_namespaces: tuple[str, ...] = ()
    """Namespaces allowed to use the pool."""
    extra_spec: Mapping[str, Any] = field(default_factory=dict)
    """More spec fields (models, allowedSourceCIDRs...)."""


class LocalStack:
    def __init__(self, workdir: Path, control_plane: ControlPlane, s3: S3Server, *,
                 namespace: str = "gpuroute-system", worker_threads: int = 1, shipped_rbac: bool = True) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.control_plane = control_plane
        self.s3 = s3
        self.namespace = namespace
        self.worker_threads = worker_threads
        self.operator_key = KeyPair.generate()
        write_key_file(self.workdir / "server.key_secret", self.operator_key.secret)
        (self.workdir / "server.key").write_bytes(self.operator_key.public + b"\n")
        self.operator_port = free_port()
        self.operator_web_port = free_port()
        """Status page and /api/status (bearer token, TokenReview + SubjectAccessReview)."""
        self.operator_metrics_port = free_port()
        """/metrics and /healthz, open."""
        self.shipped_rbac = shipped_rbac
        """Operators run as the ServiceAccount gpuroute-operator with manifests/' RBAC (False: as admin)."""
        self._operator_kubeconfig: str | None = None
        self.worker_keys: dict[tuple[str, str], KeyPair] = {}
        self.operator: ManagedProcess | None = None
        """The operator replica started first, or the leader once wait_for_leader() has seen one."""
        self.operators: dict[str, ManagedProcess] = {}
        """Every operator replica started, by identity (its Lease holderIdentity)."""
        self.operator_liveness_ports: dict[str, int] = {}
        """Each replica's liveness port (/healthz: standby while following, kopf's once leading)."""
        self.lease_name = "gpuroute-operator"
        self._leader_election = False
        self.workers: dict[str, ManagedProcess] = {}
        self.worker_health_ports: dict[str, int] = {}
        self._operator_runs = 0
        # Remembered so a restarted operator gets the same storage configuration.
        self._operator_extra: tuple[tuple[str, ...], dict[str, str]] = ((), {})
        self._api = control_plane.api_client()
        self.ensure_namespace(namespace)

    # ---- Kubernetes objects ----------------------------------------------------------

    @property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self._api)

    @property
    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self._api)

    def ensure_namespace(self, name: str, *, read: Sequence[str] = (), write: Sequence[str] = ()) -> None:
        from kubernetes.client.rest import ApiException

        annotations = {}
        if read:
            annotations["gpuroute.io/storage-read"] = ", ".join(read)
        if write:
            annotations["gpuroute.io/storage-write"] = ", ".join(write)
        body = {"metadata": {"name": name, "annotations": annotations}}
        try:
            self.core.create_namespace(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_namespace(name, body)

    def add_pool(self, pool: PoolConfig) -> None:
        from kubernetes.client.rest import ApiException

        data = {}
        for worker in pool.workers:
            pair = self.worker_keys.setdefault((pool.name, worker), KeyPair.generate())
            data[f"{worker}.key"] = base64.b64encode(pair.public).decode()
        secret_name = f"gpuroute-pool-{pool.name}-keys"
        secret = {"metadata": {"name": secret_name, "namespace": self.namespace}, "data": data}
        try:
            self.core.create_namespaced_secret(self.namespace, secret)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.replace_namespaced_secret(secret_name, self.namespace, secret)
        spec = {
            "cloud": pool.cloud, "region": pool.region, "pricePerGpuHour": pool.price_per_gpu_hour, "spot": pool.spot,
            "workerKeysSecretRef": {"name": secret_name, "namespace": self.namespace},
            "maxInFlightPerWorker": pool.max_in_flight_per_worker,
            "allowedNamespaces": list(pool.allowed_namespaces), "gpu": {"model": "cpu", "memoryGiB": 0},
            **pool.extra_spec,
        }
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkerPool", "metadata": {"name": pool.name}, "spec": spec}
        try:
            self.custom.create_cluster_custom_object(GROUP, VERSION, "workerpools", body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.custom.patch_cluster_custom_object(GROUP, VERSION, "workerpools", pool.name, {"spec": spec})

    def worker_pool(self, name: str) -> dict[str, Any]:
        return self.custom.get_cluster_custom_object(GROUP, VERSION, "workerpools", name)

    def create_job(self, namespace: str, name: str, spec: Mapping[str, Any], *,
                   annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ImageJob",
                "metadata": {"name": name, "annotations": dict(annotations or {})}, "spec": dict(spec)}
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "imagejobs", body)

    def get_job(self, namespace: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "imagejobs", name)

    def delete_job(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "imagejobs", name)

    def list_jobs(self, namespace: str) -> list[dict[str, Any]]:
        return list(self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "imagejobs")["items"])

    def wait_for_jobs(self, namespace: str, names: Iterable[str], *, timeout: float = 120.0,
                      phases: frozenset[str] = TERMINAL_PHASES) -> dict[str, dict[str, Any]]:
        """Poll until every named job is in one of `phases`; returns the last bodies."""
        wanted = set(names)
        deadline = time.monotonic() + timeout
        seen: dict[str, dict[str, Any]] = {}
        while True:
            seen = {j["metadata"]["name"]: j for j in self.list_jobs(namespace) if j["metadata"]["name"] in wanted}
            pending = [n for n in wanted if (seen.get(n, {}).get("status") or {}).get("phase") not in phases]
            if not pending:
                return seen
            if time.monotonic() > deadline:
                states = {n: (seen.get(n, {}).get("status") or {}).get("phase") for n in sorted(pending)}
                raise TimeoutError(f"jobs not in {sorted(phases)} after {timeout}s: {states}\n"
                                   f"operator log:\n{self.operator.log_tail() if self.operator else ''}")
            time.sleep(0.2)

    def wait_for_pool(self, name: str, *, workers: int, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status = self.worker_pool(name).get("status") or {}
            if status.get("connectedWorkers", 0) == workers:
                return status
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{p.log_tail(15)}" for n, p in self.workers.items())
                raise TimeoutError(f"pool {name} has {status.get('connectedWorkers')} workers, wanted {workers}\n"
                                   f"operator:\n{self.operator.log_tail() if self.operator else ''}\n{logs}")
            time.sleep(0.2)

    # ---- processes -------------------------------------------------------------------

    def spawn(self, name: str, args: list[str], env: Mapping[str, str]) -> ManagedProcess:
        log_path = self.workdir / f"{name}.log"
        log = log_path.open("ab")
        # pdeathsig: a test run that is killed outright must not leave operators and workers
        # running (and writing logs) for hours after it.
        popen = subprocess.Popen([*pdeathsig_prefix(), sys.executable, "-m", "gpuroute.cli", *args], stdout=log,
                                 stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        log.close()
        return ManagedProcess(name, popen, log_path)

    @property
    def operator_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.operator_port}"

    def start_operator(self, *, extra_args: Sequence[str] = (), extra_env: Mapping[str, str] | None = None,
                       replicas: int = 1, leader_election: bool | None = None) -> ManagedProcess:
        """Start `replicas` operator processes; returns the first.

        With leader election (the default for more than one replica) they contend for
        the Lease `lease_name`; all share the same --bind and --web-port, which only the
        leader binds, so workers keep dialling one endpoint, as through a Service. A
        single replica runs without a Lease unless `leader_election=True`.
        """
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        self._leader_election = replicas > 1 if leader_election is None else leader_election
        self._operator_extra = (tuple(extra_args), dict(extra_env or {})) if extra_args or extra_env else self._operator_extra
        first = self.start_replica()
        for _ in range(replicas - 1):
            self.start_replica()
        self.operator = first
        return first

    def start_replica(self) -> ManagedProcess:
        """One more operator process, configured as the last start_operator() call said
        (a replacement after kill_leader(), for instance). Its identity is its name."""
        self._operator_runs += 1
        identity = f"operator-{self._operator_runs}"
        env = {**self.control_plane.env(self.s3.env(os.environ)), **self._operator_extra[1]}
        if self._leader_election:
            liveness_port = self.operator_liveness_ports[identity] = free_port()
            election = ["--identity", identity, "--lease-name", self.lease_name, "--lease-namespace", self.namespace]
        else:
            liveness_port, election = 0, ["--no-leader-election"]
        process = self.spawn(identity, [
            "operator", "--bind", self.operator_endpoint, "--server-key-file", str(self.workdir / "server.key_secret"),
            "--namespace", self.namespace, "--kubeconfig", self.operator_kubeconfig(),
            "--web-port", str(self.operator_web_port), "--metrics-port", str(self.operator_metrics_port),
            "--web-bind", "127.0.0.1", "--liveness-port", str(liveness_port),
            *election, *self._operator_extra[0]], env)
        self.operators[identity] = process
        if self.operator is None or not self.operator.alive:
            self.operator = process
        return process

    def lease_holder(self) -> str:
        """The Lease's holderIdentity ("" when released or not created yet)."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            lease = client.CoordinationV1Api(self._api).read_namespaced_lease(self.lease_name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return ""
            raise
        return str(lease.spec.holder_identity or "") if lease.spec else ""

    def leader(self) -> ManagedProcess | None:
        """The live replica the Lease names, if any."""
        process = self.operators.get(self.lease_holder())
        return process if process is not None and process.alive else None

    def wait_for_leader(self, *, other_than: str = "", timeout: float = 30.0) -> str:
        """Poll the Lease until a live replica other than `other_than` holds it; that
        replica becomes `self.operator`. Returns its identity."""
        deadline = time.monotonic() + timeout
        while True:
            holder = self.lease_holder()
            process = self.operators.get(holder)
            if holder and holder != other_than and process is not None and process.alive:
                self.operator = process
                return holder
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{p.log_tail(15)}" for n, p in self.operators.items())
                raise TimeoutError(f"no operator replica (other than {other_than!r}) leads after {timeout}s; "
                                   f"Lease holder {holder!r}\n{logs}")
            time.sleep(0.05)

    def kill_leader(self) -> str:
        """SIGKILL the replica holding the Lease; returns its identity."""
        holder = self.lease_holder()
        process = self.operators.get(holder)
        if process is None or not process.alive:
            raise RuntimeError(f"no live operator replica holds the Lease (holder {holder!r})")
        process.kill()
        return holder

    def start_worker(self, pool: str, worker: str, *, capacity: int = 4, max_batch: int = 8,
                     listen: str | None = None, extra_args: Sequence[str] = ()) -> ManagedProcess:
        """A worker process that dials the operator, or with `listen` binds there and waits
        for the operator to dial it (a pool listing the address under spec.endpoints)."""
        pair = self.worker_keys[(pool, worker)]
        key_file = self.workdir / f"{pool}-{worker}.key_secret"
        write_key_file(key_file, pair.secret)
        # Workers get no storage credentials: they only ever see presigned URLs.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        health_port = self.worker_health_ports.setdefault(worker, free_port())
        process = self.spawn(f"worker-{pool}-{worker}", [
            "worker", *(("--listen", listen) if listen else ("--operator", self.operator_endpoint)),
            "--pool", pool, "--id", worker,
            "--key-file", str(key_file), "--server-public-key-file", str(self.workdir / "server.key"),
            "--capacity", str(capacity), "--max-batch", str(max_batch), "--health-port", str(health_port),
            "--threads", str(self.worker_threads), *extra_args], env)
        self.workers[worker] = process
        return process

    def worker_metric(self, worker: str, name: str, labels: Mapping[str, str] | None = None) -> float:
        """A sample from a worker's Prometheus /metrics (0 when absent)."""
        return _scrape(f"http://127.0.0.1:{self.worker_health_ports[worker]}/metrics", name, labels)

    def operator_metric(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        return _scrape(f"http://127.0.0.1:{self.operator_metrics_port}/metrics", name, labels)

    # ---- identities ------------------------------------------------------------------

    def mint_token(self, namespace: str, account: str, *, seconds: int = 86400) -> str:
        """A token of ServiceAccount `account` (created if missing) from the TokenRequest
        API; the apiserver signs it with the control plane's service-account key."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        self.ensure_namespace(namespace)
        try:
            self.core.create_namespaced_service_account(namespace, {"metadata": {"name": account}})
        except ApiException as exc:
            if exc.status != 409:
                raise
        request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[], expiration_seconds=seconds))
        answer = self.core.create_namespaced_service_account_token(account, namespace, request)
        return str(answer.status.token)

    def kubeconfig_with_token(self, token: str, name: str) -> str:
        """The control plane's kubeconfig with `token` as the user; returns its path."""
        import yaml

        config = yaml.safe_load(Path(self.control_plane.kubeconfig).read_text())
        for user in config["users"]:
            user["user"] = {"token": token}
        path = self.workdir / f"kubeconfig-{name}"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return str(path)

    def operator_kubeconfig(self) -> str:
        """What operator processes use: by default a token of the ServiceAccount
        gpuroute-operator bound by the shipped RBAC (manifests/management/base/rbac.yaml),
        so every test shows that RBAC is enough; with shipped_rbac=False, the admin's."""
        if not self.shipped_rbac:
            return self.control_plane.kubeconfig
        if self._operator_kubeconfig is None:
            self.install_operator_rbac()
            token = self.mint_token(self.namespace, OPERATOR_ACCOUNT)
            self._operator_kubeconfig = self.kubeconfig_with_token(token, OPERATOR_ACCOUNT)
        return self._operator_kubeconfig

    def install_operator_rbac(self) -> None:
        """Create (or replace) the shipped ClusterRole, Roles and bindings for this stack's
        operator namespace, and wait until the authorizer applies them."""
        import yaml
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        rbac = client.RbacAuthorizationV1Api(self._api)
        docs = [d for d in yaml.safe_load_all((MANIFESTS / "management/base/rbac.yaml").read_text()) if d]
        suffix = "" if self.namespace == "gpuroute-system" else f"-{self.namespace}"
        for doc in docs:
            kind, meta = doc["kind"], doc["metadata"]
            for subject in doc.get("subjects", []):
                subject["namespace"] = self.namespace
            if kind in ("Role", "RoleBinding"):
                meta["namespace"] = self.namespace
            elif kind == "ClusterRoleBinding":
                # One binding per stack namespace; the ClusterRole itself is shared.
                meta["name"] += suffix
            verbs: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
                "ClusterRole": (rbac.create_cluster_role, rbac.replace_cluster_role),
                "ClusterRoleBinding": (rbac.create_cluster_role_binding, rbac.replace_cluster_role_binding),
                "Role": (lambda body: rbac.create_namespaced_role(self.namespace, body),
                         lambda name, body: rbac.replace_namespaced_role(name, self.namespace, body)),
                "RoleBinding": (lambda body: rbac.create_namespaced_role_binding(self.namespace, body),
                                lambda name, body: rbac.replace_namespaced_role_binding(name, self.namespace, body)),
            }
            create, replace = verbs[kind]
            try:
                create(doc)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                replace(meta["name"], doc)
        user = f"system:serviceaccount:{self.namespace}:{OPERATOR_ACCOUNT}"
        review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
            user=user, groups=["system:serviceaccounts", f"system:serviceaccounts:{self.namespace}"],
            resource_attributes=client.V1ResourceAttributes(verb="create", resource="leases", group="coordination.k8s.io",
                                                            namespace=self.namespace)))
        deadline = time.monotonic() + 15
        # The RBAC authorizer reads an informer cache: new bindings apply after a moment.
        authz = client.AuthorizationV1Api(self._api)
        while not getattr(authz.create_subject_access_review(review).status, "allowed", False):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the shipped RBAC does not apply to {user} after 15 s")
            time.sleep(0.1)

    def stop(self) -> None:
        # Followers before the leader: a leader stopped first would hand the Lease to a
        # follower that would start up only to be stopped.
        replicas = list({id(p): p for p in [*self.operators.values(), *([self.operator] if self.operator else [])]}.values())
        if self._leader_election:
            import urllib3
            from kubernetes.client.rest import ApiException

            try:
                holder = self.operators.get(self.lease_holder())
            except (ApiException, urllib3.exceptions.HTTPError) as exc:
                # Control plane already down: any order will do.
                print(f"LocalStack.stop: cannot read the Lease ({exc}); stopping replicas in start order", file=sys.stderr)
                holder = None
            replicas.sort(key=lambda p: p is holder)
        for process in [*self.workers.values(), *replicas]:
            process.stop()
        self._api.close()
