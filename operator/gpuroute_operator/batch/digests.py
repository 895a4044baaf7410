"""A compact set of strings for a batch's per-item memory (pure, no I/O).

A batch of a million inputs must not keep a million URI strings (about 150 bytes each as
Python objects, twice over): the sets of inputs listed and finished hold 8-byte keyed
BLAKE2b digests instead, in sorted `array('Q')` runs merged like a binary counter (a log-
structured set), so a member costs 8 bytes plus a bounded buffer of recent digests. Runs
stop merging at MAX_RUN members, so a merge never holds more than two such runs twice over
(a set of a million members is some eight runs: eight binary searches a lookup). Two
different strings share a digest with a chance of about n^2 / 2^65 (3e-8 at n = 1e6); the
key is random per set, so nobody can choose strings that collide.
"""

from __future__ import annotations

import hashlib
import heapq
import secrets
from array import array
from bisect import bisect_left

RECENT = 16384
"""Digests kept in a plain set before they are sorted into a run (bounds that set's size)."""
MAX_RUN = 131072
"""Runs are merged up to this many members (1 MiB): bounds a merge's transient memory."""


class DigestSet:
    """Strings by digest: `add` and `in`, about 8 bytes a member; no removal."""

    __slots__ = ("_key", "_recent", "_runs", "_recent_limit", "_max_run", "_count")

    def __init__(self, *, key: bytes | None = None, recent: int = RECENT, max_run: int = MAX_RUN) -> None:
        self._key = key if key is not None else secrets.token_bytes(16)
        self._recent: set[int] = set()
        self._runs: list[array[int]] = []
        """Sorted runs: below MAX_RUN members each is under half the size of the one before."""
        self._recent_limit = max(1, recent)
        self._max_run = max_run
        self._count = 0

    def _digest(self, text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                                              key=self._key).digest(), "little")

    def __len__(self) -> int:
        return self._count

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and self._has(self._digest(text))

    def add(self, text: str) -> bool:
        """Add `text`; False when it was a member already."""
        digest = self._digest(text)
        if self._has(digest):
            return False
        self._recent.add(digest)
        self._count += 1
        if len(self._recent) >= self._recent_limit:
            self._spill()
        return True

    @property
    def nbytes(self) -> int:
        """Bytes held by the sorted runs (the recent set's few KB aside)."""
        return sum(run.itemsize * len(run) for run in self._runs)

    def clear(self) -> None:
        """Forget every member (the batch ended: its memory goes back before the manifest is written)."""
        self._recent.clear()
        self._runs.clear()
        self._count = 0

    def _has(self, digest: int) -> bool:
        if digest in self._recent:
            return True
        for run in self._runs:
            at = bisect_left(run, digest)
            if at < len(run) and run[at] == digest:
                return True
        return False

    def _spill(self) -> None:
        run = array("Q", sorted(self._recent))
        self._recent.clear()
        while self._runs and len(self._runs[-1]) <= 2 * len(run) and len(self._runs[-1]) + len(run) <= self._max_run:
            run = array("Q", heapq.merge(self._runs.pop(), run))
        self._runs.append(run)
