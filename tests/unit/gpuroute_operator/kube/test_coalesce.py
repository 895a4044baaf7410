"""When status writes are due: coalescing within a window, urgency, one write in flight per object."""

from __future__ import annotations

from gpuroute_operator.kube.coalesce import Coalescer


def test_changes_within_the_window_become_one_write_of_the_latest() -> None:
    c: Coalescer[str] = Coalescer(0.3)
    c.offer("job", {"phase": "Queued"}, now=0.0)
    c.offer("job", {"phase": "Dispatched"}, now=0.1)
    c.offer("job", {"phase": "Processing"}, now=0.2)
    assert c.take_due(0.29) == []
    due = c.take_due(0.3)
    assert [(k, p.status["phase"]) for k, p in due] == [("job", "Processing")]
    assert c.take_due(10.0) == []


def test_urgent_is_due_at_once_and_keeps_its_event() -> None:
    c: Coalescer[str] = Coalescer(0.3)
    c.offer("job", {"phase": "Dispatched"}, now=0.0)
    c.offer("job", {"phase": "Completed"}, now=0.01, urgent=True, event="Completed")
    assert c.next_due(0.01) == 0.01
    [(key, pending)] = c.take_due(0.01)
    assert (key, pending.status["phase"], pending.event) == ("job", "Completed", "Completed")


def test_one_write_in_flight_per_object_and_newer_status_follows_it() -> None:
    c: Coalescer[str] = Coalescer(0.3)
    c.offer("job", {"n": 1}, now=0.0, urgent=True)
    [(_, first)] = c.take_due(0.0)
    c.offer("job", {"n": 2}, now=0.05, urgent=True)
    assert c.take_due(0.06) == []                   # the first write has not finished
    c.done("job", first, ok=True, now=0.1)
    [(_, second)] = c.take_due(0.1)
    assert second.status == {"n": 2}


def test_a_failed_write_is_retried_unless_replaced() -> None:
    c: Coalescer[str] = Coalescer(0.3)
    c.offer("a", {"n": 1}, now=0.0, urgent=True, event="E")
    c.offer("b", {"n": 1}, now=0.0, urgent=True, event="E")
    (_, a1), (_, b1) = c.take_due(0.0)
    c.offer("b", {"n": 2}, now=0.5)
    c.done("a", a1, ok=False, now=1.0)
    c.done("b", b1, ok=False, now=1.0)
    due = dict(c.take_due(1.0))
    assert due["a"].status == {"n": 1} and due["a"].event == "E"     # the same status, again
    assert due["b"].status == {"n": 2} and due["b"].event == "E"     # the newer one, carrying the event


def test_forgotten_objects_are_never_written() -> None:
    c: Coalescer[str] = Coalescer(0.3)
    c.offer("gone", {"n": 1}, now=0.0)
    c.forget("gone")
    assert c.take_due(5.0) == [] and len(c) == 0


def test_many_pending_objects_each_due_once() -> None:
    c: Coalescer[int] = Coalescer(0.3)
    for i in range(10_000):
        c.offer(i, {"n": i}, now=i * 0.001)
    due = c.take_due(100.0)
    assert sorted(k for k, _ in due) == list(range(10_000))
    assert c.in_flight == 10_000 and len(c) == 0


def test_a_longer_window_is_cut_short_by_a_later_change() -> None:
    c: Coalescer[str] = Coalescer(0.3)
    c.offer("job", {"phase": "Queued"}, now=0.0, window_s=2.0)
    assert c.take_due(1.0) == []
    c.offer("job", {"phase": "Dispatched"}, now=1.0)
    assert c.take_due(1.2) == []
    due = c.take_due(1.3)
    assert [(k, p.status["phase"]) for k, p in due] == [("job", "Dispatched")]
    c.done("job", due[0][1], ok=True, now=1.31)
    assert c.take_due(5.0) == [] and len(c) == 0


def test_a_queued_status_alone_is_written_after_its_long_window() -> None:
    c: Coalescer[str] = Coalescer(0.3)
    c.offer("job", {"phase": "Queued"}, now=0.0, window_s=2.0)
    assert c.take_due(1.9) == []
    assert [k for k, _ in c.take_due(2.0)] == ["job"]
