"""Shared helpers: percentiles, timing, machine description, result rows."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least a share `q` of the values at or
    below it (index ceil(q * n) - 1, no interpolation); NaN for no values (a benchmark that
    measured nothing). The one definition every benchmark uses, so their p50 / p95 compare."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean in milliseconds of durations given in seconds."""
    ms = [s * 1000.0 for s in seconds]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 0.50), 3), "p95_ms": round(percentile(ms, 0.95), 3),
            "p99_ms": round(percentile(ms, 0.99), 3),
            "mean_ms": round(statistics.fmean(ms), 3) if ms else float("nan")}


def best_of(fn: Callable[[], Any], repeats: int, *, warmup: int = 1) -> float:
    """Fastest of `repeats` timed calls, in seconds.

    The minimum, not the mean: the cores are shared, and interference only ever adds time,
    so the minimum is the figure least polluted by other work on the machine.
    """
    for _ in range(warmup):
        fn()  # first calls allocate and, for torch, choose kernels
    times = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def machine() -> dict[str, Any]:
    """What the figures were measured on; stored with every results file."""
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    info: dict[str, Any] = {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
                            "platform": platform.platform(), "machine": platform.machine()}
    try:
        with open("/proc/loadavg") as handle:
            # Load at the start: the figures are only as quiet as the machine was.
            info["loadavg_at_start"] = handle.read().split()[:3]
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = bool(torch.cuda.is_available())
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
        info["cuda_available"] = False
        info["cuda"] = None
    return info


def row(benchmark: str, metric: str, value: float, unit: str, baseline_name: str, baseline: float,
        *, higher_is_better: bool) -> dict[str, Any]:
    """One line of the results table; ratio > 1 always means gpuroute is better.

    For times that is baseline / gpuroute, for rates gpuroute / baseline, so one column
    reads the same way for every benchmark.
    """
    if higher_is_better:
        ratio = value / baseline if baseline else float("nan")
    else:
        ratio = baseline / value if value else float("nan")
    return {"benchmark": benchmark, "metric": metric, "value": round(value, 3), "unit": unit,
            "baseline": baseline_name, "baseline_value": round(baseline, 3), "ratio": round(ratio, 3),
            "higher_is_better": higher_is_better}


