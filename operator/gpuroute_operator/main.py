"""Run the operator under kopf, behind leader election when two replicas run."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.server
import logging
import os
import sys
import threading
from collections.abc import Iterator

import kopf

from gpuroute.redact import install_log_redaction
from gpuroute_operator.kube.leader import LeaderElectionConfig, LeaderElector, kube_api_client
from gpuroute_operator.shell import handlers
from gpuroute_operator.shell.engine import EngineConfig
from gpuroute_operator.web.console import WebConfig

log = logging.getLogger("gpuroute.leader")


def run_operator(config: EngineConfig, *, web: WebConfig, liveness_port: int | None, verbose: bool,
                 election: LeaderElectionConfig | None = None) -> None:
    if config.kubeconfig:
        # kopf's login and pykube both read $KUBECONFIG.
        os.environ["KUBECONFIG"] = config.kubeconfig
    kopf.configure(verbose=verbose, log_prefix=True)
    # After kopf's handlers exist: every record, and every Event kopf posts from one, is redacted.
    install_log_redaction()
    liveness = f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None
    elector: LeaderElector | None = None
    if election is not None:
        # As controller-runtime's manager does: nothing starts before this replica
        # holds the Lease, so only the leader binds the socket and writes status, and
        # the ImageJob watch's initial listing hands a new leader every ImageJob to resume.
        elector = LeaderElector(kube_api_client(config.kubeconfig), election)
        with _standby_health(liveness_port, elector):
            elector.wait_until_leading()
        elector.start_renewing(on_lost=_exit_on_lost)
        # A fresh start, or a predecessor that handed the Lease back after flushing its status
        # writes, leaves nothing in flight that status does not show: no need to wait for workers.
        config = dataclasses.replace(config, resume_hold=elector.took_over)
    try:
        asyncio.run(kopf.operator(
            standalone=True,
            clusterwide=True,
            memo=handlers.make_memo(config, web=web),
            liveness_endpoint=liveness,
        ))
    finally:
        # After kopf's cleanup (socket closed, status flushed): handing the Lease back
        # now lets a follower take over without waiting for expiry.
        if elector is not None:
            elector.release()


def _exit_on_lost(reason: str) -> None:
    """Leadership lost: exit at once, as controller-runtime does, since a follower may
    already be taking over and a graceful kopf shutdown could still write status."""
    message = f"gpuroute operator: leader election lost ({reason}); exiting"
    log.critical(message)
    # os._exit skips handlers that would flush; say it on stderr directly too.
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(1)


@contextlib.contextmanager
def _standby_health(port: int | None, elector: LeaderElector) -> Iterator[None]:
    """/healthz on the liveness port while standing by: the replica is alive (the
    kubelet must not restart it) but serves nothing; kopf's own endpoint takes the port
    over once leading."""
    if not port:
        yield
        return

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/healthz":
                self.send_error(404)
                return
            body = f"standby: not leading; Lease held by {elector.holder or 'nobody'}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="standby-health", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
