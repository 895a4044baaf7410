"""The pure-CPU benchmarks run end to end at tiny sizes and report their fields.

Timings are never asserted: benchmarks print figures, tests only check they run.
"""

from __future__ import annotations

from bench import dataplane, gpu, worker_ops
from bench.run_all import table


def test_dataplane_reports_every_transport_and_size() -> None:
    out = dataplane.run(rounds={"64KiB": 3, "1MiB": 2, "8MiB": 1})
    assert set(out["sizes"]) == {"64KiB", "1MiB", "8MiB"}
    for entry in out["sizes"].values():
        assert set(entry) == {"curve", "zmq", "tcp"}
        assert all(v["throughput_MBps"] > 0 for v in entry.values())
    assert len(out["rows"]) == 9 and "| dataplane |" in table(out["rows"])


def test_worker_ops_compares_with_pillow() -> None:
    out = worker_ops.run(ops=["grayscale"], repeats=1)
    figures = out["ops"]["grayscale"]
    assert figures["gpuroute_ms_per_mpix"] > 0 and figures["pillow_ms_per_mpix"] > 0
    assert out["rows"][0]["baseline"] == "Pillow"


def test_gpu_bench_skips_cleanly_without_cuda() -> None:
    import torch

    out = gpu.run() if not torch.cuda.is_available() else {"skipped": "n/a", "rows": []}
    assert "skipped" in out and out["rows"] == []
