"""The simulation's results as Markdown: the pools, one table per scenario, the router checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

REFERENCE = "round-robin"
"""The policy the ratio columns compare against."""
MOVES_JOBS = ("gpuroute-mix", "gpuroute-fastest", "gpuroute-cheapest", "gpuroute-balanced", "round-robin-failover")
"""Policies whose re-routed count means something (the others never move a job)."""


def _table(rows: Sequence[dict[str, Any]]) -> list[str]:
    base = next(r for r in rows if r["key"] == REFERENCE)
    lines = ["| policy | $ / 1,000 images | cost vs RR | p50 s | p95 s | p95 vs RR | realtime p95 s "
             "| past deadline (realtime) | lost | failed | re-routed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['cost_per_1000_usd']:.4f} "
            f"| {r['cost_per_1000_usd'] / base['cost_per_1000_usd']:.2f}x "
            f"| {r['p50_s']:.2f} | {r['p95_s']:.1f} | {r['p95_s'] / base['p95_s']:.2f}x | {r['realtime_p95_s']:.2f} "
            f"| {r['past_deadline']} ({r['realtime_past_deadline']}) "
            f"| {r['lost']} | {r['failed']} | {r['rerouted'] if r['key'] in MOVES_JOBS else '-'} |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    pools = results["pools"]
    lines = [
        f"Routing simulation: {results['jobs']:,} jobs (seed {results['seed']}), {len(pools)} pools; "
        f"{results['failing']} loses every worker at {results['fail_at_s']:.0f} s"
        + (f" and returns at {results['recover_at_s']:.0f} s." if results["recover_at_s"] is not None else "."),
        "",
        "| pool | $ / GPU-hour | spot | workers x slots | slot ms per Mpix + overhead | RTT ms "
        "| true $ / 1,000 avg images | router's estimate (idle pool) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    est = results.get("pool_estimates", {})
    for p in pools:
        e = est.get(p["name"], {})
        lines.append(f"| {p['name']} | {p['price_per_gpu_hour']:.2f} | {'yes' if p['spot'] else 'no'} "
                     f"| {p['workers']} x {p['slots_per_worker']} | {p['ms_per_mpix']:.0f} + {p['overhead_ms']:.0f} "
                     f"| {p['rtt_ms']:.0f} | {1000 * e.get('true_usd_per_image', math.nan):.4f} "
                     f"| {1000 * e.get('router_usd_per_image', math.nan):.4f} |")
    lines += ["", "Pool returns:", ""] + _table(results["results"])
    lines += ["", "Pool never returns:", ""] + _table(results["never_returns"])
    lines += ["", "Ratios are against round-robin (< 1 is cheaper / faster). Percentiles over completed jobs; "
              "cost is GPU spend over images delivered on time. Lost: held by the failed cluster, never resolved."]
    diag = results.get("diagnostics")
    if diag:
        per_pool = ", ".join(f"{k} {v['ratio']:.1f}x" for k, v in diag["estimated_vs_actual_per_pool"].items())
        engine, rtq, same = diag["engine_views"], diag["realtime-queue"], diag["oracle-service"]
        lines += ["", "Router checks (gpuroute, per-job strategies; counterfactuals change only what the views show):",
                  f"- router's cost per image over the GPU cost actually used: {per_pool}",
                  f"- completion time actual / expected, median: realtime "
                  f"{diag['realtime_actual_over_expected_median']:.2f}, "
                  f"batch {diag['batch_actual_over_expected_median']:.2f}",
                  f"- realtime jobs shown only the realtime part of each queue: realtime p95 "
                  f"{engine['realtime_p95_s']:.2f} -> {rtq['realtime_p95_s']:.2f} s, $ / 1,000 "
                  f"{engine['cost_per_1000_usd']:.4f} -> {rtq['cost_per_1000_usd']:.4f}",
                  f"- every pool shown its true service time for each job (perfect speed knowledge): $ / 1,000 "
                  f"{engine['cost_per_1000_usd']:.4f} -> {same['cost_per_1000_usd']:.4f}, p95 {engine['p95_s']:.1f} -> "
                  f"{same['p95_s']:.1f} s, past deadline {engine['past_deadline']} -> {same['past_deadline']}"]
        idle = ", ".join(f"{r['policy'].removeprefix('gpuroute, ')} {r['idle_slot_s_while_queued_elsewhere']:,.0f}"
                         for r in results["results"] if r["key"].startswith("gpuroute"))
        lines.append(f"- slot-seconds free on one pool while jobs waited in another's queue (jobs stay where they "
                     f"were routed): {idle}")
    lines += ["", f"({results['seconds']} s)"]
    return "\n".join(lines)
