"""/healthz, /readyz and Prometheus /metrics on a small HTTP server thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


def serve_health(port: int, is_ready: Callable[[], bool], host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start the server in a daemon thread; /healthz is liveness, /readyz needs the operator."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._reply(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                # Liveness does not depend on the operator: restarting a worker cannot fix it.
                self._reply(200, b"ok\n")
            elif self.path == "/readyz":
                ready = is_ready()
                self._reply(200 if ready else 503, b"ready\n" if ready else b"not connected to the operator\n")
            else:
                self._reply(404, b"not found\n")

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # probes every few seconds would drown the job log

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server
