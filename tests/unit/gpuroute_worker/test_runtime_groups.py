"""Item groups on a worker: one JOB carrying several batch items through the real JobRunner
(CPU executor, real HTTP server for the inputs and outputs), answered by one RESULT with one
answer per item, in order; an item fails alone, with its own code."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
from PIL import Image
from prometheus_client import REGISTRY

from gpuroute import protocol
from gpuroute.protocol import ErrorCode, Kind
from tests.unit.gpuroute_worker.runtime_testutil import Sent, Storage, run_jobs, storage


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (6, 9, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _run(header: dict[str, Any], *, repeat: int = 1) -> Sent:
    return run_jobs(*[header] * repeat)


def _group(store: Storage, names: list[str], **extra: Any) -> dict[str, Any]:
    return {"job": "grp/1", "steps": [{"op": "invert"}], "timeoutS": 30.0, "output": {"format": "png"},
            "items": [{"input": f"{store.url}/in/{n}?sig=1", "output": f"{store.url}/out/{n}?sig=2",
                       "headers": {"x-amz-meta-item": n}} for n in names], **extra}


def test_every_item_is_answered_in_order_and_fails_alone() -> None:
    objects = {"/in/a.png": _png(1), "/in/b.png": b"\x89PNG\r\n\x1a\n" + b"junk" * 20, "/in/d.png": _png(4)}
    with storage(objects) as store:
        sent = _run(_group(store, ["a.png", "b.png", "c.png", "d.png"]))
        stored = dict(store.objects)
    assert [kind for kind, _ in sent] == [Kind.ACCEPTED, Kind.RESULT], sent
    result = protocol.decode(protocol.encode(Kind.RESULT, sent[-1][1])).body
    assert isinstance(result, protocol.Result) and result.output is None and len(result.items) == 4
    a, b, c, d = result.items
    assert a.ok and d.ok and (a.input_width, a.input_height) == (9, 6)
    assert b.code is ErrorCode.INVALID_INPUT and "not a readable image" in b.message
    assert c.code is ErrorCode.INVALID_INPUT and "404" in c.message  # a missing object will not appear on a retry
    for name, answer in (("a.png", a), ("d.png", d)):
        written = stored[f"/out/{name}"]
        assert answer.output is not None and hashlib.sha256(written).hexdigest() == answer.output.sha256
        expected = 255 - np.asarray(Image.open(io.BytesIO(objects[f"/in/{name}"])))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(written))), expected)
        assert answer.timing.download_ms > 0 and answer.timing.encode_ms > 0
    assert "/out/b.png" not in stored and "/out/c.png" not in stored


def test_an_item_past_its_own_timeout_fails_alone_and_retryably() -> None:
    objects = {"/in/a.png": _png(1), "/in/slow.png": _png(2)}
    with storage(objects, slow={"/in/slow.png"}, slow_s=2.0) as store:
        sent = _run(_group(store, ["a.png", "slow.png"], itemTimeoutS=0.5))
    result = protocol.decode(protocol.encode(Kind.RESULT, sent[-1][1])).body
    assert result.items[0].ok
    assert result.items[1].code is ErrorCode.TIMEOUT and result.items[1].code.retryable
    assert "itemTimeoutSeconds" in result.items[1].message


def test_a_group_sent_again_is_answered_from_the_cache() -> None:
    with storage({"/in/a.png": _png(1), "/in/b.png": _png(2)}) as store:
        sent = _run(_group(store, ["a.png", "b.png"]), repeat=2)
    kinds = [kind for kind, _ in sent]
    assert kinds == [Kind.ACCEPTED, Kind.RESULT, Kind.RESULT], kinds
    first, again = sent[1][1], sent[2][1]
    assert again.get("cached") is True and again["items"] == first["items"]


def test_a_bad_pipeline_fails_every_item_with_the_same_reason() -> None:
    with storage({"/in/a.png": _png(1)}) as store:
        sent = _run({**_group(store, ["a.png", "a.png"]), "steps": [{"op": "no-such-op"}]})
    result = protocol.decode(protocol.encode(Kind.RESULT, sent[-1][1])).body
    assert [item.code for item in result.items] == [ErrorCode.INVALID_INPUT] * 2


def _steps_run(op: str) -> float:
    """Pipeline steps of `op` the executor has run in this process (its per-op histogram)."""
    value = REGISTRY.get_sample_value("gpuroute_worker_op_seconds_count", {"op": op})
    return value or 0.0


def test_an_item_cut_off_by_its_timeout_stops_computing() -> None:
    # 16 steps on a 2048x2048 image (3x up, then down): seconds of CPU unbounded. Cut off
    # after 0.5 s, the pipeline stops at its next step instead of holding the executor.
    gradient = np.tile(np.arange(2048, dtype=np.uint16)[None, :] // 8, (2048, 1)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([gradient] * 3, axis=2)).save(buffer, "PNG")
    steps = [{"op": "upscale", "scale": 3.0, "method": "lanczos"}, {"op": "resize", "width": 2048, "method": "lanczos"}] * 8
    before = _steps_run("upscale")
    with storage({"/in/big.png": buffer.getvalue()}) as store:
        sent = _run({**_group(store, ["big.png"], itemTimeoutS=0.5), "steps": steps})
    result = protocol.decode(protocol.encode(Kind.RESULT, sent[-1][1])).body
    assert result.items[0].code is ErrorCode.TIMEOUT and "itemTimeoutSeconds (0.5 s)" in result.items[0].message
    # _run closes the executor, which waits for its thread: every step it ran is counted by now.
    assert _steps_run("upscale") - before <= 2, _steps_run("upscale") - before
