"""`make bench`: every benchmark in one run; prints one table and writes
bench/results/latest.json and bench/results/latest.md.

Each row shows gpuroute's figure, the baseline measured in the same run, and a ratio
where > 1 means gpuroute is better. Sizes can be raised with environment variables:
GPUROUTE_BENCH_JOBS (control-plane throughput jobs, default 2000),
GPUROUTE_BENCH_MEMORY (comma-separated job counts, default 1000,10000).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from bench import control_plane, dataplane, dispatch, gpu, operator_memory, routing_sim, worker_ops
from bench.common import machine

RESULTS = Path(__file__).resolve().parent / "results"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| benchmark | metric | gpuroute | baseline | baseline value | ratio (>1 = gpuroute better) |",
             "|---|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['metric']} | {r['value']} {r['unit']} | {r['baseline']} "
                     f"| {r['baseline_value']} {r['unit']} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    started = time.perf_counter()
    jobs = int(os.environ.get("GPUROUTE_BENCH_JOBS", "2000"))
    memory = tuple(int(c) for c in os.environ.get("GPUROUTE_BENCH_MEMORY", "1000,10000").split(","))
    results: dict[str, Any] = {"machine": machine()}
    for name, call in (("dataplane", dataplane.run), ("worker_ops", worker_ops.run), ("dispatch", dispatch.run),
                       ("control_plane", lambda: control_plane.run(throughput_jobs=jobs)),
                       ("operator_memory", lambda: operator_memory.run(counts=memory)), ("gpu", gpu.run)):
        print(f"running {name}...", flush=True)
        results[name] = call()
    print("running routing_sim...", flush=True)
    results["routing_sim"] = routing_sim.run()
    rows = [r for key in ("control_plane", "dispatch", "dataplane", "worker_ops", "operator_memory", "gpu")
            for r in results[key].get("rows", [])]
    results["seconds"] = round(time.perf_counter() - started, 1)
    m = results["machine"]
    text = (f"Measured {time.strftime('%Y-%m-%d')} on {m['cpus']} x {m['cpu_model'] or 'CPU'}, torch {m.get('torch')}, "
            f"GPU: {m.get('cuda') or 'none'} ({results['seconds']} s).\n\n" + table(rows)
            + ("\n\nGPU: " + results["gpu"]["skipped"] if "skipped" in results["gpu"] else "")
            + "\n\n" + routing_sim.markdown(results["routing_sim"]) + "\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    (RESULTS / "latest.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
