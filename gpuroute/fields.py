"""Checks shared by every parser of untrusted input (specs, wire headers, pipeline steps): one
error shape that names the field at fault, and one bounded-integer rule (pure)."""

from __future__ import annotations

from typing import Any, TypeGuard


class FieldError(Exception):
    """Input that cannot be used, naming the field at fault: str() reads `field: message`.

    A base for each side's own error (SpecError, StepError, OpError, SigningUnavailable), which
    adds what that side does with it (a Failed reason, an error code, a retry)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        """The spec or header path at fault, e.g. spec.steps[2].radius."""
        self.message = message
        """What is wrong with it."""


def int_in(value: Any, low: int, high: int) -> TypeGuard[int]:
    """An integer from low to high inclusive; a bool is not one (YAML's `true` is a mistake, not 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
