"""A WorkerPool that lists `endpoints`: the operator dials its workers.

Real processes end to end: the kube-apiserver, the operator, workers started with
`--listen`, moto S3. The transport flips (worker binds, operator connects) while CURVE
roles, ZAP admission and the protocol stay as in the default topology.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gpuroute.curve_keys import KeyPair
from gpuroute_dev.localenv.stack import LocalStack, PoolConfig, free_port

BUCKET = "gpuroute-dialed"
NS = "team-dialed"
POOL = "gpu-behind-allowlist"
SLOW_STEPS = [{"op": "upscale", "width": 3072, "method": "lanczos"}, {"op": "sharpen", "radius": 3}]


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _spec(name: str, *, steps: list[dict[str, Any]] | None = None, src: str = "in/small.png") -> dict[str, Any]:
    return {"input": {"uri": f"s3://{BUCKET}/{src}"}, "output": {"uri": f"s3://{BUCKET}/out/{name}.png"},
            "steps": steps or [{"op": "grayscale"}], "placement": {"pools": [POOL]}}


def _wait(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Dialed:
    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.addresses = {"d1": f"tcp://127.0.0.1:{free_port()}", "d2": f"tcp://127.0.0.1:{free_port()}"}

    def set_endpoints(self, *workers: str) -> None:
        self.stack.add_pool(PoolConfig(POOL, cloud="azure", region="westeurope", workers=("d1", "d2"),
                                       extra_spec={"endpoints": [self.addresses[w] for w in workers]}))

    def start(self, worker: str) -> None:
        self.stack.start_worker(POOL, worker, listen=self.addresses[worker])


@pytest.fixture(scope="module")
def dialed(control_plane: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dialed]:
    s3_server.create_bucket(BUCKET)
    s3_server.client().put_object(Bucket=BUCKET, Key="in/small.png", Body=_png(80, 60))
    s3_server.client().put_object(Bucket=BUCKET, Key="in/large.png", Body=_png(768, 512))
    stack = LocalStack(tmp_path_factory.mktemp("dialed"), control_plane, s3_server)
    stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/"])
    state = Dialed(stack)
    state.set_endpoints("d1", "d2")
    stack.start_operator()
    yield state
    stack.stop()


def test_status_says_which_endpoints_are_dialed_before_any_worker_answers(dialed: Dialed) -> None:
    def waiting() -> bool:
        conditions = (dialed.stack.worker_pool(POOL).get("status") or {}).get("conditions") or [{}]
        return "dialing" in conditions[0].get("message", "")

    _wait(waiting, "the pool status to name the dialed endpoints")
    message = dialed.stack.worker_pool(POOL)["status"]["conditions"][0]["message"]
    assert dialed.addresses["d1"] in message and dialed.addresses["d2"] in message


def test_operator_dials_listening_workers_and_jobs_complete(dialed: Dialed) -> None:
    stack = dialed.stack
    dialed.start("d1")
    dialed.start("d2")
    status = stack.wait_for_pool(POOL, workers=2)
    assert {w["id"] for w in status["workers"]} == {"d1", "d2"}
    names = [f"dialed-{i}" for i in range(4)]
    for name in names:
        stack.create_job(NS, name, _spec(name))
    for name, body in stack.wait_for_jobs(NS, names).items():
        result = body["status"]
        assert result["phase"] == "Completed", (name, result)
        assert result["pool"] == POOL and result["worker"] in ("d1", "d2")
        assert result["timing"]["totalMs"] > 0 and result["output"]["sha256"]


def test_a_worker_killed_mid_job_is_replaced_and_redialed(dialed: Dialed) -> None:
    stack = dialed.stack
    stack.wait_for_pool(POOL, workers=2)
    stack.create_job(NS, "dialed-slow", _spec("dialed-slow", steps=SLOW_STEPS, src="in/large.png"))
    _wait(lambda: (stack.get_job(NS, "dialed-slow").get("status") or {}).get("phase") in ("Dispatched", "Processing"),
          "the slow job to be dispatched")
    victim = stack.get_job(NS, "dialed-slow")["status"]["worker"]
    stack.workers[victim].kill()
    result = stack.wait_for_jobs(NS, ["dialed-slow"], timeout=180)["dialed-slow"]["status"]
    assert result["phase"] == "Completed", result
    assert result["attempts"] >= 2 and result["worker"] != victim
    # Restarted on the same address, the worker is dialed again without any action.
    dialed.start(victim)
    stack.wait_for_pool(POOL, workers=2)


def test_a_restarted_operator_dials_the_workers_again(dialed: Dialed) -> None:
    stack = dialed.stack
    stack.wait_for_pool(POOL, workers=2)
    assert stack.operator is not None
    stack.operator.kill()
    stack.start_operator()
    stack.wait_for_pool(POOL, workers=2, timeout=60)
    stack.create_job(NS, "after-restart", _spec("after-restart"))
    assert stack.wait_for_jobs(NS, ["after-restart"])["after-restart"]["status"]["phase"] == "Completed"


def test_an_unlisted_key_at_a_dialed_endpoint_is_refused(dialed: Dialed) -> None:
    """Dialing out does not mean trusting: ZAP still checks the worker's key."""
    stack = dialed.stack
    stack.worker_keys[(POOL, "impostor")] = KeyPair.generate()
    impostor = f"tcp://127.0.0.1:{free_port()}"
    stack.start_worker(POOL, "impostor", listen=impostor)
    dialed.addresses["impostor"] = impostor
    refused_before = stack.operator_metric("gpuroute_socket_rejected_connections_total", {"reason": "unknown key"})
    dialed.set_endpoints("d1", "d2", "impostor")  # the Secret still lists only d1 and d2
    _wait(lambda: stack.operator_metric("gpuroute_socket_rejected_connections_total",
                                        {"reason": "unknown key"}) > refused_before, "ZAP to refuse the impostor")
    status = stack.worker_pool(POOL)["status"]
    assert {w["id"] for w in status["workers"]} == {"d1", "d2"}
    stack.workers.pop("impostor").stop()


def test_removing_an_endpoint_drops_that_worker(dialed: Dialed) -> None:
    stack = dialed.stack
    dialed.set_endpoints("d1")
    status = stack.wait_for_pool(POOL, workers=1, timeout=30)
    assert [w["id"] for w in status["workers"]] == ["d1"]
    stack.create_job(NS, "one-endpoint", _spec("one-endpoint"))
    result = stack.wait_for_jobs(NS, ["one-endpoint"])["one-endpoint"]["status"]
    assert (result["phase"], result["worker"]) == ("Completed", "d1")
