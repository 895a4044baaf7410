"""The worker's result cache answers a JOB only when both its attempt id and what it asks
(steps, input, output, items) match: a re-send of the same attempt (fresh signatures, less
time left) is answered from memory, a different request under the same id never is."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from gpuroute.protocol import ErrorCode, Kind, Message
from gpuroute_worker.request_digest import request_digest
from gpuroute_worker.runtime import JobRunner
from tests.unit.gpuroute_worker.runtime_testutil import run_jobs, storage, wire, with_runner

JOB = "0b5a6d0e-1c1f-4c4e-9d0a-3f1f2a6b7c8d/1"


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (6, 9, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _job(url: str, *, out: str = "o.png", steps: list[dict[str, Any]] | None = None, sig: str = "1",
         timeout_s: float = 30.0) -> dict[str, Any]:
    return {"job": JOB, "steps": steps or [{"op": "invert"}], "timeoutS": timeout_s,
            "input": {"url": f"{url}/in/a.png?sig={sig}"},
            "output": {"url": f"{url}/out/{out}?sig={sig}", "format": "png"}}


def _kinds(sent: list[tuple[Kind, Any]]) -> list[Kind]:
    return [kind for kind, _ in sent]


def test_the_same_attempt_signed_again_is_answered_from_the_cache() -> None:
    # After an operator restart the attempt comes back with fresh signatures and less time.
    with storage({"/in/a.png": _png(1)}) as store:
        sent = run_jobs(_job(store.url), _job(store.url, sig="2", timeout_s=12.5))
        puts = list(store.puts)
    assert _kinds(sent) == [Kind.ACCEPTED, Kind.RESULT, Kind.RESULT], sent
    assert sent[2][1].get("cached") is True and sent[2][1]["output"] == sent[1][1]["output"]
    assert puts == ["/out/o.png"]


def test_same_id_with_another_output_is_computed_and_written() -> None:
    with storage({"/in/a.png": _png(1)}) as store:
        sent = run_jobs(_job(store.url), _job(store.url, out="elsewhere.png"))
        puts = list(store.puts)
    assert _kinds(sent) == [Kind.ACCEPTED, Kind.RESULT, Kind.ACCEPTED, Kind.RESULT], sent
    assert "cached" not in sent[3][1]
    assert puts == ["/out/o.png", "/out/elsewhere.png"]


def test_same_id_with_other_steps_is_computed() -> None:
    with storage({"/in/a.png": _png(1)}) as store:
        sent = run_jobs(_job(store.url), _job(store.url, steps=[{"op": "flip"}]))
        written = store.objects["/out/o.png"]
    assert _kinds(sent) == [Kind.ACCEPTED, Kind.RESULT, Kind.ACCEPTED, Kind.RESULT], sent
    expected = np.asarray(Image.open(io.BytesIO(_png(1))))[:, ::-1]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(written))), expected)


def test_same_id_with_other_items_is_computed() -> None:
    def group(url: str, names: list[str]) -> dict[str, Any]:
        return {"job": JOB, "steps": [{"op": "invert"}], "timeoutS": 30.0, "output": {"format": "png"},
                "items": [{"input": f"{url}/in/{n}?s=1", "output": f"{url}/out/{n}?s=1"} for n in names]}

    with storage({"/in/a.png": _png(1), "/in/b.png": _png(2)}) as store:
        sent = run_jobs(group(store.url, ["a.png"]), group(store.url, ["a.png", "b.png"]))
        puts = list(store.puts)
    assert _kinds(sent) == [Kind.ACCEPTED, Kind.RESULT, Kind.ACCEPTED, Kind.RESULT], sent
    assert len(sent[3][1]["items"]) == 2 and sorted(puts) == ["/out/a.png", "/out/a.png", "/out/b.png"]


def test_same_id_with_another_inline_payload_is_computed() -> None:
    with storage({}) as store:
        header = {"job": JOB, "steps": [{"op": "invert"}], "timeoutS": 30.0, "input": {"inline": True},
                  "output": {"url": f"{store.url}/out/o.png?sig=1", "format": "png"}}

        async def script(runner: JobRunner) -> None:
            for payload in (_png(1), _png(1), _png(2)):
                runner.handle_job(Message(Kind.JOB, wire(header).header, payload=payload))
                await runner.drain(60.0)
            assert runner.cached_jobs() == [JOB]

        sent = with_runner(script)
    assert _kinds(sent) == [Kind.ACCEPTED, Kind.RESULT, Kind.RESULT, Kind.ACCEPTED, Kind.RESULT], sent
    assert sent[2][1].get("cached") is True and "cached" not in sent[4][1]


def test_another_request_under_a_running_id_is_refused_not_joined() -> None:
    with storage({"/in/a.png": _png(1)}, slow={"/in/a.png"}, slow_s=0.5) as store:

        async def script(runner: JobRunner) -> None:
            runner.handle_job(wire(_job(store.url)))
            runner.handle_job(wire(_job(store.url, sig="2")))              # the same attempt: joined
            runner.handle_job(wire(_job(store.url, out="elsewhere.png")))  # another request: refused
            await runner.drain(60.0)

        sent = with_runner(script)
        puts = list(store.puts)
    assert _kinds(sent) == [Kind.ACCEPTED, Kind.ACCEPTED, Kind.ERROR, Kind.RESULT], sent
    refusal = sent[2][1]
    assert refusal["code"] == ErrorCode.UNAVAILABLE.value and refusal["rejected"] is True
    assert "different request" in refusal["message"]
    assert puts == ["/out/o.png"]


def test_digest_ignores_signatures_and_time_but_not_what_is_asked() -> None:
    base = _job("https://s3.example")
    same = request_digest(base, None)
    assert request_digest({**_job("https://s3.example", sig="9"), "timeoutS": 3.0}, None) == same
    assert request_digest(_job("https://s3.example", out="x.png"), None) != same
    assert request_digest({**base, "output": {**base["output"], "format": "jpeg"}}, None) != same
    assert request_digest({**base, "output": {**base["output"], "keepMetadata": True}}, None) != same
    assert request_digest(base, b"inline") != same
    # A user's own URL is not signed by the operator: its query may name another image.
    user = {**base, "input": {"url": "https://photos.example/get?id=1", "untrusted": True}}
    other = {**base, "input": {"url": "https://photos.example/get?id=2", "untrusted": True}}
    assert request_digest(user, None) != request_digest(other, None)
    assert request_digest({"job": JOB, "steps": "junk", "input": 5}, None)  # malformed: a digest all the same
