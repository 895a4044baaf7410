"""The worker's storage client against real HTTP(S) servers on 127.0.0.1: pooling,
retries, total deadlines, cancellation, and the SSRF rules for untrusted inputs."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gpuroute.netguard import CheckedURL
from gpuroute_dev.localenv.tls import self_signed
from gpuroute_worker.transfer import TransferAborted, TransferClient, TransferConfig, TransferError, in_thread
from tests.unit.gpuroute_worker.http_testutil import Reply, serving, wait_until

FAST = TransferConfig(pool_size=2, connect_timeout_s=2, read_timeout_s=5, total_timeout_s=10, retries=3,
                      backoff_s=0.01, backoff_max_s=0.05)


def _loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"), ["localhost", "images.example.invalid", "127.0.0.1"])


def test_sequential_transfers_share_one_keep_alive_connection() -> None:
    client = TransferClient(FAST)
    with serving([Reply(body=b"x" * 1000)]) as server:
        url = f"http://127.0.0.1:{server.port}/in.png"
        for _ in range(5):
            assert client.download(url, max_bytes=1 << 20, untrusted=False) == b"x" * 1000
            client.upload(url, b"out", headers={"Content-Type": "image/png"})
    assert server.connections == 1
    assert [r.method for r in server.requests] == ["GET", "PUT"] * 5
    assert server.requests[1].body == b"out"


def test_tls_transfers_share_one_connection(cert: tuple[Path, Path]) -> None:
    client = TransferClient(TransferConfig(ca_file=str(cert[0])))
    with serving([Reply(body=b"y" * 10)], tls=cert) as server:
        for _ in range(4):
            assert client.download(f"https://localhost:{server.port}/k", max_bytes=100, untrusted=False) == b"y" * 10
    assert server.connections == 1


def test_get_is_retried_on_5xx_and_throttling() -> None:
    client = TransferClient(FAST)
    replies = [Reply(503), Reply(429, headers={"Retry-After": "0"}), Reply(500), Reply(body=b"ok")]
    with serving(replies) as server:
        assert client.download(f"http://127.0.0.1:{server.port}/k", max_bytes=100, untrusted=False) == b"ok"
    assert len(server.requests) == 4


def test_retries_give_up_as_retryable() -> None:
    client = TransferClient(FAST)
    with serving([Reply(503)]) as server:
        with pytest.raises(TransferError) as caught:
            client.download(f"http://127.0.0.1:{server.port}/k", max_bytes=100, untrusted=False)
    assert caught.value.permanent is False
    assert "HTTP 503" in str(caught.value)
    assert len(server.requests) == 1 + FAST.retries


def test_put_is_retried_and_4xx_is_permanent() -> None:
    client = TransferClient(FAST)
    with serving([Reply(502), Reply(200)]) as server:
        client.upload(f"http://127.0.0.1:{server.port}/o", b"data", headers={})
    assert [r.body for r in server.requests] == [b"data", b"data"]
    with serving([Reply(403)]) as server:
        with pytest.raises(TransferError) as caught:
            client.download(f"http://127.0.0.1:{server.port}/k", max_bytes=100, untrusted=False)
    assert caught.value.permanent is True
    assert len(server.requests) == 1


def test_size_limit_is_permanent() -> None:
    client = TransferClient(FAST)
    with serving([Reply(body=b"z" * 5000)]) as server:
        with pytest.raises(TransferError, match="limit is 100") as caught:
            client.download(f"http://127.0.0.1:{server.port}/k", max_bytes=100, untrusted=False)
    assert caught.value.permanent is True


def test_chunked_body_over_the_limit_is_cut_off_at_the_limit() -> None:
    # No Content-Length to refuse up front: only the count of streamed bytes can stop it.
    client = TransferClient(FAST)
    chunk, repeat = b"c" * 65536, 1024  # 64 MiB offered, 1 MiB allowed
    with serving([Reply(body=chunk, chunked_repeat=repeat)]) as server:
        with pytest.raises(TransferError, match=f"exceeds {1 << 20} bytes") as caught:
            client.download(f"http://127.0.0.1:{server.port}/k", max_bytes=1 << 20, untrusted=False)
        assert caught.value.permanent is True
        # The reader hung up near the limit: the server never got the rest out.
        assert wait_until(lambda: server.open_handlers == 0, 10.0)
        assert server.body_bytes_sent < len(chunk) * repeat // 2


def test_chunked_body_within_the_limit_is_read_whole() -> None:
    client = TransferClient(FAST)
    with serving([Reply(body=b"k" * 1000, chunked_repeat=3)]) as server:
        assert client.download(f"http://127.0.0.1:{server.port}/k", max_bytes=3000, untrusted=False) == b"k" * 3000


def test_trickling_server_is_cut_off_at_the_total_deadline() -> None:
    # One byte every 0.2 s never trips a 5 s read timeout; only a total deadline stops it.
    client = TransferClient(FAST)
    with serving([Reply(body=b"s" * 200, trickle_s=0.2)]) as server:
        started = time.monotonic()
        with pytest.raises(TransferAborted) as caught:
            client.download(f"http://127.0.0.1:{server.port}/slow", max_bytes=1 << 20, untrusted=False, timeout_s=0.6)
        elapsed = time.monotonic() - started
        assert elapsed < 5.0  # the whole body would take 40 s; loose for a busy machine
        assert caught.value.permanent is False
        assert "deadline" in str(caught.value)
        # The server notices the closed socket at its next write.
        assert wait_until(lambda: server.open_handlers == 0, 3.0)


def test_total_deadline_covers_backoff_too() -> None:
    client = TransferClient(TransferConfig(retries=10, backoff_s=0.3, backoff_max_s=0.3, total_timeout_s=0.5))
    with serving([Reply(503)]) as server:
        started = time.monotonic()
        with pytest.raises(TransferError):
            client.download(f"http://127.0.0.1:{server.port}/k", max_bytes=100, untrusted=False)
        # Ten backoffs alone would take 3 s: stopping well before shows the deadline covers them.
        assert time.monotonic() - started < 2.5
        assert len(server.requests) <= 3


def _download_in_thread(url: Callable[[], str]) -> tuple[Callable[[object], bytes], threading.Event]:
    """A download for in_thread, and an event set when its thread has let go (returned or raised)."""
    client = TransferClient(FAST)
    thread_done = threading.Event()

    def call(handle: object) -> bytes:
        try:
            return client.download(url(), max_bytes=1 << 20, untrusted=False, handle=handle)  # type: ignore[arg-type]
        finally:
            thread_done.set()

    return call, thread_done


def test_cancelled_job_frees_its_transfer_thread_at_once() -> None:
    call, thread_done = _download_in_thread(lambda: url)

    async def scenario() -> float:
        task = asyncio.create_task(in_thread(call))
        await asyncio.sleep(0.4)
        task.cancel()
        cancelled_at = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(thread_done.wait, 5.0)
        return time.monotonic() - cancelled_at

    with serving([Reply(body=b"s" * 500, trickle_s=0.1)]) as server:
        url = f"http://127.0.0.1:{server.port}/slow"
        freed_after = asyncio.run(scenario())
    assert thread_done.is_set()
    assert freed_after < 5.0  # the trickle would hold the thread for 50 s; loose for a busy machine


def test_asyncio_timeout_aborts_the_transfer() -> None:
    call, thread_done = _download_in_thread(lambda: url)

    async def scenario() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await in_thread(call)

    with serving([Reply(body=b"s" * 500, trickle_s=0.1)]) as server:
        url = f"http://127.0.0.1:{server.port}/slow"
        asyncio.run(scenario())
        assert thread_done.wait(5.0)  # of a 50 s trickle


# ---------------------------------------------------------------------------- untrusted inputs


@pytest.mark.parametrize("url", [
    "https://user:pw@8.8.8.8/a.png",
    "https://10.0.0.5:6443\\@8.8.8.8/",
    "http://8.8.8.8/a.png",
])
def test_untrusted_url_shapes_are_refused(url: str) -> None:
    with pytest.raises(TransferError) as caught:
        TransferClient(FAST).download(url, max_bytes=100, untrusted=True)
    assert caught.value.permanent is True
    assert str(caught.value).startswith("input URL refused: ")


def test_untrusted_loopback_is_refused_by_default() -> None:
    with serving([Reply(body=b"secret")]) as server:
        with pytest.raises(TransferError) as caught:
            TransferClient(FAST).download(f"https://localhost:{server.port}/", max_bytes=100, untrusted=True)
        assert server.requests == []
    assert caught.value.permanent is True
    assert str(server.port) not in str(caught.value)
    assert "127.0.0.1" not in str(caught.value)


def test_untrusted_fetch_connects_to_the_checked_address_without_resolving_again(cert: tuple[Path, Path]) -> None:
    # `images.example.invalid` cannot resolve: the fetch succeeds only because it connects to
    # the address that was checked, with SNI, certificate and Host on the name.
    client = TransferClient(TransferConfig(ca_file=str(cert[0])), address_allowed=_loopback)
    with serving([Reply(body=b"image")], tls=cert) as server:
        checked = CheckedURL(host="images.example.invalid", port=server.port, target="/a.png?sig=1",
                             address="127.0.0.1")
        assert client.download_checked(checked, max_bytes=100) == b"image"
    assert server.requests[0].path == "/a.png?sig=1"
    assert server.requests[0].host == f"images.example.invalid:{server.port}"


def test_untrusted_fetch_verifies_the_certificate_against_the_name(cert: tuple[Path, Path]) -> None:
    client = TransferClient(TransferConfig(ca_file=str(cert[0])), address_allowed=_loopback)
    with serving([Reply(body=b"image")], tls=cert) as server:
        checked = CheckedURL(host="other.example.invalid", port=server.port, target="/", address="127.0.0.1")
        with pytest.raises(TransferError, match="failed the TLS check") as caught:
            client.download_checked(checked, max_bytes=100)
    assert caught.value.permanent is True
    assert "127.0.0.1" not in str(caught.value) and str(server.port) not in str(caught.value)


def test_untrusted_redirects_are_not_followed(cert: tuple[Path, Path]) -> None:
    client = TransferClient(TransferConfig(ca_file=str(cert[0])), address_allowed=_loopback)
    with serving([Reply(302, headers={"Location": "https://169.254.169.254/latest/meta-data/"})], tls=cert) as server:
        with pytest.raises(TransferError, match="redirects are not followed") as caught:
            client.download(f"https://localhost:{server.port}/a.png", max_bytes=100, untrusted=True)
    assert caught.value.permanent is True
    assert len(server.requests) == 1


def test_untrusted_connection_errors_do_not_describe_the_port() -> None:
    # Whether a port is closed, filtered or open must not show in the message.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = TransferClient(TransferConfig(retries=0, connect_timeout_s=1), address_allowed=_loopback)
    with pytest.raises(TransferError) as caught:
        client.download(f"https://localhost:{port}/a.png", max_bytes=100, untrusted=True)
    message = str(caught.value)
    assert message == "input host 'localhost' could not be reached"
    assert str(port) not in message


def test_untrusted_trickle_is_cut_off(cert: tuple[Path, Path]) -> None:
    client = TransferClient(TransferConfig(ca_file=str(cert[0]), read_timeout_s=5), address_allowed=_loopback)
    with serving([Reply(body=b"s" * 100, trickle_s=0.2)], tls=cert) as server:
        started = time.monotonic()
        with pytest.raises(TransferAborted):
            client.download(f"https://localhost:{server.port}/a.png", max_bytes=100, untrusted=True, timeout_s=0.5)
        assert time.monotonic() - started < 5.0  # of a 20 s trickle


def test_in_thread_returns_the_result() -> None:
    client = TransferClient(FAST)
    with serving([Reply(body=b"r")]) as server:
        call = functools.partial(client.download, f"http://127.0.0.1:{server.port}/", max_bytes=10, untrusted=False)
        assert asyncio.run(in_thread(lambda handle: call(handle=handle))) == b"r"


# -- a 403 from trusted storage is "rejected" (the operator re-signs); a user's 403 is not --


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_trusted_403_is_rejected_without_naming_the_url(method: str) -> None:
    client = TransferClient(FAST)
    with serving([Reply(403, body=b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>")]) \
            as server:
        url = f"http://127.0.0.1:{server.port}/b/k.png?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA"
        with pytest.raises(TransferError) as caught:
            if method == "GET":
                client.download(url, max_bytes=100, untrusted=False)
            else:
                client.upload(url, b"data", headers={})
    assert caught.value.rejected is True and caught.value.permanent is True
    message = str(caught.value)
    assert "HTTP 403" in message and "expired" in message
    for secret in ("deadbeef", "AKIA", "X-Amz", "k.png", str(server.port)):
        assert secret not in message
    assert len(server.requests) == 1  # the same URL would fail again: no retry


def test_trusted_404_is_not_rejected() -> None:
    with serving([Reply(404)]) as server:
        with pytest.raises(TransferError) as caught:
            TransferClient(FAST).download(f"http://127.0.0.1:{server.port}/k", max_bytes=100, untrusted=False)
    assert caught.value.rejected is False and caught.value.permanent is True


def test_untrusted_403_is_the_users_problem_not_an_expired_url(cert: tuple[Path, Path]) -> None:
    client = TransferClient(TransferConfig(ca_file=str(cert[0])), address_allowed=_loopback)
    with serving([Reply(403)], tls=cert) as server:
        checked = CheckedURL(host="images.example.invalid", port=server.port, target="/a.png", address="127.0.0.1")
        with pytest.raises(TransferError) as caught:
            client.download_checked(checked, max_bytes=100)
    assert caught.value.rejected is False and caught.value.permanent is True
