"""Item groups through the dispatcher's rules: a batch's items sent as one JOB and answered,
item by item, by one RESULT. No sockets, no API server, a clock moved by hand."""

from __future__ import annotations

from gpuroute.protocol import AttemptId, ErrorCode, ItemAnswer, JobRequest, OutputInfo, Result, StageTiming
from gpuroute_operator.batch.state import group_spec
from gpuroute_operator.core.jobs import Job
from gpuroute_operator.core.phases import Phase
from gpuroute_operator.core.spec import StorageURI, parse_batch_spec
from tests.unit.gpuroute_operator.core.dispatcher_world import GOOD_SHA, World


def _group(world: World, uid: str, names: str, *, item_timeout: int = 30) -> Job:
    batch = parse_batch_spec({"input": {"prefix": "s3://bucket/in/"}, "output": {"prefix": "s3://bucket/out/"},
                              "steps": [{"op": "invert"}], "itemTimeoutSeconds": item_timeout, "maxAttempts": 2,
                              "placement": {"pools": ["pool-a"]}})
    items = [(StorageURI("s3", "bucket", f"in/{n}.png"), StorageURI("s3", "bucket", f"out/{n}.png")) for n in names]
    return Job(uid, "team-a", "batch", 1, group_spec(batch, items, 120), world.now, batch="b-uid")


def _answers(*codes: ErrorCode | None) -> tuple[ItemAnswer, ...]:
    return tuple(ItemAnswer(OutputInfo(100, 8, 8, GOOD_SHA, "png"), StageTiming(1.0, 1.0, 2.0, 1.0, 1.0), 8, 8)
                 if code is None else ItemAnswer(code=code, message=f"{code.value} happened") for code in codes)


def _request(world: World, to: bytes) -> JobRequest:
    sent = world.requests(to)
    assert len(sent) == 1, sent
    return sent[0]


def test_a_group_is_one_job_one_request_and_one_answer_per_item() -> None:
    world = World()
    w1 = world.connect("pool-a", "w1")
    world.dispatcher.admit(_group(world, "g1", "abc"), world.now)
    request = _request(world, w1)
    assert request.job == AttemptId("g1", 1) and request.item_timeout_s == 30.0
    assert [i.input_url.split("?")[0] for i in request.items] == [f"https://storage.test/in/in/{n}.png" for n in "abc"]
    assert request.output.url == "" and request.output.format == "png"
    world.advance(0.5)
    world.send(w1, Result(request.job, StageTiming(), None, device="cpu",
                          items=_answers(None, ErrorCode.INVALID_INPUT, ErrorCode.OOM)))
    ended = world.effects.ended_items["g1"]
    assert ended.phase is Phase.COMPLETED and ended.message == "1 of 3 items written"
    assert [a.ok for a in ended.item_answers] == [True, False, False]
    assert ended.item_answers[2].code is ErrorCode.OOM  # the batch decides: retried in a later group
    assert world.effects.terminal_events == {} and world.effects.statuses == {}  # items have no resource
    assert "g1" not in world.dispatcher.jobs


def test_an_answer_that_does_not_match_the_group_is_dropped_and_the_group_sent_again() -> None:
    world = World()
    w1 = world.connect("pool-a", "w1")
    world.dispatcher.admit(_group(world, "g1", "abc"), world.now)
    first = _request(world, w1)
    world.effects.clear()
    # Two answers for three items: not an answer to what was sent.
    world.send(w1, Result(first.job, StageTiming(), None, items=_answers(None, None)))
    assert world.dispatcher.counters.get("malformed_result") == 1
    assert "g1" not in world.effects.ended_items
    again = _request(world, w1)
    assert again.job == AttemptId("g1", 2) and len(again.items) == 3
    # A single image's answer for a group is no answer either; the attempts are spent then.
    world.effects.clear()
    world.send(w1, world.result(again.job))
    ended = world.effects.ended_items["g1"]
    assert ended.phase is Phase.FAILED and ended.attempts == 2 and "0 answers for 3 items" in ended.message
    assert world.dispatcher.counters.get("malformed_result") == 2


def test_a_whole_group_lost_with_its_worker_is_requeued_as_one() -> None:
    world = World()
    w1 = world.connect("pool-a", "w1")
    w2 = world.connect("pool-a", "w2", capacity=1)
    world.dispatcher.admit(_group(world, "g1", "ab"), world.now)
    sent_to = w1 if world.requests(w1) else w2
    other = w2 if sent_to == w1 else w1
    world.effects.clear()
    world.dispatcher.on_lost(sent_to, "heartbeats stopped", world.now)
    request = _request(world, other)
    assert request.job == AttemptId("g1", 2) and len(request.items) == 2
    world.send(other, Result(request.job, StageTiming(), None, items=_answers(None, None)))
    assert world.effects.ended_items["g1"].phase is Phase.COMPLETED


def test_each_computed_item_teaches_the_router_and_a_cached_answer_nothing() -> None:
    world = World()
    w1 = world.connect("pool-a", "w1")
    pool = world.dispatcher.pools["pool-a"]
    world.dispatcher.admit(_group(world, "g1", "ab"), world.now)
    request = _request(world, w1)
    world.send(w1, Result(request.job, StageTiming(), None, cached=True, items=_answers(None, None)))
    assert world.effects.ended_items["g1"].phase is Phase.COMPLETED
    assert pool.service_ms is None  # nothing learnt from a cache
    world.effects.clear()
    world.dispatcher.admit(_group(world, "g2", "cd"), world.now)
    request = _request(world, w1)
    world.send(w1, Result(request.job, StageTiming(), None, items=_answers(None, ErrorCode.INVALID_INPUT)))
    assert pool.service_ms == 6.0  # the one computed item's stages (1 + 1 + 2 + 1 + 1 ms), not the group's 0
