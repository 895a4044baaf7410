"""The routing simulation accounts for every job and shows the trade-offs it claims."""

from __future__ import annotations

from bench.routing_sim import markdown, run


def test_small_run_accounts_for_every_job_and_orders_strategies() -> None:
    out = run(jobs=2_000, seed=3)
    rows = {r["policy"]: r for r in out["results"]}
    for r in rows.values():
        assert r["completed"] + r["past_deadline"] + r["lost"] == r["jobs"] == 2_000, r
    for policy in ("gpuroute-mix", "gpuroute-fastest", "gpuroute-cheapest", "gpuroute-balanced"):
        assert rows[policy]["lost"] == 0, rows[policy]
    # cheapest fills the spot pool, so its failure must move jobs (and lose none).
    assert rows["gpuroute-cheapest"]["rerouted"] > 0
    assert rows["gpuroute-cheapest"]["cost_per_1000_usd"] <= rows["gpuroute-fastest"]["cost_per_1000_usd"]
    assert rows["gpuroute-fastest"]["p50_s"] <= rows["gpuroute-cheapest"]["p50_s"]
    assert "| gpuroute-mix |" in markdown(out)
