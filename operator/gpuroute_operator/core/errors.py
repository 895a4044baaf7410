"""Errors of the core that are not a spec's fault (pure); SpecError lives with the spec parser."""

from __future__ import annotations

from gpuroute.fields import FieldError


class SigningUnavailable(FieldError, RuntimeError):
    """The operator cannot sign for this storage right now (an identity outage, a delegation
    key not fetched yet, no cloud credentials yet): the job waits and is retried, unlike a
    SpecError."""
