"""FairQueue: realtime first, namespaces take turns, re-queued jobs go to the front."""

from __future__ import annotations

from dataclasses import dataclass

from gpuroute_operator.core.queues import FairQueue


@dataclass(frozen=True)
class J:
    uid: str
    namespace: str = "a"
    priority: str = "batch"


def _drain(queue: FairQueue[J]) -> list[str]:
    out = []
    while (job := queue.pop()) is not None:
        out.append(job.uid)
    return out


def test_empty_queue() -> None:
    q: FairQueue[J] = FairQueue()
    assert q.pop() is None
    assert len(q) == 0 and q.count("batch") == 0 and q.count("realtime") == 0
    assert list(q) == [] and "x" not in q
    assert q.remove("x") is None


def test_fifo_within_a_namespace() -> None:
    q: FairQueue[J] = FairQueue()
    for i in range(5):
        q.push(J(f"j{i}"))
    assert _drain(q) == ["j0", "j1", "j2", "j3", "j4"]


def test_realtime_before_batch() -> None:
    q: FairQueue[J] = FairQueue()
    q.push(J("b1"))
    q.push(J("r1", priority="realtime"))
    q.push(J("b2"))
    q.push(J("r2", priority="realtime"))
    assert _drain(q) == ["r1", "r2", "b1", "b2"]


def test_realtime_pushed_late_overtakes_a_batch_backlog() -> None:
    q: FairQueue[J] = FairQueue()
    for i in range(100):
        q.push(J(f"b{i}", namespace="x"))
    assert q.pop() == J("b0", namespace="x")
    q.push(J("rt", namespace="y", priority="realtime"))
    assert q.pop() == J("rt", namespace="y", priority="realtime")
    assert q.pop() == J("b1", namespace="x")


def test_a_burst_does_not_starve_another_namespace() -> None:
    q: FairQueue[J] = FairQueue()
    for i in range(1000):
        q.push(J(f"a{i}", namespace="A"))
    q.push(J("b0", namespace="B"))
    assert len(q) == 1001
    assert q.pop() == J("a0", namespace="A")
    assert q.pop() == J("b0", namespace="B")
    order = _drain(q)
    assert order == [f"a{i}" for i in range(1, 1000)]


def test_namespaces_alternate() -> None:
    q: FairQueue[J] = FairQueue()
    for i in range(3):
        q.push(J(f"a{i}", namespace="a"))
        q.push(J(f"b{i}", namespace="b"))
    assert _drain(q) == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_three_namespaces_round_robin_with_uneven_backlogs() -> None:
    q: FairQueue[J] = FairQueue()
    for i in range(4):
        q.push(J(f"a{i}", namespace="a"))
    q.push(J("b0", namespace="b"))
    for i in range(2):
        q.push(J(f"c{i}", namespace="c"))
    assert _drain(q) == ["a0", "b0", "c0", "a1", "c1", "a2", "a3"]


def test_round_robin_is_per_priority() -> None:
    q: FairQueue[J] = FairQueue()
    q.push(J("a-b0", namespace="a"))
    q.push(J("a-b1", namespace="a"))
    q.push(J("b-r0", namespace="b", priority="realtime"))
    q.push(J("a-r0", namespace="a", priority="realtime"))
    q.push(J("b-b0", namespace="b"))
    assert _drain(q) == ["b-r0", "a-r0", "a-b0", "b-b0", "a-b1"]


def test_front_puts_a_requeued_job_first_in_its_namespace() -> None:
    q: FairQueue[J] = FairQueue()
    q.push(J("a0", namespace="a"))
    q.push(J("a1", namespace="a"))
    q.push(J("b0", namespace="b"))
    q.push(J("a-retry", namespace="a"), front=True)
    assert _drain(q) == ["a-retry", "b0", "a0", "a1"]


def test_front_on_an_empty_namespace() -> None:
    q: FairQueue[J] = FairQueue()
    q.push(J("x", namespace="n"), front=True)
    assert _drain(q) == ["x"]


def test_duplicates_are_ignored() -> None:
    q: FairQueue[J] = FairQueue()
    q.push(J("x"))
    q.push(J("y"))
    q.push(J("x"))
    q.push(J("x"), front=True)
    q.push(J("x", namespace="other", priority="realtime"))  # same uid: still the same job
    assert len(q) == 2
    assert q.count("batch") == 2 and q.count("realtime") == 0
    assert _drain(q) == ["x", "y"]


def test_popped_job_can_be_pushed_again() -> None:
    q: FairQueue[J] = FairQueue()
    q.push(J("x"))
    assert q.pop() == J("x")
    q.push(J("x"))
    assert len(q) == 1 and _drain(q) == ["x"]


def test_remove() -> None:
    q: FairQueue[J] = FairQueue()
    q.push(J("a0", namespace="a"))
    q.push(J("b0", namespace="b"))
    q.push(J("b1", namespace="b"))
    q.push(J("r", namespace="a", priority="realtime"))
    assert q.remove("b0") == J("b0", namespace="b")
    assert q.remove("b0") is None
    assert q.remove("r") == J("r", namespace="a", priority="realtime")
    assert "b0" not in q and "r" not in q and "b1" in q
    assert len(q) == 2 and q.count("realtime") == 0 and q.count("batch") == 2
    assert [j.uid for j in q] == ["a0", "b1"]
    assert _drain(q) == ["a0", "b1"]


def test_removing_a_namespaces_last_job_drops_it_from_the_round() -> None:
    q: FairQueue[J] = FairQueue()
    q.push(J("a0", namespace="a"))
    q.push(J("b0", namespace="b"))
    q.push(J("a1", namespace="a"))
    assert q.remove("b0") is not None
    assert _drain(q) == ["a0", "a1"]
    q.push(J("b1", namespace="b"))
    assert _drain(q) == ["b1"]


def test_len_count_contains_and_iter() -> None:
    q: FairQueue[J] = FairQueue()
    q.push(J("x"))
    q.push(J("y", namespace="b"))
    q.push(J("requeued"), front=True)
    q.push(J("r", priority="realtime"))
    assert len(q) == 4 and q.count("batch") == 3 and q.count("realtime") == 1
    assert "y" in q and "zzz" not in q
    assert [j.uid for j in q] == ["r", "requeued", "x", "y"]
    assert len(q) == 4  # iterating does not consume
    assert _drain(q) == ["r", "requeued", "y", "x"]
    assert q.pop() is None and len(q) == 0
