"""ZAP decisions, and the handler in front of a real CURVE ROUTER socket."""

from __future__ import annotations

import asyncio
import ipaddress

import zmq
import zmq.asyncio
from zmq.utils import z85

from gpuroute import protocol
from gpuroute.curve_keys import KeyPair
from gpuroute_operator.zap import ZapHandler


def _raw(pair: KeyPair) -> list[bytes]:
    return [z85.decode(pair.public)]


def test_decisions() -> None:
    context = zmq.asyncio.Context()
    try:
        zap = ZapHandler(context)
        a, b, stranger = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
        zap.set_pool_keys("pool-a", [a.public], ())
        zap.set_pool_keys("pool-b", [b.public, a.public], (ipaddress.ip_network("10.1.0.0/16"),))
        assert zap.decide("127.0.0.1", b"CURVE", _raw(a)) == (b"200", b"OK", "pool-a")  # first pool keeps the key
        assert zap.decide("10.1.2.3", b"CURVE", _raw(b)) == (b"200", b"OK", "pool-b")
        assert zap.decide("10.2.0.1", b"CURVE", _raw(b))[0] == b"400"
        assert zap.decide("127.0.0.1", b"CURVE", _raw(stranger))[1] == b"unknown key"
        assert zap.decide("127.0.0.1", b"PLAIN", [b"u", b"p"])[1] == b"CURVE required"
        zap.remove_pool("pool-a")
        assert zap.decide("127.0.0.1", b"CURVE", _raw(a))[0] == b"400"
    finally:
        context.term()


async def _round_trip(admitted: bool) -> str | None:
    context = zmq.asyncio.Context()
    server, client = KeyPair.generate(), KeyPair.generate()
    zap = ZapHandler(context)
    zap.set_pool_keys("pool-a", [client.public] if admitted else [], ())
    zap.start()
    router = context.socket(zmq.ROUTER)
    dealer = context.socket(zmq.DEALER)
    try:
        for sock in (router, dealer):
            sock.setsockopt(zmq.LINGER, 0)
        router.curve_server = True
        router.curve_secretkey = server.secret
        router.curve_publickey = server.public
        router.setsockopt(zmq.ZAP_DOMAIN, b"gpuroute")
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.curve_secretkey, dealer.curve_publickey, dealer.curve_serverkey = client.secret, client.public, server.public
        dealer.connect(f"tcp://127.0.0.1:{port}")
        await dealer.send_multipart(protocol.encode(protocol.Kind.HEARTBEAT, {}))
        try:
            frames = await asyncio.wait_for(router.recv_multipart(copy=False), timeout=2.0 if admitted else 1.0)
        except TimeoutError:
            return None
        return frames[1].get("User-Id")
    finally:
        router.close()
        dealer.close()
        await zap.stop()
        context.term()


def test_admitted_key_gets_through_tagged_with_its_pool() -> None:
    assert asyncio.run(_round_trip(admitted=True)) == "pool-a"


def test_unknown_key_gets_nothing_through() -> None:
    assert asyncio.run(_round_trip(admitted=False)) is None
