"""Operator memory: resident set size with 0, 1,000 and 10,000 ImageJobs present.

The pool has no workers, so every job is admitted and stays Queued (NoEligiblePool):
the operator holds all of them in memory at once, the worst case for a backlog.
Baseline: the same operator process with no jobs.
"""

from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import row
from bench.control_plane import GROUP, NS, PLURAL, VERSION, job_body, local_stack


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        kb = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
    return kb / 1024.0


def _admitted(stack: Any) -> float:
    return stack.operator_metric("gpuroute_jobs_admitted_total")


def run(*, counts: tuple[int, ...] = (1000, 10000), clients: int = 6) -> dict[str, Any]:
    results: dict[str, Any] = {"rss_mb": {}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="gpuroute-bench-mem-") as tmp, local_stack(0, workdir=Path(tmp)) as stack:
        assert stack.operator is not None
        pid = stack.operator.popen.pid
        time.sleep(3.0)
        idle = _rss_mb(pid)
        results["rss_mb"][0] = round(idle, 1)
        created = 0
        for count in counts:
            names = [f"mem-{i}" for i in range(created, count)]
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(lambda n: stack.custom.create_namespaced_custom_object(
                    GROUP, VERSION, NS, PLURAL, job_body(n)), names))
            created = count
            deadline = time.monotonic() + 600
            while _admitted(stack) < count:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"operator admitted {_admitted(stack)} of {count} jobs")
                time.sleep(1.0)
            time.sleep(3.0)  # status writes of the last admissions settle
            rss = _rss_mb(pid)
            results["rss_mb"][count] = round(rss, 1)
            results["rows"].append(row("operator memory", f"RSS with {count} ImageJobs", rss, "MB",
                                       "idle operator (0 jobs)", idle, higher_is_better=False))
            results.setdefault("kb_per_job", {})[count] = round((rss - idle) * 1024 / count, 1)
    return results


if __name__ == "__main__":
    out = run(counts=tuple(int(a) for a in sys.argv[1:]) or (1000, 10000))
    print(out["rss_mb"], out.get("kb_per_job"))
