"""The pure parts of the ImageJob watch: which events reach the engine, line splitting,
event decoding and resourceVersion bookkeeping (the stream itself: tests/integration)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest

from gpuroute_operator.kube.api import AsyncKube, KubeAPIError
from gpuroute_operator.kube.job_watch import (
    EventFilter,
    Gone,
    ImageJobWatch,
    JobKey,
    LineSplitter,
    decode_event,
    job_key,
)


def _job(uid: str, *, generation: int = 1, cancel: str | None = None, message: str = "",
         rv: str = "1") -> dict[str, Any]:
    annotations = {"gpuroute.io/cancel": cancel} if cancel is not None else {}
    return {"metadata": {"uid": uid, "name": f"n-{uid}", "namespace": "ns", "generation": generation,
                         "resourceVersion": rv, "annotations": annotations},
            "status": {"message": message}}


def test_key_is_generation_and_cancel_annotation() -> None:
    assert job_key(_job("a", generation=3, cancel="true")) == JobKey(3, "true")
    assert job_key({"metadata": {}}) == JobKey(1, None)


def test_first_sight_then_only_changes_that_matter() -> None:
    f = EventFilter()
    assert f.accept("ADDED", _job("a"))
    # The operator's own status patches: same generation, same annotation.
    assert not f.accept("MODIFIED", _job("a", message="Dispatched"))
    assert not f.accept("MODIFIED", _job("a", message="Completed"))
    assert f.accept("MODIFIED", _job("a", generation=2))  # a spec change
    assert f.accept("MODIFIED", _job("a", generation=2, cancel="true"))  # a cancel
    assert not f.accept("MODIFIED", _job("a", generation=2, cancel="true", message="Cancelled"))
    # A MODIFIED for a uid never seen (e.g. the watch resumed after the list) goes through.
    assert f.accept("MODIFIED", _job("b", message="x"))
    assert f.accept("DELETED", _job("a"))
    assert "a" not in f.seen
    # A second deletion, or one of a uid never seen, has nothing to forget.
    assert not f.accept("DELETED", _job("a"))
    assert not f.accept("ADDED", {"metadata": {}})  # no uid: nothing the engine could key on


def test_unsee_lets_the_next_event_through_after_a_failure() -> None:
    f = EventFilter()
    assert f.accept("ADDED", _job("a"))
    f.unsee("a")
    assert f.accept("MODIFIED", _job("a", message="again"))


def test_without_skipping_every_event_goes_through() -> None:
    f = EventFilter(skip_unchanged=False)
    assert all(f.accept("MODIFIED", _job("a", message=str(i))) for i in range(3))
    assert f.accept("DELETED", _job("a")) and f.accept("DELETED", _job("a"))


def test_relist_adds_new_and_changed_and_deletes_what_vanished() -> None:
    f = EventFilter()
    for uid in ("a", "b", "c"):
        f.accept("ADDED", _job(uid))
    events = f.relisted([_job("a", message="status moved"), _job("b", cancel="true"), _job("d")])
    assert [(kind, obj["metadata"]["uid"]) for kind, obj in events] == [("ADDED", "b"), ("ADDED", "d"), ("DELETED", "c")]
    assert set(f.seen) == {"a", "b", "d"}


def test_lines_split_across_chunks_and_bounded() -> None:
    s = LineSplitter(max_line=16)
    assert s.feed(b'{"a"') == []
    assert s.feed(b':1}\n\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert s.feed(b":3}\n") == [b'{"c":3}']
    with pytest.raises(ValueError, match="longer than 16"):
        s.feed(b"x" * 17)


def test_decode_event_and_errors() -> None:
    kind, obj = decode_event(json.dumps({"type": "MODIFIED", "object": _job("a")}).encode())
    assert kind == "MODIFIED" and obj["metadata"]["uid"] == "a"
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version: 5 (9)"}}
    with pytest.raises(Gone, match="too old"):
        decode_event(json.dumps(gone).encode())
    with pytest.raises(KubeAPIError):
        decode_event(json.dumps({"type": "ERROR", "object": {"code": 500}}).encode())
    with pytest.raises(ValueError):
        decode_event(b"{not json")


def _watch(observed: list[str], forgotten: list[str]) -> ImageJobWatch:
    async def observe(body: Mapping[str, Any]) -> None:
        observed.append(body["status"]["message"])

    # AsyncKube opens no connection until a request: the lines are fed directly here.
    kube = AsyncKube.__new__(AsyncKube)
    return ImageJobWatch(kube, observe, forgotten.append)


def test_resource_version_follows_every_event_and_bookmark() -> None:
    observed: list[str] = []
    forgotten: list[str] = []

    async def scenario() -> ImageJobWatch:
        watch = _watch(observed, forgotten)
        lines = [{"type": "ADDED", "object": _job("a", message="new", rv="10")},
                 {"type": "MODIFIED", "object": _job("a", message="own status patch", rv="11")},
                 {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}},
                 {"type": "MODIFIED", "object": _job("a", cancel="true", message="cancel", rv="16")},
                 {"type": "DELETED", "object": _job("a", cancel="true", rv="17")}]
        for line in lines:
            watch._on_line(json.dumps(line).encode())
            if line["type"] == "BOOKMARK":
                assert watch.resource_version == "15"
        await asyncio.sleep(0.01)  # the lane runs
        return watch

    watch = asyncio.run(scenario())
    assert watch.resource_version == "17"
    assert (watch.received, watch.delivered) == (4, 3)
    # One lane per object, in order, only the latest waiting event: the ADDED ran, the
    # cancel was superseded by the deletion while it waited.
    assert observed == ["new"] and forgotten == ["a"]
