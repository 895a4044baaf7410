"""Non-blocking sends on an asyncio ZeroMQ socket that report failure at once.

With flags=NOBLOCK, pyzmq's asyncio socket puts EHOSTUNREACH/EAGAIN into the Future it
returns instead of raising, and logs it later as "exception was never retrieved". Sending
through a synchronous shadow of the socket instead would raise, but would also consume
the socket's edge-triggered readiness without the asyncio wrapper noticing, so a pending
receive could stall for seconds. Sending through the asyncio socket and reading its
Future right away keeps both right.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import cast

import zmq
import zmq.asyncio

log = logging.getLogger(__name__)


def send_now(socket: zmq.asyncio.Socket, frames: Sequence[bytes]) -> zmq.ZMQError | None:
    """Send `frames` without blocking; the ZeroMQ error if the send failed at once, else None."""
    # pyzmq types it as an Awaitable; it is an asyncio Future.
    future = cast("asyncio.Future[object]", socket.send_multipart(list(frames), flags=zmq.NOBLOCK))
    if future.done():
        error = future.exception()
        if error is None:
            return None
        if isinstance(error, zmq.ZMQError):
            return error
        raise error
    future.add_done_callback(_report_late_failure)
    return None


def _report_late_failure(future: asyncio.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("a queued send failed: %s", future.exception())
