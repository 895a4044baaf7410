"""ZAP authentication for the operator's CURVE server socket (ZeroMQ RFC 27).

Only public keys listed in a WorkerPool's keys Secret get in, and where the pool sets
allowedSourceCIDRs only from those networks. The reply's User-Id names the principal:
`<pool>/<key name>/<public key>` (see pools.Principal). Every message a worker sends
carries it in its frame metadata, so the operator knows which pool and key each message
came from whatever the message says: a worker cannot claim another pool.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import zmq
import zmq.asyncio
from zmq.utils import z85

from gpuroute.aio import stop_tasks
from gpuroute_operator import metrics
from gpuroute_operator.core.identity import Principal

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"


@dataclass(frozen=True)
class Admission:
    """Who may connect for one pool."""

    pool: str
    """WorkerPool name."""
    key: str
    """The key's name in the pool's Secret."""
    cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    """Source networks allowed; empty allows any address."""


class ZapHandler:
    """Answers libzmq's authentication requests from the in-process ZAP socket."""

    def __init__(self, context: zmq.asyncio.Context) -> None:
        self._context = context
        self._keys: dict[bytes, Admission] = {}
        self._socket: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None

    def set_pool_keys(self, pool: str, keys: Mapping[str, bytes],
                      cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> list[Principal]:
        """Replace the keys admitted for `pool` (name -> Z85 public key); returns who is admitted now."""
        self._keys = {k: a for k, a in self._keys.items() if a.pool != pool}
        admitted = []
        for name, key in keys.items():
            owner = self._keys.get(key)
            if owner is not None and owner.pool != pool:
                log.error("key %s… is listed by pools %s and %s; keeping %s", key[:8].decode(), owner.pool, pool, owner.pool)
                continue
            self._keys[key] = Admission(pool, name, cidrs)
            admitted.append(Principal(pool, name, key.decode()))
        return admitted

    def remove_pool(self, pool: str) -> None:
        self._keys = {k: a for k, a in self._keys.items() if a.pool != pool}

    def admitted_pools(self) -> Mapping[str, int]:
        counts: dict[str, int] = {}
        for admission in self._keys.values():
            counts[admission.pool] = counts.get(admission.pool, 0) + 1
        return counts

    def start(self) -> None:
        # Must be bound before any CURVE server socket binds, or libzmq skips ZAP.
        socket = self._context.socket(zmq.REP)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(ZAP_ENDPOINT)
        self._socket = socket
        self._task = asyncio.get_running_loop().create_task(self._serve(), name="zap")

    async def stop(self) -> None:
        await stop_tasks(self._task)
        if self._socket is not None:
            self._socket.close()

    def decide(self, address: str, mechanism: bytes, credentials: list[bytes]) -> tuple[bytes, bytes, str]:
        """(status code, status text, user id) for one request."""
        if mechanism != b"CURVE" or len(credentials) != 1:
            return b"400", b"CURVE required", ""
        public = z85.encode(credentials[0])
        admission = self._keys.get(public)
        if admission is None:
            return b"400", b"unknown key", ""
        if admission.cidrs:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return b"400", b"unparseable source address", ""
            if not any(ip in net for net in admission.cidrs):
                return b"400", b"source address not allowed for pool", ""
        return b"200", b"OK", Principal(admission.pool, admission.key, public.decode()).user_id

    async def _serve(self) -> None:
        assert self._socket is not None
        while True:
            request = await self._socket.recv_multipart()
            if len(request) < 6:
                # Malformed ZAP traffic can only come from inside the process: still answer.
                await self._socket.send_multipart([ZAP_VERSION, b"", b"500", b"malformed", b"", b""])
                continue
            version, request_id, _domain, address, _identity, mechanism, *credentials = request
            try:
                code, text, user = self.decide(address.decode(errors="replace"), mechanism, credentials)
            except Exception:  # a bug here must refuse one peer, not stop authentication
                log.exception("ZAP decision failed")
                code, text, user = b"500", b"internal error", ""
            if code != b"200":
                key = z85.encode(credentials[0]).decode() if len(credentials) == 1 and len(credentials[0]) == 32 else "?"
                metrics.REJECTED_CONNECTIONS.labels(text.decode()).inc()
                log.warning("refused connection from %s (key %s): %s", address.decode(errors="replace"), key, text.decode())
            await self._socket.send_multipart([version, request_id, code, text, user.encode(), b""])
