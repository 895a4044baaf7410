"""Reads inputs from and writes outputs to object storage over presigned URLs.

The operator presigns (S3) or signs (Azure SAS) every URL for trusted storage; only a
user's own https:// input is untrusted and goes through the SSRF guard first.

- One pooled, keep-alive client per worker (urllib3), sized to the worker's concurrency,
  with one TLS context: a job pays no TCP or TLS handshake and no CA-bundle load once a
  connection to its storage endpoint is open.
- Every transfer runs under a total deadline, not only a per-read timeout: a watchdog
  thread shuts the socket down when it passes, which wakes a read that a trickling
  server would otherwise keep alive forever. A cancelled job does the same through
  `TransferHandle.abort`, so its thread is free at once.
- GETs (and presigned PUTs, which are idempotent) are retried with exponential backoff
  on connection errors, 5xx and throttling, inside the same deadline.
- Untrusted inputs are parsed and resolved once by gpuroute.netguard; the connection goes
  to that checked address, with SNI, certificate check and Host header on the name.
  Redirects are refused, and errors never name an address or a port.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError as Urllib3Error

from gpuroute.netguard import CheckedURL, UnsafeURL, resolve_public_https_url
from gpuroute.redact import redact

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MAX_RETRY_AFTER_S = 10.0

T = TypeVar("T")


@dataclass(frozen=True)
class TransferConfig:
    """How the worker talks to storage."""

    pool_size: int = 4
    """Keep-alive connections kept per storage host; the worker's concurrency."""
    connect_timeout_s: float = 10.0
    """TCP connect (and TLS handshake) limit of one attempt."""
    read_timeout_s: float = 30.0
    """Longest silence tolerated on an open connection."""
    total_timeout_s: float = 120.0
    """Whole transfer, retries and backoff included; also capped by the job's own deadline."""
    retries: int = 3
    """Extra attempts after a connection error, 5xx or throttling answer."""
    backoff_s: float = 0.2
    """First backoff; doubled after each retry (Retry-After is honoured up to 10 s)."""
    backoff_max_s: float = 5.0
    """Longest single backoff."""
    ca_file: str | None = None
    """PEM bundle to trust instead of the system's (private storage endpoints, tests)."""


class TransferError(RuntimeError):
    """Storage could not be reached or refused the request."""

    def __init__(self, message: str, *, permanent: bool, rejected: bool = False) -> None:
        # urllib3's errors quote the request path, presigned query included.
        super().__init__(redact(message))
        self.permanent = permanent
        """True when retrying cannot help (404, 403, too large, unsafe URL)."""
        self.rejected = rejected
        """Trusted storage answered 403 to a presigned URL: expired, or signed with rotated
        credentials. The operator signs again; the same URL would fail again here."""


class TransferAborted(TransferError):
    """The transfer was stopped: its deadline passed or its job was cancelled."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"transfer {reason}", permanent=False)
        self.reason = reason


class _Retryable(Exception):
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(redact(message))
        self.retry_after_s = retry_after_s


# ---------------------------------------------------------------------------- aborting


class TransferHandle:
    """Lets another thread stop a transfer: `abort` shuts down its open sockets.

    A blocked recv() returns as soon as its socket is shut down, which is the only way to
    stop a read that the server keeps alive by trickling bytes under the read timeout.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: set[HTTPConnection] = set()
        self._reason: str | None = None
        self._stopped = threading.Event()
        self.deadline = float("inf")
        """time.monotonic() after which the watchdog aborts the transfer."""
        self.finished = False
        """Set when the transfer returned; the watchdog then forgets it."""

    @property
    def reason(self) -> str | None:
        return self._reason

    def attach(self, connection: HTTPConnection) -> None:
        with self._lock:
            if self._reason is None:
                self._connections.add(connection)
                return
        _shutdown(connection)
        raise TransferAborted(self._reason)

    def detach(self, connection: HTTPConnection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def abort(self, reason: str) -> None:
        with self._lock:
            if self._reason is not None or self.finished:
                return
            self._reason = reason
            connections = list(self._connections)
        self._stopped.set()
        for connection in connections:
            _shutdown(connection)

    def check(self) -> None:
        if self._reason is not None:
            raise TransferAborted(self._reason)

    def sleep(self, seconds: float) -> None:
        """Back off for `seconds`, waking at once if aborted."""
        if self._stopped.wait(max(0.0, seconds)):
            self.check()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def _shutdown(connection: HTTPConnection) -> None:
    sock = getattr(connection, "sock", None)
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by its own thread: nothing left to wake


class _Watchdog:
    """One thread that aborts transfers whose deadline has passed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, TransferHandle]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, handle: TransferHandle) -> None:
        with self._cond:
            heapq.heappush(self._heap, (handle.deadline, next(self._order), handle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="transfer-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][2].finished:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, _, handle = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            handle.abort("ran past its deadline")


_WATCHDOG = _Watchdog()
_current = threading.local()


class _TrackedHTTPConnection(HTTPConnection):
    """Registers its socket with the transfer running on this thread, so it can be aborted."""

    def connect(self) -> None:
        super().connect()
        _register(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _register(self)  # a pooled connection being reused
        super().request(*args, **kwargs)


class _TrackedHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _register(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _register(self)
        super().request(*args, **kwargs)


def _register(connection: HTTPConnection) -> None:
    handle: TransferHandle | None = getattr(_current, "handle", None)
    if handle is not None:
        handle.attach(connection)


class _TrackedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _TrackedHTTPConnection


class _TrackedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPSConnection


# ---------------------------------------------------------------------------- client


def _status_error(action: str, status: int) -> TransferError:
    # 4xx other than throttling means the URL or its grant is wrong: retrying won't help.
    permanent = 400 <= status < 500 and status not in _RETRY_STATUSES
    return TransferError(f"{action} failed with HTTP {status}", permanent=permanent)


def _rejected(action: str) -> TransferError:
    # No URL in the message: it carries the signature, and the message reaches status and Events.
    return TransferError(f"{action} refused by storage (HTTP 403): the presigned URL expired or its "
                         "signature is no longer valid", permanent=True, rejected=True)


def _retry_after(response: urllib3.BaseHTTPResponse) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return min(_MAX_RETRY_AFTER_S, max(0.0, float(value)))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class TransferClient:
    """The worker's one HTTP client: pooled, deadline-bound, retrying, SSRF-safe."""

    def __init__(self, config: TransferConfig | None = None, *,
                 address_allowed: Callable[[str], bool] | None = None) -> None:
        self.config = config or TransferConfig()
        # One TLS context: the CA bundle is parsed once per worker, not once per connection.
        self._tls = ssl.create_default_context(cafile=self.config.ca_file)
        self._manager = urllib3.PoolManager(num_pools=16, maxsize=self.config.pool_size, block=False,
                                            ssl_context=self._tls)
        self._manager.pool_classes_by_scheme = {"http": _TrackedHTTPPool, "https": _TrackedHTTPSPool}
        self._address_allowed = address_allowed
        """Overrides netguard's public-address rule; only tests that serve from loopback set it."""

    def close(self) -> None:
        self._manager.clear()

    # ------------------------------------------------------------------ public calls

    def download(self, url: str, *, max_bytes: int, untrusted: bool, timeout_s: float | None = None,
                 handle: TransferHandle | None = None) -> bytes:
        """GET `url` into memory, at most `max_bytes`; untrusted URLs are checked first."""
        if untrusted:
            try:
                checked = resolve_public_https_url(url, is_allowed=self._address_allowed)
            except UnsafeURL as exc:
                raise TransferError(f"input URL refused: {exc}", permanent=True) from exc
            return self.download_checked(checked, max_bytes=max_bytes, timeout_s=timeout_s, handle=handle)
        with self._transfer(handle, timeout_s) as current:
            return self._with_retries(current, lambda: self._get_trusted(url, max_bytes))

    def download_checked(self, checked: CheckedURL, *, max_bytes: int, timeout_s: float | None = None,
                         handle: TransferHandle | None = None) -> bytes:
        """GET an untrusted URL from exactly the address that was checked."""
        with self._transfer(handle, timeout_s) as current:
            return self._with_retries(current, lambda: self._get_untrusted(checked, max_bytes))

    def upload(self, url: str, data: bytes, *, headers: Mapping[str, str], timeout_s: float | None = None,
               handle: TransferHandle | None = None) -> None:
        """PUT `data` to a presigned URL (idempotent, so retried like a GET)."""
        with self._transfer(handle, timeout_s) as current:
            self._with_retries(current, lambda: self._put(url, data, headers))

    # ------------------------------------------------------------------ machinery

    @contextmanager
    def _transfer(self, handle: TransferHandle | None, timeout_s: float | None) -> Iterator[TransferHandle]:
        current = handle or TransferHandle()
        budget = self.config.total_timeout_s if timeout_s is None else min(timeout_s, self.config.total_timeout_s)
        current.deadline = min(current.deadline, time.monotonic() + budget)
        _WATCHDOG.watch(current)
        previous = getattr(_current, "handle", None)
        _current.handle = current
        try:
            current.check()
            yield current
        finally:
            _current.handle = previous
            current.finished = True

    def _timeout(self, handle: TransferHandle) -> urllib3.Timeout:
        remaining = max(0.001, handle.remaining())
        return urllib3.Timeout(connect=min(self.config.connect_timeout_s, remaining),
                               read=min(self.config.read_timeout_s, remaining))

    def _with_retries(self, handle: TransferHandle, attempt: Callable[[], T]) -> T:
        delay = self.config.backoff_s
        for number in itertools.count():
            try:
                return attempt()
            except _Retryable as exc:
                handle.check()
                pause = exc.retry_after_s if exc.retry_after_s is not None else delay
                if number >= self.config.retries or pause >= handle.remaining():
                    raise TransferError(str(exc), permanent=False) from exc
                log.debug("retrying after %s (%.2f s)", exc, pause)
                handle.sleep(pause)
                delay = min(self.config.backoff_max_s, delay * 2)
        raise AssertionError("unreachable")

    def _read_body(self, response: urllib3.BaseHTTPResponse, max_bytes: int, handle: TransferHandle) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise TransferError(f"input is {declared} bytes, limit is {max_bytes}", permanent=True)
        chunks: list[bytes] = []
        received = 0
        for chunk in response.stream(_CHUNK, decode_content=False):
            received += len(chunk)
            if received > max_bytes:
                raise TransferError(f"input exceeds {max_bytes} bytes", permanent=True)
            chunks.append(chunk)
        handle.check()
        return b"".join(chunks)

    def _get_trusted(self, url: str, max_bytes: int) -> bytes:
        handle: TransferHandle = _current.handle
        try:
            response = self._manager.request(
                "GET", url, preload_content=False, timeout=self._timeout(handle),
                # Presigned storage may redirect (S3 region moves); nothing else is retried here.
                retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=3),
                headers={"Accept-Encoding": "identity"})
        except (Urllib3Error, OSError) as exc:
            if handle.reason is not None:
                raise TransferAborted(handle.reason) from exc
            raise _Retryable(f"download failed: {type(exc).__name__}") from exc
        complete = False
        try:
            if response.status in _RETRY_STATUSES:
                raise _Retryable(f"download failed with HTTP {response.status}", _retry_after(response))
            if response.status == 403:
                raise _rejected("download")
            if response.status != 200:
                raise _status_error("download", response.status)
            body = self._read_body(response, max_bytes, handle)
            complete = True
            return body
        except (Urllib3Error, OSError) as exc:
            if handle.reason is not None:
                raise TransferAborted(handle.reason) from exc
            raise _Retryable(f"download failed: {type(exc).__name__}") from exc
        finally:
            if complete:
                response.release_conn()  # back to the pool, open for the next job
            else:
                response.close()  # unread bytes would corrupt the connection's next use

    def _get_untrusted(self, checked: CheckedURL, max_bytes: int) -> bytes:
        handle: TransferHandle = _current.handle
        # A throwaway pool bound to the checked address: the host name is never resolved
        # again (no rebinding), and TLS is still verified against the name.
        pool = _TrackedHTTPSPool(checked.address, checked.port, maxsize=1, ssl_context=self._tls,
                                 server_hostname=checked.host, assert_hostname=checked.host,
                                 timeout=self._timeout(handle), retries=False)
        try:
            try:
                response = pool.urlopen("GET", checked.target, redirect=False, retries=False, preload_content=False,
                                        assert_same_host=False,
                                        headers={"Host": checked.host_header, "Accept-Encoding": "identity",
                                                 "User-Agent": "gpuroute-worker"})
            except urllib3.exceptions.SSLError as exc:
                raise TransferError(f"input host {checked.host!r} failed the TLS check", permanent=True) from exc
            except (Urllib3Error, OSError) as exc:
                if handle.reason is not None:
                    raise TransferAborted(handle.reason) from exc
                # No errno, address or port: the message must not map the network.
                raise _Retryable(f"input host {checked.host!r} could not be reached") from exc
            try:
                if 300 <= response.status < 400:
                    raise TransferError(f"input URL answered with a redirect (HTTP {response.status}); "
                                        "redirects are not followed", permanent=True)
                if response.status in _RETRY_STATUSES:
                    raise _Retryable(f"input URL answered HTTP {response.status}", _retry_after(response))
                if response.status != 200:
                    raise _status_error("input download", response.status)
                return self._read_body(response, max_bytes, handle)
            except (Urllib3Error, OSError) as exc:
                if handle.reason is not None:
                    raise TransferAborted(handle.reason) from exc
                raise _Retryable(f"input host {checked.host!r} broke off the transfer") from exc
            finally:
                response.close()
        finally:
            pool.close()

    def _put(self, url: str, data: bytes, headers: Mapping[str, str]) -> None:
        handle: TransferHandle = _current.handle
        try:
            response = self._manager.request("PUT", url, body=data, headers=dict(headers),
                                             timeout=self._timeout(handle), retries=False, redirect=False)
        except (Urllib3Error, OSError) as exc:
            if handle.reason is not None:
                raise TransferAborted(handle.reason) from exc
            raise _Retryable(f"upload failed: {type(exc).__name__}") from exc
        if response.status in _RETRY_STATUSES:
            raise _Retryable(f"upload failed with HTTP {response.status}", _retry_after(response))
        if response.status == 403:
            raise _rejected("upload")
        if response.status not in (200, 201, 204):
            raise _status_error("upload", response.status)


# ---------------------------------------------------------------------------- asyncio


async def in_thread(call: Callable[[TransferHandle], T]) -> T:
    """Run `call(handle)` on a thread; if the awaiting task is cancelled or times out,
    abort the transfer so the thread is free at once instead of when the server stops."""
    handle = TransferHandle()
    future = asyncio.get_running_loop().run_in_executor(None, call, handle)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        handle.abort("cancelled")
        raise


# ---------------------------------------------------------------------------- one-off calls

_shared: TransferClient | None = None
_shared_lock = threading.Lock()


def shared_client() -> TransferClient:
    """A process-wide pooled client for code outside a JobRunner (benchmarks, tools)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = TransferClient()
        return _shared


def download(url: str, *, max_bytes: int, untrusted: bool, timeout_s: float) -> bytes:
    return shared_client().download(url, max_bytes=max_bytes, untrusted=untrusted, timeout_s=timeout_s)


def upload(url: str, data: bytes, *, headers: Mapping[str, str], timeout_s: float) -> None:
    shared_client().upload(url, data, headers=headers, timeout_s=timeout_s)
