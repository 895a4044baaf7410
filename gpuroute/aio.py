"""asyncio helpers shared by the operator and the worker."""

from __future__ import annotations

import asyncio
from typing import Any


async def stop_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the tasks and wait until every one has ended (None entries are skipped).

    A task's own cancellation is what was asked for and is not raised; any other exception a
    task ended with is (the first one), so a crash at shutdown is not hidden. A cancellation of
    the caller itself still propagates: gather is cancelled with it."""
    live = [task for task in tasks if task is not None]
    for task in live:
        task.cancel()
    for outcome in await asyncio.gather(*live, return_exceptions=True):
        if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            raise outcome
