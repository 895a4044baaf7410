"""Which Kubernetes object a status write or an Event is about (pure)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectRef:
    """The object a status or Event is about."""

    kind: str
    """ImageJob or WorkerPool."""
    name: str
    """metadata.name."""
    namespace: str | None = None
    """metadata.namespace; None for cluster-scoped objects."""
    uid: str = ""
    """metadata.uid, for Events."""

    def involved(self) -> dict[str, str]:
        ref = {"apiVersion": "gpuroute.io/v1alpha1", "kind": self.kind, "name": self.name, "uid": self.uid}
        if self.namespace:
            ref["namespace"] = self.namespace
        return ref
