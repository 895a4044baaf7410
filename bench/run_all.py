"""`make bench`: every benchmark in one run; prints one Markdown table and writes
bench/results/latest.json and bench/results/latest.md.

Each row shows gpuroute's figure, the baseline measured in the same run, and a ratio
where > 1 means gpuroute is better (baseline/gpuroute for times, gpuroute/baseline for
rates). Nothing here asserts a timing: a benchmark that breaks is reported as an error
and the run exits non-zero after writing what the others measured.

Sizes (flags, or environment variables for `make bench`):
  --jobs / GPUROUTE_BENCH_JOBS                 control-plane throughput jobs (2000)
  --latency-jobs / GPUROUTE_BENCH_LATENCY_JOBS control-plane latency samples (200)
  --memory / GPUROUTE_BENCH_MEMORY             operator-memory job counts (1000,10000)
  --dispatch-jobs / GPUROUTE_BENCH_DISPATCH_JOBS  dispatch round trips per series (100)
  --routing-jobs / GPUROUTE_BENCH_ROUTING_JOBS routing-simulation trace length (10000)
  --batch-items / GPUROUTE_BENCH_BATCH_ITEMS   items in the batch arm of `batch` (10000, the issue's figure)
  --batch-singles / GPUROUTE_BENCH_BATCH_SINGLES  single ImageJobs in its other arm (10000: the same images)
  --only NAME[,NAME]                           run a subset (names below); the others' results
                                               are kept from the existing latest.json, dated
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import machine

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ("control_plane", "batch", "watch_cost", "dispatch", "dataplane", "transfers", "worker_ops", "operator_memory",
         "batch_memory", "gpu")
NAMES = (*ORDER, "routing_sim")


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| benchmark | metric | gpuroute | baseline | baseline value | ratio (>1 = gpuroute better) |",
             "|---|---|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['metric']} | {r['value']:g} {r['unit']} | {r['baseline']} "
                     f"| {r['baseline_value']:g} {r['unit']} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=_env_int("GPUROUTE_BENCH_JOBS", 2000))
    parser.add_argument("--latency-jobs", type=int, default=_env_int("GPUROUTE_BENCH_LATENCY_JOBS", 200))
    parser.add_argument("--memory", default=os.environ.get("GPUROUTE_BENCH_MEMORY", "1000,10000"))
    parser.add_argument("--dispatch-jobs", type=int, default=_env_int("GPUROUTE_BENCH_DISPATCH_JOBS", 100))
    parser.add_argument("--routing-jobs", type=int, default=_env_int("GPUROUTE_BENCH_ROUTING_JOBS", 10_000))
    parser.add_argument("--batch-items", type=int, default=_env_int("GPUROUTE_BENCH_BATCH_ITEMS", 10_000))
    parser.add_argument("--batch-singles", type=int, default=_env_int("GPUROUTE_BENCH_BATCH_SINGLES", 10_000))
    parser.add_argument("--only", default=os.environ.get("GPUROUTE_BENCH_ONLY", ""),
                        help=f"comma-separated subset of {', '.join(NAMES)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for latest.json and latest.md")
    args = parser.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()] or list(NAMES)
    unknown = set(args.only) - set(NAMES)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; known: {', '.join(NAMES)}")
    return args


def _benchmarks(args: argparse.Namespace) -> dict[str, Callable[[], dict[str, Any]]]:
    # Imported lazily, one by one: a benchmark whose imports fail is reported, not fatal.
    def control_plane() -> dict[str, Any]:
        from bench import control_plane as m

        return m.run(throughput_jobs=args.jobs, latency_jobs=args.latency_jobs)

    def watch_cost() -> dict[str, Any]:
        from bench import watch_cost as m

        return m.run()

    def batch() -> dict[str, Any]:
        from bench import batch as m

        return m.run(batch_items=args.batch_items, single_items=args.batch_singles)

    def dispatch() -> dict[str, Any]:
        from bench import dispatch as m

        return m.run(jobs=args.dispatch_jobs)

    def dataplane() -> dict[str, Any]:
        from bench import dataplane as m

        return m.run()

    def transfers() -> dict[str, Any]:
        from bench import transfers as m

        return m.run()

    def worker_ops() -> dict[str, Any]:
        from bench import worker_ops as m

        return m.run()

    def operator_memory() -> dict[str, Any]:
        from bench import operator_memory as m

        return m.run(counts=tuple(int(c) for c in args.memory.split(",") if c.strip()))

    def batch_memory() -> dict[str, Any]:
        from bench import batch_memory as m

        return m.run()

    def gpu() -> dict[str, Any]:
        from bench import gpu as m

        return m.run()

    def routing_sim() -> dict[str, Any]:
        try:
            from bench import routing_sim as m
        except ImportError as exc:
            return {"skipped": f"bench.routing_sim not importable: {exc}"}
        return m.run(jobs=args.routing_jobs, seed=0)

    return {"control_plane": control_plane, "batch": batch, "watch_cost": watch_cost, "dispatch": dispatch,
            "dataplane": dataplane,
            "transfers": transfers,
            "worker_ops": worker_ops,
            "operator_memory": operator_memory, "batch_memory": batch_memory, "gpu": gpu, "routing_sim": routing_sim}


def _routing_markdown(result: dict[str, Any]) -> str:
    try:
        from bench import routing_sim

        return routing_sim.markdown(result)
    except Exception as exc:  # the table is optional; its absence is reported
        return f"Routing simulation: could not render ({exc!r})."


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    rows = [r for key in ORDER for r in (results.get(key) or {}).get("rows", [])]
    parts = [f"Measured {results['date']} on {m['cpus']} x {m['cpu_model'] or 'CPU'} ({m['machine']}), "
             f"torch {m.get('torch')}, GPU: {m.get('cuda') or 'none'}; whole run {results['seconds']} s "
             f"(load average at start {' '.join(m.get('loadavg_at_start', []))}).", "", table(rows)]
    notes = []
    for key in NAMES:
        entry = results.get(key) or {}
        if "skipped" in entry:
            notes.append(f"- {key}: skipped: {entry['skipped']}")
        if "error" in entry:
            notes.append(f"- {key}: FAILED: {entry['error'].strip().splitlines()[-1]}")
    for key, date in sorted((results.get("kept_from_earlier_run") or {}).items()):
        notes.append(f"- {key}: from the earlier run of {date} (not re-run this time)")
    if notes:
        parts += ["", *notes]
    sim = results.get("routing_sim") or {}
    if sim and "skipped" not in sim and "error" not in sim:
        parts += ["", _routing_markdown(sim)]
    return "\n".join(parts) + "\n"


def _keep_earlier(results: dict[str, Any], path: Path, ran: list[str]) -> None:
    """A subset run (--only) keeps the other benchmarks' results from the existing file, each
    named with the date it was measured, so one re-measured benchmark does not erase the rest."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    kept = results.setdefault("kept_from_earlier_run", {})
    for key in NAMES:
        if key in ran or key not in earlier:
            continue
        results[key] = earlier[key]
        kept[key] = (earlier.get("kept_from_earlier_run") or {}).get(key) or earlier.get("date", "?")
        if key in (earlier.get("durations_s") or {}):
            results["durations_s"][key] = earlier["durations_s"][key]


def main(argv: list[str] | None = None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    # moto's werkzeug server logs every request; the table is what this run is for.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    started = time.perf_counter()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(),
                               "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "durations_s": {}}
    failed = False
    for name, call in _benchmarks(args).items():
        if name not in args.only:
            continue
        print(f"running {name}...", flush=True)
        t = time.perf_counter()
        try:
            results[name] = call()
        except Exception:  # reported in the table and the exit status; the others still run
            failed = True
            results[name] = {"error": traceback.format_exc(), "rows": []}
            print(results[name]["error"], file=sys.stderr, flush=True)
        results["durations_s"][name] = round(time.perf_counter() - t, 1)
        print(f"  {name}: {results['durations_s'][name]} s", flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    _keep_earlier(results, args.out / "latest.json", args.only)
    text = render(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (args.out / "latest.md").write_text(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
