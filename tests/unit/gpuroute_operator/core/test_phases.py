"""The ImageJob phase machine and the Kubernetes conditions each phase implies."""

from __future__ import annotations

import itertools

import pytest

from gpuroute_operator.core.phases import TERMINAL, Phase, TransitionError, check_transition, conditions

Q, D, P, C, F, X = (Phase.QUEUED, Phase.DISPATCHED, Phase.PROCESSING, Phase.COMPLETED, Phase.FAILED,
                    Phase.CANCELLED)

ALLOWED = {
    (Q, Q), (Q, D), (Q, C), (Q, F), (Q, X),
    (D, Q), (D, P), (D, C), (D, F), (D, X),
    (P, Q), (P, C), (P, F), (P, X),
}


def test_phase_values() -> None:
    assert [p.value for p in Phase] == ["Queued", "Dispatched", "Processing", "Completed", "Failed", "Cancelled"]
    assert TERMINAL == {C, F, X}
    assert [p.terminal for p in Phase] == [False, False, False, True, True, True]


@pytest.mark.parametrize(("current", "target"), sorted(ALLOWED, key=str))
def test_allowed(current: Phase, target: Phase) -> None:
    assert check_transition(current, target) is None


FORBIDDEN = sorted(set(itertools.product(Phase, Phase)) - ALLOWED, key=str)


@pytest.mark.parametrize(("current", "target"), FORBIDDEN)
def test_forbidden(current: Phase, target: Phase) -> None:
    with pytest.raises(TransitionError) as caught:
        check_transition(current, target)
    assert str(caught.value) == f"{current.value} cannot become {target.value}"


def test_specific_forbidden_edges() -> None:
    for current, target in [(P, D), (D, D), (P, P), (C, Q), (F, Q), (X, Q), (C, C)]:
        with pytest.raises(TransitionError):
            check_transition(current, target)


@pytest.mark.parametrize("terminal", sorted(TERMINAL, key=str))
def test_terminal_phases_never_change(terminal: Phase) -> None:
    for target in Phase:
        with pytest.raises(TransitionError):
            check_transition(terminal, target)


def _by_type(rows: list[dict]) -> dict[str, dict]:
    assert [r["type"] for r in rows] == ["Dispatched", "Succeeded", "Failed"]
    return {r["type"]: r for r in rows}


@pytest.mark.parametrize(("phase", "dispatched", "succeeded", "failed"), [
    (Q, "False", "Unknown", "False"),
    (D, "True", "Unknown", "False"),
    (P, "True", "Unknown", "False"),
    (C, "True", "True", "False"),
    (F, "False", "False", "True"),
    (X, "False", "False", "False"),
])
def test_condition_statuses_per_phase(phase: Phase, dispatched: str, succeeded: str, failed: str) -> None:
    rows = _by_type(conditions(phase, reason="R", message="m", now="t", generation=1))
    assert (rows["Dispatched"]["status"], rows["Succeeded"]["status"], rows["Failed"]["status"]) == (
        dispatched, succeeded, failed)


def test_condition_rows_in_full() -> None:
    rows = conditions(F, reason="Timeout", message="no result in 30 s", now="2026-01-01T00:00:00.000Z",
                      generation=3)
    assert rows == [
        {"type": "Dispatched", "status": "False", "reason": "Waiting", "message": "",
         "lastTransitionTime": "2026-01-01T00:00:00.000Z", "observedGeneration": 3},
        {"type": "Succeeded", "status": "False", "reason": "Timeout", "message": "no result in 30 s",
         "lastTransitionTime": "2026-01-01T00:00:00.000Z", "observedGeneration": 3},
        {"type": "Failed", "status": "True", "reason": "Timeout", "message": "no result in 30 s",
         "lastTransitionTime": "2026-01-01T00:00:00.000Z", "observedGeneration": 3},
    ]


def test_reasons_when_not_failed() -> None:
    rows = _by_type(conditions(D, reason="", message="sent", now="t", generation=None))
    assert rows["Dispatched"]["reason"] == "Dispatched"
    assert rows["Succeeded"]["reason"] == "Dispatched"  # empty reason falls back to the phase name
    assert rows["Succeeded"]["message"] == "sent"
    assert (rows["Failed"]["reason"], rows["Failed"]["message"]) == ("NotFailed", "")
    # No generation: no observedGeneration key at all.
    assert all("observedGeneration" not in r for r in rows.values())


def test_last_transition_time_carried_when_status_unchanged() -> None:
    queued = conditions(Q, reason="Admitted", message="", now="t1", generation=1)
    assert all(r["lastTransitionTime"] == "t1" for r in queued)
    dispatched = _by_type(conditions(D, reason="Dispatched", message="", now="t2", generation=1, previous=queued))
    assert dispatched["Dispatched"]["lastTransitionTime"] == "t2"   # False -> True
    assert dispatched["Succeeded"]["lastTransitionTime"] == "t1"    # Unknown -> Unknown
    assert dispatched["Failed"]["lastTransitionTime"] == "t1"       # False -> False
    processing = _by_type(conditions(P, reason="Processing", message="", now="t3", generation=1,
                                     previous=list(dispatched.values())))
    assert [processing[k]["lastTransitionTime"] for k in ("Dispatched", "Succeeded", "Failed")] == ["t2", "t1", "t1"]
    done = _by_type(conditions(C, reason="Succeeded", message="ok", now="t4", generation=2,
                               previous=list(processing.values())))
    assert [done[k]["lastTransitionTime"] for k in ("Dispatched", "Succeeded", "Failed")] == ["t2", "t4", "t1"]
    assert done["Succeeded"]["status"] == "True"
    assert done["Succeeded"]["observedGeneration"] == 2


def test_last_transition_time_refreshed_when_status_changes_back() -> None:
    dispatched = conditions(D, reason="", message="", now="t1", generation=1)
    requeued = _by_type(conditions(Q, reason="WorkerLost", message="", now="t2", generation=1, previous=dispatched))
    assert requeued["Dispatched"]["status"] == "False"
    assert requeued["Dispatched"]["lastTransitionTime"] == "t2"
    assert requeued["Succeeded"]["lastTransitionTime"] == "t1"


def test_previous_without_time_or_unknown_types() -> None:
    previous = [{"type": "Succeeded", "status": "Unknown"}, {"type": "Other", "status": "True",
                                                             "lastTransitionTime": "t0"}]
    rows = _by_type(conditions(Q, reason="", message="", now="t5", generation=None, previous=previous))
    assert rows["Succeeded"]["lastTransitionTime"] == "t5"
    assert set(rows) == {"Dispatched", "Succeeded", "Failed"}
