"""Who a worker connection is, attacked from outside: a key of pool A trying to act for
pool B, forged results, a revoked key, and one key opening several connections.

The attacker here is a raw CURVE DEALER socket holding a real, admitted worker key: it
speaks the protocol by hand, as a compromised worker pod would.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
import zmq.utils.monitor

from gpuroute import protocol
from gpuroute.curve_keys import KeyPair
from gpuroute.protocol import AttemptId, Heartbeat, Kind, OutputInfo, Ready, Result, StageTiming
from gpuroute_dev.localenv.stack import LocalStack, PoolConfig
from tests.images import noise_png

BUCKET = "gpuroute-identity"
NS = "team-id"
POOL_A, POOL_B = "pool-a", "pool-b"
RECEIVE_S = 2.0


@pytest.fixture(scope="module")
def stack(control_plane: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s3_server.create_bucket(BUCKET)
    s3_server.client().put_object(Bucket=BUCKET, Key="in/a.png", Body=noise_png(64, 48, seed=1))
    stack = LocalStack(tmp_path_factory.mktemp("identity"), control_plane, s3_server)
    stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/"])
    stack.add_pool(PoolConfig(POOL_A, workers=("a1", "a2")))
    stack.add_pool(PoolConfig(POOL_B, workers=("b1",)))
    stack.start_operator()
    stack.start_worker(POOL_B, "b1")
    stack.wait_for_pool(POOL_B, workers=1)
    yield stack
    stack.stop()


class RogueWorker:
    """A DEALER with a real worker key, under the attacker's control."""

    def __init__(self, stack: LocalStack, key: KeyPair, routing_id: bytes) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, int(RECEIVE_S * 1000))
        self.socket.setsockopt(zmq.ROUTING_ID, routing_id)
        self.socket.curve_secretkey = key.secret
        self.socket.curve_publickey = key.public
        self.socket.curve_serverkey = stack.operator_key.public
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.socket.connect(stack.operator_endpoint)

    def send(self, body: Any) -> None:
        self.socket.send_multipart(protocol.encode(body))

    def received(self, seconds: float = RECEIVE_S) -> list[protocol.Message]:
        """Everything the operator sent within `seconds`."""
        out: list[protocol.Message] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.socket.poll(50):
                out.append(protocol.decode(self.socket.recv_multipart()))
        return out

    def first_reply(self, body: Any, seconds: float = 15.0,
                    keep_alive: RogueWorker | None = None) -> protocol.Message | None:
        """Send `body` until the operator answers (a busy machine may take a while); its first message.
        `keep_alive`, another registered connection, heartbeats meanwhile so that the operator
        does not drop it as silent while this one waits."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if keep_alive is not None:
                keep_alive.send(Heartbeat(pong=time.monotonic()))
            self.send(body)
            got = self.received(0.5)
            if got:
                return got[0]
        return None

    def live_until_disconnected(self, seconds: float) -> bool:
        """Behave as a live worker (answer every heartbeat) until the operator cuts the
        connection; True if it did within `seconds`. Silence alone can then not be the cause."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            while self.socket.poll(0):
                message = protocol.decode(self.socket.recv_multipart())
                if isinstance(message.body, Heartbeat) and message.body.ping is not None:
                    self.send(Heartbeat(pong=message.body.ping))
            if self.monitor.poll(50):
                event = zmq.utils.monitor.recv_monitor_message(self.monitor)
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    return True
        return False

    def was_disconnected(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.monitor.poll(50):
                event = zmq.utils.monitor.recv_monitor_message(self.monitor)
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    return True
        return False

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close()
        self.socket.close()
        self.context.term()


def _routing_id(stack: LocalStack, pool: str, worker: str) -> bytes:
    return protocol.routing_id_for(stack.worker_keys[(pool, worker)].public.decode(), worker)


def _rejected(stack: LocalStack, reason: str) -> float:
    return stack.operator_metric("gpuroute_socket_rejected_messages_total", {"reason": reason})


def _spec(name: str, pool: str) -> dict[str, Any]:
    return {"input": {"uri": f"s3://{BUCKET}/in/a.png"}, "output": {"uri": f"s3://{BUCKET}/out/{name}.png"},
            "steps": [{"op": "invert"}], "placement": {"pools": [pool]}}


def test_a_key_of_pool_a_cannot_take_over_or_squat_a_pool_b_worker(stack: LocalStack, s3_server: Any) -> None:
    key_a = stack.worker_keys[(POOL_A, "a1")]
    victim_id = _routing_id(stack, POOL_B, "b1")
    bad_ready = _rejected(stack, "bad_ready")
    # 1. Take over the live routing id of b1, claiming pool B.
    rogue = RogueWorker(stack, key_a, victim_id)
    try:
        rogue.send(Ready(pool=POOL_B, worker="b1", capacity=8, device="cuda:0"))
        stack.create_job(NS, "pinned-b", _spec("pinned-b", POOL_B))
        got = rogue.received(3.0)
        assert not [m for m in got if m.kind is Kind.JOB], "the rogue received pool B's job"
        status = stack.wait_for_jobs(NS, ["pinned-b"])["pinned-b"]["status"]
        stored = s3_server.client().get_object(Bucket=BUCKET, Key="out/pinned-b.png")["Body"].read()
        assert (status["phase"], status["pool"], status["worker"]) == ("Completed", POOL_B, "b1")
        assert status["output"]["sha256"] == hashlib.sha256(stored).hexdigest()
    finally:
        rogue.close()
    # 2. The same id while b1 is away: accepted by the socket, refused by the operator.
    stack.workers["b1"].kill()
    deadline = time.monotonic() + 15
    while stack.worker_pool(POOL_B).get("status", {}).get("connectedWorkers"):
        assert time.monotonic() < deadline, "b1 was never noticed gone"
        time.sleep(0.2)
    rogue = RogueWorker(stack, key_a, victim_id)
    try:
        # Until libzmq has let go of b1's dead connection the id is refused outright; retry as an attacker would.
        reply = rogue.first_reply(Ready(pool=POOL_B, worker="b1", capacity=8))
        assert reply is not None and reply.kind is Kind.DISCONNECT, reply
        assert rogue.was_disconnected(5.0), "the operator did not close the squatter's connection"
        assert _rejected(stack, "bad_ready") > bad_ready
        assert not stack.worker_pool(POOL_B).get("status", {}).get("connectedWorkers")
    finally:
        rogue.close()
        stack.start_worker(POOL_B, "b1")
        stack.wait_for_pool(POOL_B, workers=1)


def test_forged_and_foreign_results_are_dropped_and_counted(stack: LocalStack, s3_server: Any) -> None:
    key_a = stack.worker_keys[(POOL_A, "a1")]
    rogue = RogueWorker(stack, key_a, _routing_id(stack, POOL_A, "a1"))
    try:
        foreign = _rejected(stack, "foreign_attempt")
        job = stack.create_job(NS, "real-b", _spec("real-b", POOL_B))
        uid = job["metadata"]["uid"]
        forged = Result(AttemptId(uid, 1), StageTiming(gpu_ms=1.0), OutputInfo(10, 64, 48, "f" * 64, "png"))
        # Registered only now, and forging at once: its session is live (not yet silent for
        # a heartbeat liveness), so the forgeries are judged as a registered worker's.
        reply = rogue.first_reply(Ready(pool=POOL_A, worker="a1", capacity=1))
        assert reply is not None and reply.kind is Kind.HEARTBEAT, "the rogue a1 was not registered"
        for _ in range(3):
            rogue.send(forged)
        status = stack.wait_for_jobs(NS, ["real-b"])["real-b"]["status"]
        stored = s3_server.client().get_object(Bucket=BUCKET, Key="out/real-b.png")["Body"].read()
        assert status["output"]["sha256"] == hashlib.sha256(stored).hexdigest() != "f" * 64
        assert status["worker"] == "b1"
        assert _rejected(stack, "foreign_attempt") >= foreign + 3
        assert "that attempt was not sent on this connection" in stack.operator.log_tail(400)
        # A RESULT with NaN timings never parses: dropped as malformed, nothing wedged.
        malformed = stack.operator_metric("gpuroute_socket_rejected_messages_total", {"reason": "malformed"})
        header = {**forged.to_header(), "timing": {"gpuMs": float("nan")}}
        rogue.socket.send_multipart(protocol.encode(Kind.RESULT, header))
        deadline = time.monotonic() + 5
        while stack.operator_metric("gpuroute_socket_rejected_messages_total", {"reason": "malformed"}) <= malformed:
            assert time.monotonic() < deadline, "a NaN timing was not refused"
            time.sleep(0.1)
    finally:
        rogue.close()


def test_one_key_one_connection(stack: LocalStack) -> None:
    key = stack.worker_keys[(POOL_A, "a2")]
    first = RogueWorker(stack, key, _routing_id(stack, POOL_A, "a2"))
    second: RogueWorker | None = None
    try:
        reply = first.first_reply(Ready(pool=POOL_A, worker="a2", capacity=1))
        assert reply is not None and reply.kind is Kind.HEARTBEAT
        # Connected only now: a connection that sends no READY for a while is cut, and the
        # first one keeps heartbeating so that it is live when the twin asks.
        second = RogueWorker(stack, key, _routing_id(stack, POOL_A, "a2") + b"-twin")
        reply = second.first_reply(Ready(pool=POOL_A, worker="a2-twin", capacity=1), keep_alive=first)
        assert reply is not None and reply.kind is Kind.DISCONNECT, reply
        assert second.was_disconnected(5.0)
        ids = [w["id"] for w in stack.worker_pool(POOL_A)["status"].get("workers", [])]
        assert "a2-twin" not in ids
        # A copied key is alerted: a Warning Event on the WorkerPool names the key and the limit.
        deadline = time.monotonic() + 10
        while True:
            events = [e for e in stack.core.list_namespaced_event("default").items
                      if e.reason == "KeyConflict" and e.involved_object.name == POOL_A]
            if events:
                break
            assert time.monotonic() < deadline, "no KeyConflict Event for the copied key"
            time.sleep(0.2)
        assert events[0].type == "Warning" and "maxConnectionsPerKey=1" in events[0].message
    finally:
        first.close()
        if second is not None:
            second.close()


def test_a_revoked_key_is_disconnected_within_seconds(stack: LocalStack) -> None:
    key = stack.worker_keys[(POOL_A, "a1")]
    rogue = RogueWorker(stack, key, _routing_id(stack, POOL_A, "a1"))
    secret_name = f"gpuroute-pool-{POOL_A}-keys"
    try:
        revoked_before = stack.operator_metric("gpuroute_worker_disconnects_total", {"pool": POOL_A, "reason": "key"})
        reply = rogue.first_reply(Ready(pool=POOL_A, worker="a1", capacity=1))
        assert reply is not None and reply.kind is Kind.HEARTBEAT
        secret = stack.core.read_namespaced_secret(secret_name, stack.namespace)
        secret.data = {k: v for k, v in secret.data.items() if k != "a1.key"}
        stack.core.replace_namespaced_secret(secret_name, stack.namespace, secret)
        revoked_at = time.monotonic()
        # It answers every heartbeat meanwhile: only the revocation can end its session.
        assert rogue.live_until_disconnected(10.0), "the revoked key kept its connection"
        took = time.monotonic() - revoked_at
        assert stack.operator_metric("gpuroute_worker_disconnects_total",
                                     {"pool": POOL_A, "reason": "key"}) == revoked_before + 1
        deadline = time.monotonic() + 5
        while "a1" in [w["id"] for w in stack.worker_pool(POOL_A)["status"].get("workers", [])]:
            assert time.monotonic() < deadline, "the pool status still lists the revoked worker"
            time.sleep(0.2)
        print(f"\nrevoked key disconnected {took:.1f} s after the Secret changed")
    finally:
        rogue.close()
        secret = stack.core.read_namespaced_secret(secret_name, stack.namespace)
        secret.data = {**(secret.data or {}), "a1.key": base64.b64encode(key.public).decode()}
        stack.core.replace_namespaced_secret(secret_name, stack.namespace, secret)


def test_a_silent_connection_cannot_hold_a_routing_id(stack: LocalStack) -> None:
    """A key of pool A squats b1's id while b1 is away and says nothing: it is cut, and b1 gets back in."""
    stack.workers["b1"].kill()
    deadline = time.monotonic() + 15
    while stack.worker_pool(POOL_B).get("status", {}).get("connectedWorkers"):
        assert time.monotonic() < deadline, "b1 was never noticed gone"
        time.sleep(0.2)
    squatter = RogueWorker(stack, stack.worker_keys[(POOL_A, "a1")], _routing_id(stack, POOL_B, "b1"))
    try:
        assert squatter.was_disconnected(15.0), "a connection that never sent READY kept its routing id"
        stack.start_worker(POOL_B, "b1")
        stack.wait_for_pool(POOL_B, workers=1, timeout=30)
    finally:
        squatter.close()


def _admitted_rogue(stack: LocalStack, pool: str, worker: str, seconds: float = 15.0) -> RogueWorker:
    """A RogueWorker whose CURVE handshake went through. A key restored by an earlier test is
    admitted only at the operator's next keys refresh, and a connection ZAP refused meanwhile
    stays refused (its sends would block): connect again until one is admitted."""
    deadline = time.monotonic() + seconds
    while True:
        rogue = RogueWorker(stack, stack.worker_keys[(pool, worker)], _routing_id(stack, pool, worker))
        if rogue.monitor.poll(1000):
            event = zmq.utils.monitor.recv_monitor_message(rogue.monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return rogue
        rogue.close()
        assert time.monotonic() < deadline, f"the key of {pool}/{worker} was never admitted"


def test_deleting_the_keys_secret_disconnects_the_pools_workers(stack: LocalStack) -> None:
    """The Secret gone revokes every key it listed: a real worker and a live rogue of pool A
    are both cut, and neither gets back in until the Secret is back."""
    secret_name = f"gpuroute-pool-{POOL_A}-keys"
    worker = stack.start_worker(POOL_A, "a2")
    rogue = _admitted_rogue(stack, POOL_A, "a1")
    try:
        stack.wait_for_pool(POOL_A, workers=1)
        reply = rogue.first_reply(Ready(pool=POOL_A, worker="a1", capacity=1))
        assert reply is not None and reply.kind is Kind.HEARTBEAT, "the rogue a1 was not registered"
        revoked_before = stack.operator_metric("gpuroute_worker_disconnects_total", {"pool": POOL_A, "reason": "key"})
        stack.core.delete_namespaced_secret(secret_name, stack.namespace)
        # It answers every heartbeat meanwhile: only the revocation can end its session.
        assert rogue.live_until_disconnected(15.0), "a key of the deleted Secret kept its connection"
        deadline = time.monotonic() + 15
        while stack.worker_pool(POOL_A).get("status", {}).get("connectedWorkers"):
            assert time.monotonic() < deadline, "the real worker of pool A stayed connected without its Secret"
            time.sleep(0.2)
        assert stack.operator_metric("gpuroute_worker_disconnects_total",
                                     {"pool": POOL_A, "reason": "key"}) == revoked_before + 2
    finally:
        rogue.close()
        worker.stop()
        stack.add_pool(PoolConfig(POOL_A, workers=("a1", "a2")))


def test_a_dropped_connection_leaves_no_session_to_squat(stack: LocalStack, s3_server: Any) -> None:
    """The review's live squat: a worker's TCP connection ends without DISCONNECT (crash, OOM kill,
    network cut); another admitted key connects at once under the same routing id and listens. Its
    session must end with its connection, so the jobs meant for it never reach the squatter."""
    stack.workers["b1"].kill()
    deadline = time.monotonic() + 15
    while stack.worker_pool(POOL_B).get("status", {}).get("connectedWorkers"):
        assert time.monotonic() < deadline, "b1 was never noticed gone"
        time.sleep(0.2)
    victim_id = _routing_id(stack, POOL_B, "b1")
    victim = RogueWorker(stack, stack.worker_keys[(POOL_B, "b1")], victim_id)
    squatter: RogueWorker | None = None
    try:
        reply = victim.first_reply(Ready(pool=POOL_B, worker="b1", capacity=4))
        assert reply is not None and reply.kind is Kind.HEARTBEAT, "the victim was not registered"
        disconnects = stack.operator_metric("gpuroute_worker_disconnects_total", {"pool": POOL_B, "reason": "disconnected"})
        victim.close()  # no DISCONNECT: the TCP connection just ends
        squatter = RogueWorker(stack, stack.worker_keys[(POOL_A, "a1")], victim_id)
        # The operator ends the session because its connection closed (not after missed heartbeats).
        deadline = time.monotonic() + 10
        while stack.operator_metric("gpuroute_worker_disconnects_total",
                                    {"pool": POOL_B, "reason": "disconnected"}) <= disconnects:
            assert time.monotonic() < deadline, "the session outlived its connection"
            time.sleep(0.05)
        stack.create_job(NS, "squat-b", _spec("squat-b", POOL_B))
        got = squatter.received(3.0)
        assert not [m for m in got if m.kind is Kind.JOB], "the squatter received the victim's job"
    finally:
        if squatter is not None:
            squatter.close()
        stack.start_worker(POOL_B, "b1")
        stack.wait_for_pool(POOL_B, workers=1, timeout=30)
    status = stack.wait_for_jobs(NS, ["squat-b"])["squat-b"]["status"]
    assert (status["phase"], status["worker"]) == ("Completed", "b1")


def test_narrowing_allowed_source_cidrs_cuts_a_live_session(stack: LocalStack) -> None:
    """The address checked is the one the socket saw (127.0.0.1 here): once the pool's
    allowedSourceCIDRs exclude it, the live session ends although it answers every heartbeat,
    and a new READY from it is refused."""
    rogue = _admitted_rogue(stack, POOL_A, "a1")
    try:
        reply = rogue.first_reply(Ready(pool=POOL_A, worker="a1", capacity=1))
        assert reply is not None and reply.kind is Kind.HEARTBEAT
        stack.custom.patch_cluster_custom_object("gpuroute.io", "v1alpha1", "workerpools", POOL_A,
                                                 {"spec": {"allowedSourceCIDRs": ["10.0.0.0/8"]}})
        assert rogue.live_until_disconnected(15.0), "the session outlived the narrowed CIDRs"
    finally:
        rogue.close()
        stack.custom.patch_cluster_custom_object("gpuroute.io", "v1alpha1", "workerpools", POOL_A,
                                                 {"spec": {"allowedSourceCIDRs": None}})
