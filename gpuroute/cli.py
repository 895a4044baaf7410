"""The `gpuroute` command: operator, worker, keys and demo."""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from pathlib import Path

from gpuroute.curve_keys import (
    KeyError_,
    KeyPair,
    dump_manifests,
    operator_secrets,
    read_key_file,
    worker_secrets,
    write_key_file,
)


def _env_key(path: str | None, env: str, what: str) -> bytes:
    if path:
        return read_key_file(path)
    value = os.environ.get(env)
    if value:
        from gpuroute.curve_keys import parse_key

        return parse_key(value, source=f"${env}")
    raise SystemExit(f"gpuroute: {what} is required (a file option or ${env})")


def _cmd_operator(args: argparse.Namespace) -> int:
    from gpuroute_operator.main import run_operator
    from gpuroute_operator.shell.engine import EngineConfig

    if args.dev_plaintext:
        logging.getLogger("gpuroute").warning("--dev-plaintext: worker traffic is NOT encrypted or authenticated")
        secret = KeyPair.generate().secret
    else:
        secret = _env_key(args.server_key_file, "GPUROUTE_SERVER_SECRET_KEY", "the operator's CURVE secret key")
    from gpuroute_operator.storage.presign import AzureAccount

    accounts: dict[str, AzureAccount] = {}
    for value in args.azure_account:
        name, _, endpoint = value.partition("=")
        # Azure's rule for account names; it also keeps the environment variable name valid.
        if not re.fullmatch(r"[a-z0-9]{3,24}", name) or name in accounts:
            raise SystemExit(f"gpuroute operator: --azure-account expects NAME[=ENDPOINT] with a distinct account "
                             f"name of 3 to 24 lowercase letters and digits, got {value!r}")
        # Account keys come from the environment (a Secret in the Deployment), never from flags;
        # without one, the operator signs with a user delegation key (workload identity).
        key = os.environ.get(f"GPUROUTE_AZURE_KEY_{name.upper()}") or None
        accounts[name] = AzureAccount(name, endpoint, key)
    config = EngineConfig(bind=args.bind, secret_key=secret, namespace=args.namespace, kubeconfig=args.kubeconfig,
                          plaintext=args.dev_plaintext, azure_accounts=tuple(accounts.values()),
                          scaling_azure_ad_scopes=tuple(args.scaling_azure_ad_scope))
    election = None
    if not args.no_leader_election:
        from gpuroute_operator.kube.leader import LeaderElectionConfig, LeaderService, default_identity

        services = (LeaderService(args.socket_service, (("zmq", _endpoint_port(args.bind)),)),
                    LeaderService(args.web_service, tuple((name, port) for name, port in
                                                          (("metrics", args.metrics_port), ("web", args.web_port)) if port)))
        election = LeaderElectionConfig(name=args.lease_name, namespace=args.lease_namespace or args.namespace,
                                        identity=args.identity or default_identity(), pod_name=args.pod_name,
                                        pod_ip=args.pod_ip, services=services)
    web = _web_config(args)
    run_operator(config, web=web, liveness_port=args.liveness_port or None, verbose=args.verbose,
                 election=election)
    return 0


def _endpoint_port(endpoint: str) -> int:
    """The port of a tcp:// ZeroMQ endpoint (7700 when it names none)."""
    _, _, port = endpoint.rpartition(":")
    return int(port) if port.isdigit() else 7700


def _web_config(args: argparse.Namespace):
    """The operator's WebConfig from its flags; SystemExit where the status API would be unsafe
    or its certificate cannot be loaded."""
    import ssl

    from gpuroute_operator.web.console import (
        DEFAULT_AUDIENCES,
        TLSFiles,
        WebConfig,
        plain_http_refusal,
        server_tls_context,
    )

    if bool(args.status_tls_cert) != bool(args.status_tls_key):
        raise SystemExit("gpuroute operator: --status-tls-cert and --status-tls-key go together")
    tls = TLSFiles(args.status_tls_cert, args.status_tls_key) if args.status_tls_cert else None
    if tls is not None and args.web_port:
        try:
            server_tls_context(tls)  # fail now rather than when the leader starts serving
        except (OSError, ssl.SSLError) as exc:
            raise SystemExit(f"gpuroute operator: cannot load the status API certificate: {exc}") from exc
    config = WebConfig(port=args.web_port or None, metrics_port=args.metrics_port or None, bind=args.web_bind,
                       audiences=tuple(dict.fromkeys(args.status_audience)) or DEFAULT_AUDIENCES,
                       apiserver_audience=not args.status_no_apiserver_audience, tls=tls,
                       insecure_http=args.status_insecure_http)
    refusal = plain_http_refusal(config)
    if refusal is not None:
        raise SystemExit(f"gpuroute operator: {refusal}")
    return config


def _parse_model(value: str):
    from gpuroute_worker.config import ModelSpec

    name, sep, rest = value.partition("=")
    uri, hash_sep, digest = rest.rpartition("#")
    if not sep or not hash_sep or not name or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        raise argparse.ArgumentTypeError(f"--model expects NAME=URI#SHA256, got {value!r}")
    return ModelSpec(name, uri, digest.lower())


def _cmd_worker(args: argparse.Namespace) -> int:
    import asyncio

    from gpuroute_worker.config import WorkerConfig
    from gpuroute_worker.main import serve

    config = WorkerConfig(
        operator_endpoint=args.operator or "",
        listen_endpoint=args.listen or "",
        pool=args.pool,
        worker_id=args.id or socket.gethostname(),
        secret_key=_env_key(args.key_file, "GPUROUTE_WORKER_SECRET_KEY", "the worker's CURVE secret key"),
        server_public_key=_env_key(args.server_public_key_file, "GPUROUTE_SERVER_PUBLIC_KEY", "the operator's public key"),
        capacity=args.capacity,
        max_batch=args.max_batch,
        max_batch_wait_ms=args.max_batch_wait_ms,
        device=args.device,
        nvjpeg=not args.no_nvjpeg,
        health_port=args.health_port or None,
        torch_threads=args.threads,
        models={m.name: m for m in args.model},
    )
    asyncio.run(serve(config))
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    pair = KeyPair.generate()
    if args.role == "operator":
        objects = operator_secrets(pair, namespace=args.namespace, worker_namespace=args.worker_namespace)
    else:
        if not args.pool:
            raise SystemExit("gpuroute keys worker: --pool is required")
        objects = worker_secrets(pair, pool=args.pool, worker=args.name, namespace=args.namespace,
                                 worker_namespace=args.worker_namespace)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = "server" if args.role == "operator" else f"{args.pool}-{args.name}"
        write_key_file(out / f"{stem}.key_secret", pair.secret)
        (out / f"{stem}.key").write_bytes(pair.public + b"\n")
    sys.stdout.write(dump_manifests(objects))
    return 0


DEMO_NEEDS_CHECKOUT = ("gpuroute demo: needs a development checkout (the gpuroute_dev package is not installed); "
                       "run it from a clone after `pip install -e '.[dev]'`")


def _cmd_demo(args: argparse.Namespace) -> int:
    # gpuroute_dev (local control plane, S3, demo) is development-only: the images do not install it.
    try:
        from gpuroute_dev.demo import run_demo
    except ModuleNotFoundError as exc:
        if exc.name not in ("gpuroute_dev", "gpuroute_dev.demo"):
            raise
        raise SystemExit(DEMO_NEEDS_CHECKOUT) from exc

    return run_demo(workdir=args.workdir, output_dir=args.output_dir, keep_running=args.keep_running,
                    workers=args.workers, operators=args.operators)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpuroute", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    op = sub.add_parser("operator", help="run the operator (kopf) on the management cluster")
    op.add_argument("--bind", default="tcp://0.0.0.0:7700", help="ZeroMQ endpoint for workers")
    op.add_argument("--server-key-file", help="operator CURVE secret key (or $GPUROUTE_SERVER_SECRET_KEY)")
    op.add_argument("--namespace", default=os.environ.get("GPUROUTE_NAMESPACE", "gpuroute-system"),
                    help="operator namespace (default for key Secret references)")
    op.add_argument("--kubeconfig", default=None, help="kubeconfig path (default: in-cluster or $KUBECONFIG)")
    op.add_argument("--web-port", type=int, default=9091,
                    help="status page and /api/status (TokenReview + SubjectAccessReview); 0 disables")
    op.add_argument("--metrics-port", type=int, default=9090, help="/metrics and /healthz, unauthenticated; 0 disables")
    op.add_argument("--web-bind", default="0.0.0.0", help="address the web and metrics ports bind to")
    op.add_argument("--status-tls-cert", default=os.environ.get("GPUROUTE_STATUS_TLS_CERT") or None, metavar="FILE",
                    help="serve the status port over HTTPS with this PEM certificate chain "
                         "(default: $GPUROUTE_STATUS_TLS_CERT)")
    op.add_argument("--status-tls-key", default=os.environ.get("GPUROUTE_STATUS_TLS_KEY") or None, metavar="FILE",
                    help="private key of --status-tls-cert (default: $GPUROUTE_STATUS_TLS_KEY)")
    op.add_argument("--status-insecure-http", action="store_true",
                    help="allow plain HTTP on the status port on a non-loopback --web-bind (bearer tokens in clear); "
                         "without a certificate the status port otherwise serves only on loopback")
    op.add_argument("--status-audience", action="append", default=[], metavar="AUDIENCE",
                    help="token audience the status API accepts (repeatable; default: gpuroute, as in "
                         "`kubectl create token ACCOUNT --audience gpuroute`)")
    op.add_argument("--status-no-apiserver-audience", action="store_true",
                    help="refuse tokens for the API server's own audience (a plain `kubectl create token`)")
    op.add_argument("--liveness-port", type=int, default=8080, help="kopf liveness probe; 0 disables")
    op.add_argument("--azure-account", action="append", default=[], metavar="NAME[=ENDPOINT]",
                    help="Azure storage account to sign for (key from $GPUROUTE_AZURE_KEY_<NAME>, "
                         "else a user delegation key via azure-identity); repeatable")
    op.add_argument("--scaling-azure-ad-scope", action="append", default=[], metavar="SCOPE",
                    help="Azure AD scope besides the AKS one (6dae42f8-4368-4678-94ff-3960e28e3630/.default) that a "
                         "scaling Secret may name for the operator's own token, e.g. api://my-proxy/.default; "
                         "repeatable")
    op.add_argument("--dev-plaintext", action="store_true", help="DEV ONLY: no CURVE on the worker socket")
    op.add_argument("--lease-name", default="gpuroute-operator", help="coordination.k8s.io Lease for leader election")
    op.add_argument("--lease-namespace", default=None, help="namespace of the Lease (default: --namespace)")
    op.add_argument("--identity", default=None, help="this replica's Lease holder identity (default: hostname_pid)")
    op.add_argument("--pod-name", default=os.environ.get("POD_NAME", ""),
                    help="own pod, named in the leader's Endpoints (default: $POD_NAME)")
    op.add_argument("--pod-ip", default=os.environ.get("POD_IP", ""),
                    help="own pod's IP, which the leader writes into the Endpoints of --socket-service and "
                         "--web-service (default: $POD_IP; empty: none written, as outside a cluster)")
    op.add_argument("--socket-service", default="gpuroute-operator",
                    help="selector-less Service of the worker socket, routed to the leader")
    op.add_argument("--web-service", default="gpuroute-operator-metrics",
                    help="selector-less Service of /metrics and the status page, routed to the leader")
    op.add_argument("--no-leader-election", action="store_true",
                    help="start at once without a Lease (single replica only: two would both dispatch)")
    op.set_defaults(func=_cmd_operator)

    wk = sub.add_parser("worker", help="run a GPU worker that dials the operator (or waits for it to dial in)")
    link = wk.add_mutually_exclusive_group(required=True)
    link.add_argument("--operator", help="operator endpoint to dial, e.g. tcp://gpuroute.example.com:7700")
    link.add_argument("--listen", help="bind here and wait for the operator to dial in, for a WorkerPool that "
                                       "lists this worker under spec.endpoints, e.g. tcp://0.0.0.0:7701")
    wk.add_argument("--pool", required=True, help="WorkerPool this worker belongs to")
    wk.add_argument("--id", default=None, help="worker id (default: hostname, the pod name)")
    wk.add_argument("--key-file", help="worker CURVE secret key (or $GPUROUTE_WORKER_SECRET_KEY)")
    wk.add_argument("--server-public-key-file", help="operator public key (or $GPUROUTE_SERVER_PUBLIC_KEY)")
    wk.add_argument("--capacity", type=int, default=4, help="jobs accepted at once")
    wk.add_argument("--max-batch", type=int, default=8, help="largest dynamic batch")
    wk.add_argument("--max-batch-wait-ms", type=float, default=5.0, help="time a batch waits to fill")
    wk.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    wk.add_argument("--no-nvjpeg", action="store_true",
                    help="decode every JPEG on the host (Pillow), even where nvJPEG could on the GPU")
    wk.add_argument("--health-port", type=int, default=8081, help="/healthz, /readyz, /metrics; 0 disables")
    wk.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    wk.add_argument("--model", type=_parse_model, action="append", default=[],
                    help="super-resolution model NAME=PATH_OR_URI#SHA256 (repeatable)")
    wk.set_defaults(func=_cmd_worker)

    ks = sub.add_parser("keys", help="generate a CURVE key pair as Kubernetes Secret manifests")
    ks.add_argument("role", choices=("operator", "worker"))
    ks.add_argument("--pool", help="pool of the worker key")
    ks.add_argument("--name", default="worker", help="name of the worker key inside the pool's Secret")
    ks.add_argument("--namespace", default="gpuroute-system", help="management-cluster namespace")
    ks.add_argument("--worker-namespace", default="gpuroute-workers", help="GPU-cluster namespace")
    ks.add_argument("--out-dir", help="also write the raw key files here (for local runs)")
    ks.set_defaults(func=_cmd_keys)

    dm = sub.add_parser("demo", help="run the whole path locally: control plane, S3, operator, workers, jobs")
    dm.add_argument("--workdir", default=None, help="where logs and state go (default: a temp dir)")
    dm.add_argument("--output-dir", default="demo-output", help="where job outputs are saved")
    dm.add_argument("--workers", type=int, default=2, help="worker processes in the demo pool")
    dm.add_argument("--operators", type=int, default=2, help="operator replicas (leader election on a Lease when > 1)")
    dm.add_argument("--keep-running", action="store_true", help="leave everything up for kubectl until Ctrl-C")
    dm.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "operator":  # kopf.configure() sets up the operator's logging
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from gpuroute.redact import install_log_redaction

        install_log_redaction()  # no presigned URL in any log line (the operator installs it after kopf's set-up)
    try:
        return int(args.func(args) or 0)
    except KeyError_ as exc:
        print(f"gpuroute: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
