"""The status listener's rules: which token audiences pass, when plain HTTP is refused,
HTTPS from certificate files, and how long a review answer is reused."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gpuroute_dev.localenv.tls import self_signed
from gpuroute_operator.web.console import (
    DEFAULT_AUDIENCES,
    Reviewer,
    TLSFiles,
    WebConfig,
    audience_accepted,
    plain_http_refusal,
    start_web,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- audiences ------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "apiserver", "accepted"), [
    ({"authenticated": True, "audiences": ["gpuroute"]}, True, True),
    ({"authenticated": True, "audiences": ["gpuroute", "other"]}, False, True),
    ({"authenticated": True, "audiences": ["vault"]}, True, False),          # answered outside what was asked
    ({"authenticated": True, "audiences": []}, True, True),                  # audience-agnostic: API server's own
    ({"authenticated": True}, False, False),
    ({"authenticated": False, "audiences": ["gpuroute"]}, True, False),
    ({}, True, False),
])
def test_audience_accepted(status: dict[str, Any], apiserver: bool, accepted: bool) -> None:
    assert audience_accepted(status, ("gpuroute",), apiserver_audience=apiserver) is accepted


class _RecordingKube:
    """Answers TokenReviews as an API server whose own audience is `api`: a token is
    `name@aud1,aud2`; the review records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[list[str] | None] = []
        self.deleted: set[str] = set()
        """ServiceAccounts deleted since: their tokens no longer authenticate."""

    async def request(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        assert (method, path) == ("POST", "/apis/authentication.k8s.io/v1/tokenreviews")
        asked = body["spec"].get("audiences")
        self.asked.append(asked)
        name, _, auds = body["spec"]["token"].partition("@")
        granted = sorted(set(auds.split(",")) & set(asked or ["api"]))
        if not granted or name in self.deleted:
            return 201, {"status": {"authenticated": False, "error": "invalid"}}
        return 201, {"status": {"authenticated": True, "audiences": granted, "user": {"username": name}}}


def test_reviewer_asks_for_the_gpuroute_audience_then_the_api_servers() -> None:
    async def run() -> None:
        kube = _RecordingKube()
        reviewer = Reviewer(kube, clock=lambda: 0.0)  # type: ignore[arg-type]
        caller = await reviewer.authenticate("a@gpuroute")
        assert caller is not None and caller.username == "a" and kube.asked == [list(DEFAULT_AUDIENCES)]
        caller = await reviewer.authenticate("b@api")
        assert caller is not None and caller.username == "b" and kube.asked[1:] == [["gpuroute"], None]
        assert await reviewer.authenticate("c@vault") is None
        strict = Reviewer(kube, apiserver_audience=False, clock=lambda: 0.0)  # type: ignore[arg-type]
        assert await strict.authenticate("b@api") is None
        assert await strict.authenticate("a@gpuroute") is not None
        custom = Reviewer(kube, audiences=("images",), clock=lambda: 0.0)  # type: ignore[arg-type]
        assert await custom.authenticate("a@gpuroute") is None
        assert await custom.authenticate("d@images") is not None

    asyncio.run(run())


def test_a_review_answer_is_reused_for_seconds_not_half_a_minute() -> None:
    assert WebConfig().cache_ttl_s <= 5.0

    async def run() -> None:
        now = [0.0]
        kube = _RecordingKube()
        reviewer = Reviewer(kube, ttl_s=WebConfig().cache_ttl_s, clock=lambda: now[0])  # type: ignore[arg-type]
        assert await reviewer.authenticate("a@gpuroute") is not None
        now[0] = 4.0
        assert await reviewer.authenticate("a@gpuroute") is not None and reviewer.reviews == 1
        kube.deleted.add("a")
        now[0] = 5.5  # past the TTL: the deleted ServiceAccount's token is refused
        assert await reviewer.authenticate("a@gpuroute") is None
        assert reviewer.reviews == 3  # refused for gpuroute, then for the API server's audience
        now[0] = 9.0  # a refusal is reused as briefly
        assert await reviewer.authenticate("a@gpuroute") is None and reviewer.reviews == 3
        kube.deleted.clear()
        now[0] = 11.0
        assert await reviewer.authenticate("a@gpuroute") is not None and reviewer.reviews == 4

    asyncio.run(run())


# -- plain HTTP and TLS ----------------------------------------------------------------

@pytest.mark.parametrize(("config", "refused"), [
    (WebConfig(), True),                                                       # 0.0.0.0, no certificate
    (WebConfig(bind="10.0.0.5"), True),
    (WebConfig(bind="::"), True),
    (WebConfig(bind="127.0.0.1"), False),
    (WebConfig(bind="::1"), False),
    (WebConfig(bind="localhost"), False),
    (WebConfig(port=None), False),
    (WebConfig(insecure_http=True), False),
    (WebConfig(tls=TLSFiles("c.pem", "k.pem")), False),
])
def test_plain_http_refusal(config: WebConfig, refused: bool) -> None:
    assert (plain_http_refusal(config) is not None) is refused


def test_start_web_refuses_plain_http_on_a_reachable_address() -> None:
    with pytest.raises(ValueError, match="plain HTTP"):
        asyncio.run(start_web(dict, None, WebConfig(metrics_port=None)))  # type: ignore[arg-type]


def test_the_status_port_serves_https_from_certificate_files(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, ("127.0.0.1",))
    port = _free_port()

    async def run() -> None:
        server = await start_web(dict, None, WebConfig(  # type: ignore[arg-type]
            port=port, metrics_port=None, bind="127.0.0.1", tls=TLSFiles(str(cert), str(key))))
        try:
            trusted = ssl.create_default_context(cafile=str(cert))
            async with aiohttp.ClientSession() as session:
                async with session.get(f"https://127.0.0.1:{port}/", ssl=trusted) as answer:
                    assert answer.status == 200 and "<html" in (await answer.text()).lower()
                async with session.get(f"https://127.0.0.1:{port}/api/status", ssl=trusted) as answer:
                    assert answer.status == 401  # no token: refused before any review
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await session.get(f"https://127.0.0.1:{port}/healthz")  # an unknown certificate
                with pytest.raises(aiohttp.ClientError):
                    await session.get(f"http://127.0.0.1:{port}/healthz")  # no plain HTTP on that port
        finally:
            await server.cleanup()

    asyncio.run(run())
