"""The phase state machine, conditions, and the merge-patch form of a status."""

from __future__ import annotations

import pytest

from gpuroute_operator.phases import Phase, TransitionError, check_transition, conditions
from gpuroute_operator.status import merge_patch_status


@pytest.mark.parametrize(("current", "target"), [
    (Phase.QUEUED, Phase.DISPATCHED), (Phase.DISPATCHED, Phase.PROCESSING), (Phase.PROCESSING, Phase.COMPLETED),
    (Phase.PROCESSING, Phase.QUEUED), (Phase.QUEUED, Phase.COMPLETED), (Phase.QUEUED, Phase.FAILED),
])
def test_allowed(current: Phase, target: Phase) -> None:
    check_transition(current, target)


@pytest.mark.parametrize("terminal", [Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED])
def test_terminal_phases_never_change(terminal: Phase) -> None:
    for target in Phase:
        with pytest.raises(TransitionError):
            check_transition(terminal, target)


def test_conditions_follow_the_phase_and_keep_transition_times() -> None:
    queued = conditions(Phase.QUEUED, reason="Admitted", message="", now="t1", generation=1)
    assert {c["type"]: c["status"] for c in queued} == {"Dispatched": "False", "Succeeded": "Unknown", "Failed": "False"}
    done = conditions(Phase.COMPLETED, reason="Succeeded", message="ok", now="t2", generation=1, previous=queued)
    by_type = {c["type"]: c for c in done}
    assert by_type["Succeeded"]["status"] == "True" and by_type["Succeeded"]["lastTransitionTime"] == "t2"
    assert by_type["Failed"]["lastTransitionTime"] == "t1"  # unchanged status keeps its time
    failed = {c["type"]: c for c in conditions(Phase.FAILED, reason="Timeout", message="late", now="t3", generation=2)}
    assert (failed["Failed"]["status"], failed["Failed"]["reason"], failed["Succeeded"]["status"]) == ("True", "Timeout", "False")
    assert failed["Failed"]["observedGeneration"] == 2


def test_merge_patch_deletes_empty_top_level_and_drops_empty_nested_fields() -> None:
    patch = merge_patch_status({"phase": "Queued", "worker": "", "gpu": None,
                                "conditions": [{"type": "A", "message": "", "reason": None, "status": "True"}],
                                "timing": {"queuedAt": "t", "startedAt": None}})
    assert patch == {"phase": "Queued", "worker": None, "gpu": None,
                     "conditions": [{"type": "A", "status": "True"}], "timing": {"queuedAt": "t"}}
