"""Real HTTP(S) servers on 127.0.0.1 for the transfer tests: scripted answers, a trickling
body, connection counting, and a self-signed certificate for any host names.

Not a test module (no test_ prefix); imported by the transfer tests.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Reply:
    """One scripted answer."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    trickle_s: float = 0.0
    """Pause between body bytes (a slow-loris server); 0 sends the body at once."""
    chunked_repeat: int = 0
    """When set, the body is sent this many times over as a chunked body with no
    Content-Length (a streamed answer whose size only the bytes tell)."""


@dataclass
class Recorded:
    method: str
    path: str
    host: str
    body: bytes


class ScriptedServer:
    """Answers requests from a queue of Replies (the last one repeats); counts connections."""

    def __init__(self, replies: list[Reply], *, tls: tuple[Path, Path] | None = None) -> None:
        self.replies = list(replies)
        self.requests: list[Recorded] = []
        self.connections = 0
        self.open_handlers = 0
        self.body_bytes_sent = 0
        """Body bytes handed to the socket, over all replies."""
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so pooling is visible

            def setup(self) -> None:
                super().setup()
                with outer._lock:
                    outer.connections += 1

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with outer._lock:
                    outer.requests.append(Recorded(self.command, self.path, self.headers.get("Host", ""), body))
                    reply = outer.replies.pop(0) if len(outer.replies) > 1 else outer.replies[0]
                    outer.open_handlers += 1
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    if reply.chunked_repeat:
                        self._send_chunked(reply)
                        return
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    if reply.trickle_s:
                        for index in range(len(reply.body)):
                            self.wfile.write(reply.body[index:index + 1])
                            self.wfile.flush()
                            time.sleep(reply.trickle_s)
                    else:
                        self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                finally:
                    with outer._lock:
                        outer.open_handlers -= 1

            def _send_chunked(self, reply: Reply) -> None:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for _ in range(reply.chunked_repeat):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(reply.body), reply.body))
                    with outer._lock:
                        outer.body_bytes_sent += len(reply.body)
                self.wfile.write(b"0\r\n\r\n")

            do_GET = do_PUT = _answer

            def log_message(self, *_: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def serving(replies: list[Reply], *, tls: tuple[Path, Path] | None = None) -> Iterator[ScriptedServer]:
    server = ScriptedServer(replies, tls=tls)
    try:
        yield server
    finally:
        server.close()


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()
