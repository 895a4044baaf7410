"""Shared helpers: percentiles, machine description, result rows."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000.0 for s in seconds]
    return {"p50_ms": round(percentile(ms, 0.50), 3), "p95_ms": round(percentile(ms, 0.95), 3),
            "p99_ms": round(percentile(ms, 0.99), 3), "mean_ms": round(statistics.fmean(ms), 3) if ms else float("nan")}


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    info: dict[str, Any] = {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
                            "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    return info


def row(benchmark: str, metric: str, value: float, unit: str, baseline_name: str, baseline: float,
        *, higher_is_better: bool) -> dict[str, Any]:
    """One line of the results table; ratio > 1 always means gpuroute is better."""
    if higher_is_better:
        ratio = value / baseline if baseline else float("nan")
    else:
        ratio = baseline / value if value else float("nan")
    return {"benchmark": benchmark, "metric": metric, "value": round(value, 3), "unit": unit,
            "baseline": baseline_name, "baseline_value": round(baseline, 3), "ratio": round(ratio, 3)}
