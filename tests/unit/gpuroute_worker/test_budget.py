"""Every step's output is checked against the pixel and memory budget before any step
runs, so a pipeline that grows and then shrinks is refused up front."""

from __future__ import annotations

import pytest
import torch

from gpuroute.ops_catalog import Budget, StepError, check_budget, host_step_bytes, normalize_steps, step_bytes
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
    need = step_bytes("blur", 3, (4000, 4000), (4000, 4000), steps[0])
    # The input edge-padded by the radius (3 + 2 pixels a side) plus the output, three
    # channels of float32, nine times over (test_memory_estimate measures it), plus tables.
    assert need == int((4010 * 4010 + 16_000_000) * 3 * 4 * 9.0) + (1 << 16)
    assert check_budget(steps, shapes, 3, Budget(max_pixels=10**9, max_bytes=need)) == need
    with pytest.raises(StepError, match=r"spec.steps\[0\]: blur on 4000x4000 -> 4000x4000 needs about 3.2 GiB"):
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


def test_a_cpu_worker_charges_8bit_steps_their_own_memory_and_16bit_the_float_code() -> None:
    # On the CPU, a blur of 8-bit pixels runs in Pillow (four bytes a pixel); 16-bit grey runs
    # the float32 torch code, whose estimate (test_memory_estimate) is several times larger.
    blur = normalize_steps([{"op": "blur", "radius": 3}])
    cpu = BatchExecutor(torch.device("cpu"), None, max_batch=1, max_wait_ms=0)
    gpu_like = BatchExecutor(torch.device("cpu"), None, max_batch=1, max_wait_ms=0, batching=True)
    try:
        rgb = torch.zeros(1, 1, 1, dtype=torch.uint8).expand(3, 6000, 6000)
        grey16 = torch.zeros(1, 1, 1, dtype=torch.uint16).expand(1, 6000, 6000)
        assert cpu.check_budget(blur, rgb, max_pixels=10**9, max_bytes=None) == host_step_bytes((6000, 6000),
                                                                                                 (6000, 6000))
        torch_need = step_bytes("blur", 1, (6000, 6000), (6000, 6000), blur[0])
        assert torch_need > CPU_WORKING_BYTES
        for executor, pixels in ((cpu, grey16), (gpu_like, rgb)):
            with pytest.raises(StepError, match=r"spec.steps\[0\]: blur on 6000x6000"):
                executor.check_budget(blur, pixels, max_pixels=10**9, max_bytes=None)
    finally:
        cpu.close()
        gpu_like.close()
