"""The pure-CPU benchmarks run end to end at tiny sizes and report their fields.

Timings are never asserted: benchmarks print figures, tests only check that they run
and that every result carries the fields run_all and the README rely on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import dataplane, dispatch, gpu, run_all, worker_ops
from bench.common import machine, percentile, row, summary_ms

ROW_FIELDS = {"benchmark", "metric", "value", "unit", "baseline", "baseline_value", "ratio", "higher_is_better"}


def _check_rows(rows: list[dict[str, Any]]) -> None:
    assert rows
    for r in rows:
        assert set(r) == ROW_FIELDS, r
        # Toy sizes: a figure may round to 0 (a microsecond op against a scheduling spike);
        # what matters here is that every path ran and reported a finite, non-negative number.
        assert all(math.isfinite(r[k]) and r[k] >= 0 for k in ("value", "baseline_value", "ratio")), r
    assert run_all.table(rows).count("\n") == len(rows) + 1


def test_row_ratio_reads_the_same_way_for_times_and_rates() -> None:
    # A time half the baseline and a rate twice the baseline are both "2x better".
    assert row("b", "m", 5.0, "ms", "base", 10.0, higher_is_better=False)["ratio"] == 2.0
    assert row("b", "m", 20.0, "MB/s", "base", 10.0, higher_is_better=True)["ratio"] == 2.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and math.isnan(percentile([], 0.5))
    assert set(summary_ms([0.001, 0.002])) == {"n", "p50_ms", "p95_ms", "p99_ms", "mean_ms"}


def test_percentile_is_nearest_rank() -> None:
    # The one definition every benchmark uses: index ceil(q * n) - 1, never interpolated, so each
    # figure is a value that was measured (the routing simulation's tables depend on this rule).
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.0
    assert percentile([float(v) for v in range(1, 101)], 0.95) == 95.0
    assert percentile([float(v) for v in range(1, 21)], 0.99) == 20.0
    assert percentile([7.0], 0.0) == 7.0 and percentile([7.0], 1.0) == 7.0


def test_machine_info_names_cpu_torch_and_cuda() -> None:
    info = machine()
    assert info["cpus"] >= 1 and "cpu_model" in info and "torch" in info and "cuda_available" in info


def test_dataplane_reports_every_transport_and_size() -> None:
    out = dataplane.run(rounds={k: 2 for k in dataplane.SIZES}, stream={k: 2 for k in dataplane.SIZES}, trials=1)
    assert set(out["sizes"]) == set(dataplane.SIZES)
    for entry in out["sizes"].values():
        assert set(entry) == {"curve", "zmq", "tcp"}
        for figures in entry.values():
            assert figures["throughput_MBps"] > 0 and figures["p50_ms"] > 0 and figures["n"] == 2
    assert len(out["rows"]) == 4 * len(dataplane.SIZES)
    _check_rows(out["rows"])


def test_worker_ops_compares_one_op_with_pillow() -> None:
    out = worker_ops.run(ops=["grayscale"], repeats=1)
    figures = out["ops"]["grayscale"]
    assert figures["gpuroute_ms_per_mpix"] > 0 and figures["pillow_ms_per_mpix"] > 0
    assert out["rows"][0]["baseline"].startswith("Pillow")
    _check_rows(out["rows"])


def test_every_worker_op_does_the_same_work_as_its_reference() -> None:
    # Output sizes must agree, or the per-megapixel comparison would be unfair.
    from PIL import Image

    from gpuroute.ops_catalog import normalize_steps
    from gpuroute_worker.ops import output_shape

    image = Image.new("RGB", (64, 48))
    for name, (step, reference) in worker_ops.OPS.items():
        h, w = output_shape(48, 64, normalize_steps([step]))
        assert reference(image).size == (w, h), name


def test_dispatch_runs_a_few_jobs_over_both_paths() -> None:
    out = dispatch.run(jobs=2)
    for series in ("socket", "https_new_connection", "https_keepalive", "worker_time"):
        assert out[series]["n"] == 2 and out[series]["p50_ms"] > 0
    _check_rows(out["rows"])


def test_gpu_bench_skips_without_cuda_and_runs_its_code_on_cpu() -> None:
    import torch

    if not torch.cuda.is_available():
        assert gpu.run() == {"skipped": "no CUDA device on this machine", "rows": []}
    # Every code path at toy sizes on the CPU (one RRDB block): the figures mean nothing.
    out = gpu.run(device="cpu", op_size=32, batch_sizes=(16,), batches=(1, 2), sr_frame=(8, 12),
                  dtypes=("float32", "bfloat16"), rrdb_blocks=1, repeats=1, sr_repeats=1, jpeg_frame=(24, 40))
    assert set(out["ops"]) == set(worker_ops.OPS)
    assert set(out["batching"]["16^2"]) == {"batch 1", "batch 2"}
    assert set(out["sr"]) == {"RRDBNet x4", "SRVGGNetCompact x4"}
    assert out["jpeg"]["frame"] == "40x24" and out["jpeg"]["decode_device_ms"] is None  # no nvJPEG on a CPU
    assert min(out["jpeg"][k] for k in ("decode_host_ms", "compute_ms", "encode_ms")) > 0
    for figures in out["sr"].values():
        assert set(figures["ms_per_frame"]) == {"float32", "bfloat16"}
    _check_rows(out["rows"])


def test_run_all_writes_json_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # gpu only: on a machine without CUDA it is a skip, so this stays fast everywhere but there.
    import torch

    if torch.cuda.is_available():
        pytest.skip("would run the full GPU benchmark")
    assert run_all.main(["--only", "gpu", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "latest.json").read_text())
    assert {"machine", "gpu", "seconds", "parameters"} <= set(results)
    assert {"cpus", "cpu_model", "torch", "cuda_available"} <= set(results["machine"])
    text = (tmp_path / "latest.md").read_text()
    assert "| benchmark | metric |" in text and "gpu: skipped" in text
    assert text in capsys.readouterr().out
