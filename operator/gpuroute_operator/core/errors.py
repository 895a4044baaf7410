"""Errors that name the field at fault, shared by every parser and rule of the core (pure)."""

from __future__ import annotations


class SigningUnavailable(RuntimeError):
    """The operator cannot sign for this storage right now (an identity outage, a delegation
    key not fetched yet, no cloud credentials yet): the job waits and is retried, unlike a
    SpecError."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
