"""merge_patch_status: the JSON merge-patch form of a status, and ObjectRef."""

from __future__ import annotations

import dataclasses

import pytest

from gpuroute_operator.core.refs import ObjectRef
from gpuroute_operator.kube.coalesce import Coalescer
from gpuroute_operator.kube.status_writer import merge_patch_status, terminal_event_name


def test_top_level_empty_values_become_null() -> None:
    assert merge_patch_status({"phase": "Queued", "worker": "", "gpu": None, "reason": "Admitted"}) == {
        "phase": "Queued", "worker": None, "gpu": None, "reason": "Admitted"}


def test_nested_empty_values_are_dropped() -> None:
    patch = merge_patch_status({"timing": {"queuedAt": "t", "startedAt": None, "completedAt": "",
                                           "nested": {"a": "", "b": 1, "c": None}}})
    assert patch == {"timing": {"queuedAt": "t", "nested": {"b": 1}}}


def test_lists_are_preserved_and_their_objects_cleaned() -> None:
    patch = merge_patch_status({
        "conditions": [{"type": "A", "message": "", "reason": None, "status": "True"},
                       {"type": "B", "status": "False", "message": "why"}],
        "tags": ["x", "", None, 3],
        "empty": [],
    })
    assert patch == {
        "conditions": [{"type": "A", "status": "True"}, {"type": "B", "status": "False", "message": "why"}],
        # Only object fields are dropped; list items keep their positions.
        "tags": ["x", "", None, 3],
        "empty": [],
    }


def test_falsy_values_that_are_not_empty_survive() -> None:
    patch = merge_patch_status({"attempts": 0, "ratio": 0.0, "draining": False,
                                "timing": {"totalMs": 0, "cached": False}, "output": {}})
    assert patch == {"attempts": 0, "ratio": 0.0, "draining": False,
                     "timing": {"totalMs": 0, "cached": False}, "output": {}}


def test_input_is_not_modified() -> None:
    status = {"worker": "", "timing": {"startedAt": None}, "conditions": [{"message": ""}]}
    merge_patch_status(status)
    assert status == {"worker": "", "timing": {"startedAt": None}, "conditions": [{"message": ""}]}


def test_empty_status() -> None:
    assert merge_patch_status({}) == {}


def test_object_ref_involved() -> None:
    job = ObjectRef("ImageJob", "job-1", "team-a", "uid-1")
    assert job.involved() == {"apiVersion": "gpuroute.io/v1alpha1", "kind": "ImageJob", "name": "job-1",
                              "uid": "uid-1", "namespace": "team-a"}
    pool = ObjectRef("WorkerPool", "gpu-a")
    assert pool.involved() == {"apiVersion": "gpuroute.io/v1alpha1", "kind": "WorkerPool", "name": "gpu-a",
                               "uid": ""}


def test_object_refs_key_pending_writes_by_value() -> None:
    """The writer keeps one pending status per ref: a ref rebuilt from the same object is the
    same key (its writes coalesce), while a re-created job (same name, new uid) or another
    kind of the same name is another object with writes of its own."""
    coalescer: Coalescer[ObjectRef] = Coalescer(0.3)
    coalescer.offer(ObjectRef("ImageJob", "a", "n", "u1"), {"phase": "Queued"}, now=0.0)
    coalescer.offer(ObjectRef("ImageJob", "a", "n", "u1"), {"phase": "Dispatched"}, now=0.1)
    assert len(coalescer) == 1
    coalescer.offer(ObjectRef("ImageJob", "a", "n", "u2"), {"phase": "Queued"}, now=0.1)
    coalescer.offer(ObjectRef("WorkerPool", "a"), {"connectedWorkers": 1}, now=0.1)
    coalescer.offer(ObjectRef("ImageJob", "a", "other-namespace", "u1"), {"phase": "Queued"}, now=0.1)
    assert len(coalescer) == 4
    # A re-created job's terminal Event is not refused as its predecessor's duplicate.
    assert terminal_event_name(ObjectRef("ImageJob", "a", "n", "u1")) != terminal_event_name(
        ObjectRef("ImageJob", "a", "n", "u2"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ObjectRef("ImageJob", "a").uid = "changed"  # type: ignore[misc]
