"""A userspace TCP proxy on loopback, for failure and latency tests.

It forwards one local port to one upstream address and can:
- go down for a while (`outage`): the listener closes and every live connection is cut,
  as when an endpoint stops; clients see refused connections until it comes back;
- add a one-way delay to every chunk in both directions (`delay_s`), as a cross-cloud
  link would (35 ms each way is a 70 ms round trip).

It runs its own asyncio loop in a daemon thread, so blocking test code can drive it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from typing import Any


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, delay_s: float = 0.0, port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay_s = delay_s
        self.port = port
        self.connections = 0
        """Connections accepted since start."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        if self._loop.is_running():
            self._call(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def outage(self, seconds: float) -> None:
        """Be down for `seconds` (blocks): refuse new connections and cut the live ones."""
        self._call(self._close())
        time.sleep(seconds)
        self._call(self._listen())

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.delay_s:
            await self._delay_line(reader, writer)
            return
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _delay_line(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Each chunk leaves `delay_s` after it arrived, in order: a link's latency, not a
        bandwidth cap (sleeping before each write would add the delay once per chunk, so a
        200 KB message would take several delays to cross)."""
        line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            while True:
                due, chunk = await line.get()
                if not chunk:
                    return
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()

        sender = loop.create_task(deliver())
        try:
            while chunk := await reader.read(65536):
                line.put_nowait((loop.time() + self.delay_s, chunk))
            line.put_nowait((loop.time() + self.delay_s, b""))
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            self._writers.discard(writer)
            writer.close()
