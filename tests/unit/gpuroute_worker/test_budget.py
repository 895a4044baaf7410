"""Every step's output is checked against the pixel and memory budget before any step
runs, so a pipeline that grows and then shrinks is refused up front."""

from __future__ import annotations

import pytest
import torch

from gpuroute.ops_catalog import Budget, StepError, check_budget, normalize_steps, step_bytes
from gpuroute_worker.executor import CPU_WORKING_BYTES, BatchExecutor
from gpuroute_worker.ops.pipeline import step_shapes

GROW_THEN_SHRINK = normalize_steps([{"op": "upscale", "scale": 16, "method": "bicubic"},
                                    {"op": "resize", "scale": 0.1}])


def test_an_intermediate_over_the_pixel_budget_names_its_step() -> None:
    shapes = step_shapes(1024, 1024, GROW_THEN_SHRINK)
    assert shapes == [(1024, 1024), (16384, 16384), (1638, 1638)]
    with pytest.raises(StepError) as caught:
        check_budget(GROW_THEN_SHRINK, shapes, 3, Budget(max_pixels=64_000_000, max_bytes=1 << 40))
    assert caught.value.field == "spec.steps[0]"
    assert "16384x16384 = 268.4 Mpx" in caught.value.message


def test_the_memory_budget_counts_input_output_and_scratch() -> None:
    steps = normalize_steps([{"op": "blur", "radius": 3}])
    shapes = step_shapes(4000, 4000, steps)
    need = step_bytes("blur", 3, (4000, 4000), (4000, 4000))
    assert need == int(2 * 16_000_000 * 3 * 4 * 3.0)
    assert check_budget(steps, shapes, 3, Budget(max_pixels=10**9, max_bytes=need)) == need
    with pytest.raises(StepError, match=r"spec.steps\[0\]: blur on 4000x4000 -> 4000x4000 needs about 1.1 GiB"):
        check_budget(steps, shapes, 3, Budget(max_pixels=10**9, max_bytes=need - 1))


def test_executor_refuses_before_allocating() -> None:
    executor = BatchExecutor(torch.device("cpu"), None, max_batch=1, max_wait_ms=0)
    try:
        assert executor.working_budget(None) == CPU_WORKING_BYTES
        # A 1024x1024 input: nothing of the 16384^2 intermediate is ever allocated.
        pixels = torch.zeros((3, 1024, 1024), dtype=torch.uint8)
        with pytest.raises(StepError, match=r"spec.steps\[0\]"):
            executor.check_budget(GROW_THEN_SHRINK, pixels, max_pixels=268_000_000, max_bytes=None)
        small = normalize_steps([{"op": "upscale", "scale": 2}, {"op": "resize", "scale": 0.5}])
        assert executor.check_budget(small, pixels, max_pixels=268_000_000, max_bytes=None) > 0
    finally:
        executor.close()
