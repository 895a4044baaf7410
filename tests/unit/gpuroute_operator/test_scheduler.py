"""FairQueue: realtime first, namespaces take turns, re-queued jobs go to the front."""

from __future__ import annotations

from dataclasses import dataclass

from gpuroute_operator.scheduler import FairQueue


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


def test_realtime_before_batch() -> None:
    q: FairQueue[J] = FairQueue()
    q.push(J("b1"))
    q.push(J("r1", priority="realtime"))
    q.push(J("b2"))
    q.push(J("r2", priority="realtime"))
    assert _drain(q) == ["r1", "r2", "b1", "b2"]


def test_a_burst_does_not_starve_another_namespace() -> None:
    q: FairQueue[J] = FairQueue()
    for i in range(1000):
        q.push(J(f"a{i}", namespace="burst"))
    q.push(J("b0", namespace="quiet"))
    order = _drain(q)
    assert order.index("b0") == 1
    assert len(order) == 1001


def test_namespaces_alternate() -> None:
    q: FairQueue[J] = FairQueue()
    for i in range(3):
        q.push(J(f"a{i}", namespace="a"))
        q.push(J(f"b{i}", namespace="b"))
    assert _drain(q) == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_front_remove_duplicates_and_counts() -> None:
    q: FairQueue[J] = FairQueue()
    q.push(J("x"))
    q.push(J("y"))
    q.push(J("x"))  # already queued: ignored
    q.push(J("requeued"), front=True)
    q.push(J("r", priority="realtime"))
    assert len(q) == 4 and q.count("batch") == 3 and q.count("realtime") == 1
    assert "y" in q
    assert q.remove("y") == J("y") and q.remove("y") is None
    assert _drain(q) == ["r", "requeued", "x"]
    assert q.pop() is None and len(q) == 0
