"""Errors raised while running a pipeline, split by whose fault they are.

The runtime maps them to protocol error codes: OpError is the input's fault and is
never retried (invalid_input); OutOfMemory is the device's and is retryable (oom).
"""

from __future__ import annotations

from gpuroute.fields import FieldError


class OpError(FieldError, ValueError):
    """A step cannot run on this input; `field` names the offending spec path."""


class OutOfMemory(RuntimeError):
    """The device ran out of memory even at batch 1 and the smallest tile."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
        """True when the image ran alone on the device: another attempt on the same
        kind of GPU cannot fit it either, so it is not retried."""


def step_field(index: int, name: str | None = None) -> str:
    """The spec path of step `index`, or of its parameter `name`."""
    path = f"spec.steps[{index}]"
    return f"{path}.{name}" if name else path
