"""ZAP decisions, the ZAP socket itself, and the handler in front of a real CURVE ROUTER socket."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from dataclasses import dataclass, field

import pytest
import zmq
import zmq.asyncio
from zmq.utils import z85

from gpuroute import protocol
from gpuroute.curve_keys import KeyPair
from gpuroute_operator.core.identity import Principal
from gpuroute_operator.core.pools import parse_cidrs
from gpuroute_operator.link.zap import ZAP_ENDPOINT, ZAP_VERSION, Admission, ZapHandler

OK = (b"200", b"OK")


def _raw(pair: KeyPair) -> list[bytes]:
    """Credentials as libzmq puts them in a ZAP request: the 32-byte binary public key."""
    return [z85.decode(pair.public)]


def _named(keys: list[bytes]) -> dict[str, bytes]:
    """Keys as a pool Secret names them."""
    return {f"k{index}": key for index, key in enumerate(keys)}


def _decide(zap: ZapHandler, address: str, mechanism: bytes, credentials: list[bytes]) -> tuple[bytes, bytes, str]:
    """zap.decide, with the User-Id cut to its pool (the principal's other parts are tested apart)."""
    code, text, user = zap.decide(address, mechanism, credentials)
    return code, text, user.split("/")[0]


def test_user_id_names_pool_key_and_public_key() -> None:
    pair = KeyPair.generate()
    zap = ZapHandler(zmq.asyncio.Context())
    admitted = zap.set_pool_keys("pool-a", {"gpu-7": pair.public}, ())
    code, _, user = zap.decide("127.0.0.1", b"CURVE", _raw(pair))
    assert code == b"200" and user == f"pool-a/gpu-7/{pair.public.decode()}"
    assert admitted == [Principal("pool-a", "gpu-7", pair.public.decode())]
    assert Principal.from_user_id(user) == admitted[0]
    assert admitted[0].owns(protocol.routing_id_for(pair.public.decode(), "w1"))
    assert not admitted[0].owns(protocol.routing_id_for(KeyPair.generate().public.decode(), "w1"))
    assert not admitted[0].owns(b"pool-b/w1")
    for bad in ("", "pool", "pool/key", "pool/key/short"):
        assert Principal.from_user_id(bad) is None


@pytest.fixture
def zap() -> ZapHandler:
    context = zmq.asyncio.Context()
    try:
        yield ZapHandler(context)
    finally:
        context.term()


def test_unknown_key_refused(zap: ZapHandler) -> None:
    stranger = KeyPair.generate()
    assert _decide(zap, "127.0.0.1", b"CURVE", _raw(stranger)) == (b"400", b"unknown key", "")
    zap.set_pool_keys("pool-a", _named([KeyPair.generate().public]), ())
    assert _decide(zap, "127.0.0.1", b"CURVE", _raw(stranger)) == (b"400", b"unknown key", "")


def test_admitted_key_gets_its_pool_as_user_id(zap: ZapHandler) -> None:
    a1, a2, b = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    zap.set_pool_keys("pool-a", _named([a1.public, a2.public]), ())
    zap.set_pool_keys("pool-b", _named([b.public]), ())
    assert _decide(zap, "127.0.0.1", b"CURVE", _raw(a1)) == (*OK, "pool-a")
    assert _decide(zap, "203.0.113.9", b"CURVE", _raw(a2)) == (*OK, "pool-a")
    assert _decide(zap, "::1", b"CURVE", _raw(b)) == (*OK, "pool-b")
    assert zap.admitted_pools() == {"pool-a": 2, "pool-b": 1}


@pytest.mark.parametrize(("mechanism", "credentials"), [
    (b"PLAIN", [b"user", b"password"]),
    (b"NULL", []),
    (b"GSSAPI", [b"token"]),
    (b"curve", None),          # mechanism names are case-sensitive
    (b"CURVE", []),            # CURVE with no key
    (b"CURVE", None),          # CURVE with two keys
])
def test_non_curve_refused(zap: ZapHandler, mechanism: bytes, credentials: list[bytes] | None) -> None:
    pair = KeyPair.generate()
    zap.set_pool_keys("pool-a", _named([pair.public]), ())
    if credentials is None:
        credentials = _raw(pair) * (2 if mechanism == b"CURVE" else 1)
    assert _decide(zap, "127.0.0.1", mechanism, credentials) == (b"400", b"CURVE required", "")


def test_cidr_allowlist(zap: ZapHandler) -> None:
    pair, v6 = KeyPair.generate(), KeyPair.generate()
    zap.set_pool_keys("pool-a", _named([pair.public]), parse_cidrs(["10.1.0.0/16", "192.168.7.7/32"], "f"))
    zap.set_pool_keys("pool-6", _named([v6.public]), parse_cidrs(["2001:db8:1::/48"], "f"))
    assert _decide(zap, "10.1.2.3", b"CURVE", _raw(pair)) == (*OK, "pool-a")
    assert _decide(zap, "10.1.255.255", b"CURVE", _raw(pair)) == (*OK, "pool-a")
    assert _decide(zap, "192.168.7.7", b"CURVE", _raw(pair)) == (*OK, "pool-a")
    refused = (b"400", b"source address not allowed for pool", "")
    assert _decide(zap, "10.2.0.1", b"CURVE", _raw(pair)) == refused
    assert _decide(zap, "192.168.7.8", b"CURVE", _raw(pair)) == refused
    assert _decide(zap, "127.0.0.1", b"CURVE", _raw(pair)) == refused
    assert _decide(zap, "2001:db8:1:ff::5", b"CURVE", _raw(v6)) == (*OK, "pool-6")
    assert _decide(zap, "2001:db8:2::5", b"CURVE", _raw(v6)) == refused
    assert _decide(zap, "10.1.2.3", b"CURVE", _raw(v6)) == refused
    assert _decide(zap, "not-an-ip", b"CURVE", _raw(pair)) == (b"400", b"unparseable source address", "")


def test_no_cidrs_allows_any_address(zap: ZapHandler) -> None:
    pair = KeyPair.generate()
    zap.set_pool_keys("pool-a", _named([pair.public]), ())
    for address in ("10.0.0.1", "8.8.8.8", "::1", "anything"):
        assert _decide(zap, address, b"CURVE", _raw(pair)) == (*OK, "pool-a")


def test_a_key_claimed_by_two_pools_stays_with_the_first(zap: ZapHandler) -> None:
    shared, own_b = KeyPair.generate(), KeyPair.generate()
    zap.set_pool_keys("pool-a", _named([shared.public]), ())
    zap.set_pool_keys("pool-b", _named([own_b.public, shared.public]), (ipaddress.ip_network("10.0.0.0/8"),))
    assert _decide(zap, "127.0.0.1", b"CURVE", _raw(shared)) == (*OK, "pool-a")
    assert _decide(zap, "10.0.0.1", b"CURVE", _raw(own_b)) == (*OK, "pool-b")
    assert zap.admitted_pools() == {"pool-a": 1, "pool-b": 1}
    # Re-applying pool-b's keys changes nothing for the shared key.
    zap.set_pool_keys("pool-b", _named([shared.public]), ())
    assert _decide(zap, "127.0.0.1", b"CURVE", _raw(shared)) == (*OK, "pool-a")
    assert _decide(zap, "10.0.0.1", b"CURVE", _raw(own_b)) == (b"400", b"unknown key", "")


def test_set_pool_keys_replaces_and_remove_pool_revokes(zap: ZapHandler) -> None:
    old, new, other = KeyPair.generate(), KeyPair.generate(), KeyPair.generate()
    zap.set_pool_keys("pool-a", _named([old.public]), ())
    zap.set_pool_keys("pool-b", _named([other.public]), ())
    zap.set_pool_keys("pool-a", _named([new.public]), ())
    assert _decide(zap, "127.0.0.1", b"CURVE", _raw(old))[:2] == (b"400", b"unknown key")
    assert _decide(zap, "127.0.0.1", b"CURVE", _raw(new)) == (*OK, "pool-a")
    # CIDRs are replaced with the keys.
    zap.set_pool_keys("pool-a", _named([new.public]), parse_cidrs(["10.0.0.0/8"], "f"))
    assert _decide(zap, "127.0.0.1", b"CURVE", _raw(new))[0] == b"400"
    zap.remove_pool("pool-a")
    assert _decide(zap, "10.0.0.1", b"CURVE", _raw(new))[:2] == (b"400", b"unknown key")
    assert _decide(zap, "127.0.0.1", b"CURVE", _raw(other)) == (*OK, "pool-b")
    assert zap.admitted_pools() == {"pool-b": 1}
    zap.remove_pool("never-existed")
    assert zap.admitted_pools() == {"pool-b": 1}


def test_after_removal_another_pool_may_claim_the_key(zap: ZapHandler) -> None:
    shared = KeyPair.generate()
    zap.set_pool_keys("pool-a", _named([shared.public]), ())
    zap.remove_pool("pool-a")
    zap.set_pool_keys("pool-b", _named([shared.public]), ())
    assert _decide(zap, "127.0.0.1", b"CURVE", _raw(shared)) == (*OK, "pool-b")


def test_parse_cidrs() -> None:
    assert parse_cidrs([], "f") == ()
    assert parse_cidrs(["10.0.0.0/8", "10.1.2.3/16", "2001:db8::/32", "192.168.1.1"], "f") == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("2001:db8::/32"), ipaddress.ip_network("192.168.1.1/32"))
    with pytest.raises(ValueError) as caught:
        parse_cidrs(["10.0.0.0/8", "10.0.0.0/33"], "spec.allowedSourceCIDRs")
    assert str(caught.value) == "spec.allowedSourceCIDRs: '10.0.0.0/33' is not a CIDR"
    with pytest.raises(ValueError, match="'eu-west' is not a CIDR"):
        parse_cidrs(["eu-west"], "f")


def test_admission_record() -> None:
    """An admission is a value: every field tells two apart, and none can be changed in place
    (ZAP's table is replaced whole when a pool's keys change, never edited)."""
    net = ipaddress.ip_network("10.0.0.0/8")
    admission = Admission("p", "k", (net,))
    assert admission == Admission("p", "k", (ipaddress.ip_network("10.0.0.0/8"),))
    assert admission != Admission("q", "k", (net,))
    assert admission != Admission("p", "other", (net,))
    assert admission != Admission("p", "k", ())
    with pytest.raises(dataclasses.FrozenInstanceError):
        admission.pool = "q"  # type: ignore[misc]


# --- Real sockets ------------------------------------------------------------------------------

RECEIVE_S = 3.0     # an admitted peer's message normally arrives in milliseconds
SILENCE_S = 0.5     # how long a refused peer is given to get anything through


def _setup_router(context: zmq.asyncio.Context, server: KeyPair) -> tuple[zmq.asyncio.Socket, int]:
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.curve_server = True
    router.curve_secretkey = server.secret
    router.curve_publickey = server.public
    router.setsockopt(zmq.ZAP_DOMAIN, b"gpuroute")
    return router, router.bind_to_random_port("tcp://127.0.0.1")


def _dealer(context: zmq.asyncio.Context, client: KeyPair, server: KeyPair, port: int) -> zmq.asyncio.Socket:
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.curve_secretkey, dealer.curve_publickey, dealer.curve_serverkey = client.secret, client.public, server.public
    dealer.connect(f"tcp://127.0.0.1:{port}")
    return dealer


@dataclass
class Received:
    messages: list[tuple[str, protocol.Message]] = field(default_factory=list)
    """(User-Id, decoded message) for everything the ROUTER got."""


async def _session(pools: dict[str, list[KeyPair]], cidrs: dict[str, tuple[str, ...]],
                   clients: list[tuple[KeyPair, str]], expected: int) -> Received:
    """Start ZAP + ROUTER, let each client send one READY naming `worker`, collect what arrives."""
    context = zmq.asyncio.Context()
    server = KeyPair.generate()
    zap = ZapHandler(context)
    for pool, keys in pools.items():
        zap.set_pool_keys(pool, _named([k.public for k in keys]), parse_cidrs(cidrs.get(pool, ()), "f"))
    sockets: list[zmq.asyncio.Socket] = []
    received = Received()
    try:
        zap.start()  # before the CURVE server binds, or libzmq skips ZAP
        router, port = _setup_router(context, server)
        sockets.append(router)
        for client, worker in clients:
            dealer = _dealer(context, client, server, port)
            sockets.append(dealer)
            header = {"version": protocol.PROTOCOL_VERSION, "pool": "claimed-by-worker", "worker": worker,
                      "capacity": 1}
            await dealer.send_multipart(protocol.encode(protocol.Kind.READY, header))
        while True:
            timeout = RECEIVE_S if len(received.messages) < expected else SILENCE_S
            try:
                frames = await asyncio.wait_for(router.recv_multipart(copy=False), timeout=timeout)
            except TimeoutError:
                break
            message = protocol.decode([f.bytes for f in frames[1:]])
            received.messages.append((frames[1].get("User-Id").split("/")[0], message))
        return received
    finally:
        for sock in sockets:
            sock.close()
        await zap.stop()
        context.term()


def test_admitted_key_gets_through_tagged_with_its_pool_and_unknown_key_does_not() -> None:
    admitted, stranger = KeyPair.generate(), KeyPair.generate()
    got = asyncio.run(_session({"pool-a": [admitted]}, {}, [(stranger, "intruder"), (admitted, "w1")], expected=1))
    assert [(user, m.header["worker"]) for user, m in got.messages] == [("pool-a", "w1")]
    user, message = got.messages[0]
    assert message.kind is protocol.Kind.READY
    # The pool a worker claims in its header is not what identifies it: the ZAP User-Id is.
    assert message.header["pool"] == "claimed-by-worker" and user == "pool-a"


def test_unknown_key_alone_gets_nothing_through() -> None:
    got = asyncio.run(_session({"pool-a": [KeyPair.generate()]}, {}, [(KeyPair.generate(), "intruder")], expected=0))
    assert got.messages == []


def test_each_key_is_tagged_with_its_own_pool() -> None:
    a, b = KeyPair.generate(), KeyPair.generate()
    got = asyncio.run(_session({"pool-a": [a], "pool-b": [b]}, {}, [(a, "wa"), (b, "wb")], expected=2))
    assert sorted((user, m.header["worker"]) for user, m in got.messages) == [("pool-a", "wa"), ("pool-b", "wb")]


def test_cidr_allowlist_enforced_on_real_connections() -> None:
    inside, outside = KeyPair.generate(), KeyPair.generate()
    got = asyncio.run(_session({"local": [inside], "remote-only": [outside]},
                               {"local": ("127.0.0.0/8",), "remote-only": ("10.0.0.0/8",)},
                               [(outside, "w-out"), (inside, "w-in")], expected=1))
    assert [(user, m.header["worker"]) for user, m in got.messages] == [("local", "w-in")]


async def _ask_zap(requests: list[list[bytes]]) -> list[list[bytes] | None]:
    """Send raw ZAP requests to the handler's inproc socket, one REQ socket each."""
    context = zmq.asyncio.Context()
    zap = ZapHandler(context)
    known = KeyPair.generate()
    zap.set_pool_keys("pool-a", _named([known.public]), ())
    replies: list[list[bytes] | None] = []
    try:
        zap.start()
        for request in requests:
            req = context.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req.connect(ZAP_ENDPOINT)
            try:
                await req.send_multipart([part if part != b"<known>" else z85.decode(known.public)
                                          for part in request])
                reply = await asyncio.wait_for(req.recv_multipart(), timeout=SILENCE_S * 2)
                replies.append([*reply[:4], reply[4].split(b"/")[0], *reply[5:]])
            except TimeoutError:
                replies.append(None)
            finally:
                req.close()
        return replies
    finally:
        await zap.stop()
        context.term()


def _zap_request(request_id: bytes, mechanism: bytes, *credentials: bytes, address: bytes = b"127.0.0.1") -> list[bytes]:
    return [ZAP_VERSION, request_id, b"gpuroute", address, b"", mechanism, *credentials]


def test_zap_socket_answers_requests() -> None:
    replies = asyncio.run(_ask_zap([
        _zap_request(b"1", b"CURVE", b"<known>"),
        _zap_request(b"2", b"CURVE", z85.decode(KeyPair.generate().public)),
        _zap_request(b"3", b"NULL"),
        [ZAP_VERSION, b"4", b"too short"],
    ]))
    assert replies == [
        [ZAP_VERSION, b"1", b"200", b"OK", b"pool-a", b""],
        [ZAP_VERSION, b"2", b"400", b"unknown key", b"", b""],
        [ZAP_VERSION, b"3", b"400", b"CURVE required", b"", b""],
        [ZAP_VERSION, b"", b"500", b"malformed", b"", b""],
    ]


def test_a_failing_decision_refuses_one_peer_and_keeps_serving() -> None:
    # A CURVE credential that is not a 32-byte key makes the decision raise; the handler
    # must answer 500 for that peer and go on authenticating the next one.
    replies = asyncio.run(_ask_zap([
        _zap_request(b"1", b"CURVE", b"12345"),
        _zap_request(b"2", b"CURVE", b"<known>"),
    ]))
    assert replies == [
        [ZAP_VERSION, b"1", b"500", b"internal error", b"", b""],
        [ZAP_VERSION, b"2", b"200", b"OK", b"pool-a", b""],
    ]
